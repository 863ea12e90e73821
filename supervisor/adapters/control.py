"""The control socket (parent side): a Unix stream socket, mode 0600, speaking one JSON object
per line. ``ksup status|stop|scale|health`` are its clients.

Request: ``{"cmd": "status"}``; response: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
Commands: ``status``, ``health``, ``ready`` (readiness.py), ``scale`` (``"workers": N``), ``stop`` (``"timeout": S``,
``"wait": true`` keeps the connection open until the supervisor exits and then sends
``{"ok": true, "exit_code": N}``). Only the supervisor's own user may connect: the file mode
keeps others out and the peer's uid is checked again with SO_PEERCRED.
"""

from __future__ import annotations

import json
import logging
import math
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from supervisor.parent.hooks import Hooks

log = logging.getLogger("ksup.control")

MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 64      # open at once, waiters included: beyond, a new one is refused at once
REQUEST_TIMEOUT_S = 10.0  # to send a whole request, or to take a reply: then the connection closes
ACCEPT_PAUSE_S = 1.0      # accept() failed (out of file descriptors): not listening this long

Reply = tuple[dict[str, Any] | None, bool]  # a command's response (None: answered later), keep the connection


class Commands(Protocol):
    """What the supervisor offers the control socket. Each returns a JSON-able dict."""

    def status(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    def ready(self) -> dict[str, Any]: ...
    def scale(self, workers: int) -> dict[str, Any]: ...
    def request_stop(self, reason: str, timeout: float | None) -> dict[str, Any]: ...
    def reload(self) -> dict[str, Any]: ...


def default_socket_path(group: str) -> str:
    """``$XDG_RUNTIME_DIR/ksup/<group>.sock``, else ``/tmp/ksup-<uid>/<group>.sock``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "ksup" if base else Path(f"/tmp/ksup-{os.getuid()}")
    return str(folder / f"{group}.sock")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class ControlServer:
    """Serves the control socket from the supervisor's loop, never blocking it: every socket is
    non-blocking, a reply that does not fit the client's socket at once is sent as it drains,
    and what a client can hold is bounded (MAX_CONNECTIONS connections, REQUEST_TIMEOUT_S to send
    a request or take a reply; ``stop``/``reload --wait`` waiters are kept until answered).
    ``tick`` (from the loop, about every TICK_S) enforces the time limits."""

    def __init__(self, path: str, commands: Commands) -> None:
        self.path = path
        self.commands = commands
        self.sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._buffers: dict[socket.socket, bytes] = {}   # reading a request: what came so far
        self._since: dict[socket.socket, float] = {}     # reading or replying: since when
        self._out: dict[socket.socket, bytes] = {}       # a reply's rest, sent as the client takes it
        self._accept_paused_until: float | None = None
        self.waiters: list[socket.socket] = []         # stop --wait: answered at exit
        self.reload_waiters: list[socket.socket] = []  # reload --wait: answered when the roll ends

    def open(self, selector: selectors.BaseSelector) -> None:
        folder = Path(self.path).parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.path.exists(self.path):
            if _alive(self.path):
                raise OSError(f"another ksup is already listening on {self.path} "
                              f"(stop it, or use --control-socket to pick another path)")
            os.unlink(self.path)  # left behind by a ksup that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600: no window where others can connect
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.sock, self._selector = sock, selector
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def connections(self) -> int:
        """Client connections open now (waiters included)."""
        return len(self._since) + len(self.waiters) + len(self.reload_waiters)

    def tick(self, now: float) -> None:
        """Close the connections past REQUEST_TIMEOUT_S (no whole request yet, or a reply the
        client does not take); listen again after an accept pause."""
        for conn, since in list(self._since.items()):
            if now - since >= REQUEST_TIMEOUT_S:
                self._drop(conn)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            if self.sock is not None and self._selector is not None:
                self._selector.register(self.sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self) -> None:
        assert self.sock is not None and self._selector is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            # Out of file descriptors (EMFILE/ENFILE) or memory: the connection stays in the
            # backlog and the socket readable, so the loop would spin on it. Stop listening a while.
            log.warning("control socket: cannot accept a connection (%s); not listening for %.0fs",
                        exc.strerror or exc, ACCEPT_PAUSE_S)
            self._selector.unregister(self.sock)
            self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
            return
        conn.setblocking(False)
        if _peer_uid(conn) not in (os.getuid(), 0):
            _send_now(conn, {"ok": False, "error": "permission denied"})
            conn.close()
            return
        if self.connections() >= MAX_CONNECTIONS:
            _send_now(conn, {"ok": False, "error": f"too many control connections open ({MAX_CONNECTIONS}): "
                                                   "close some and try again"})
            conn.close()
            return
        self._buffers[conn] = b""
        self._since[conn] = time.monotonic()
        self._selector.register(conn, selectors.EVENT_READ, self._reader(conn))

    def _reader(self, conn: socket.socket) -> Callable[[], None]:
        return lambda: self._on_readable(conn)

    def _on_readable(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        if conn not in self._buffers:
            return  # more after its request (a waiter, or a reply going out): not read
        buf = self._buffers[conn] + chunk
        if b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._buffers.pop(conn, None)
                self._finish(conn, {"ok": False, "error": "request too long"})
            else:
                self._buffers[conn] = buf
            return
        line = buf.split(b"\n", 1)[0]
        del self._buffers[conn]
        try:
            response, keep = self.handle(line, conn)
        except Exception as exc:  # handle never raises; should it, one client must not end the loop
            log.exception("control request failed")
            response, keep = {"ok": False, "error": f"request failed: {exc}"}, False
        if keep:  # a waiter: answered later, and no longer bound by the request timeout
            self._since.pop(conn, None)
        elif response is not None:
            self._finish(conn, response)
        else:
            self._drop(conn)

    def _finish(self, conn: socket.socket, body: dict[str, Any]) -> None:
        """Send ``body`` and close. What the client's socket cannot take now is sent as it
        drains (the loop never waits for a client), within REQUEST_TIMEOUT_S."""
        self._out[conn] = json.dumps(body).encode() + b"\n"
        self._since[conn] = time.monotonic()
        self._on_writable(conn)
        if conn in self._out:  # the rest when the socket is writable again
            assert self._selector is not None
            try:
                self._selector.modify(conn, selectors.EVENT_WRITE, self._writer(conn))
            except (KeyError, ValueError):
                self._selector.register(conn, selectors.EVENT_WRITE, self._writer(conn))

    def _writer(self, conn: socket.socket) -> Callable[[], None]:
        return lambda: self._on_writable(conn)

    def _on_writable(self, conn: socket.socket) -> None:
        """Send what the socket takes of the reply; closed once all of it went out."""
        data = self._out[conn]
        try:
            sent = conn.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if sent == len(data):
            self._drop(conn)
        else:
            self._out[conn] = data[sent:]

    def handle(self, line: bytes, conn: socket.socket | None = None) -> tuple[dict[str, Any] | None, bool]:
        """One request -> (response, keep the connection open). Never raises."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's depth
            return {"ok": False, "error": "malformed request: send one JSON object per line, "
                                          "e.g. {\"cmd\": \"status\"}"}, False
        cmd = req.get("cmd")
        command = COMMANDS.get(cmd) if isinstance(cmd, str) else None
        if command is None:
            return {"ok": False, "error": f"unknown command {cmd!r} ({', '.join(COMMANDS)})"}, False
        try:
            return command(self, req, conn)
        except Exception as exc:  # a bug in a command must not take the supervisor down
            log.exception("control command %r failed", cmd)
            return {"ok": False, "error": f"{cmd} failed: {exc}"}, False

    # ---- the commands (COMMANDS below): request -> (response, keep the connection open) ----------

    def _status(self, req: dict[str, Any], conn: socket.socket | None) -> Reply:
        return {"ok": True, **self.commands.status()}, False

    def _health(self, req: dict[str, Any], conn: socket.socket | None) -> Reply:
        return {"ok": True, **self.commands.health()}, False

    def _ready(self, req: dict[str, Any], conn: socket.socket | None) -> Reply:
        return {"ok": True, **self.commands.ready()}, False

    def _scale(self, req: dict[str, Any], conn: socket.socket | None) -> Reply:
        workers = req.get("workers")
        if not isinstance(workers, int) or isinstance(workers, bool):
            return {"ok": False, "error": "scale needs \"workers\": an integer >= 1"}, False
        return self.commands.scale(workers), False

    def _reload(self, req: dict[str, Any], conn: socket.socket | None) -> Reply:
        result = self.commands.reload()
        if result.get("ok") and req.get("wait") and conn is not None:
            self.reload_waiters.append(conn)  # answered when the roll ends
            return None, True
        return result, False

    def _stop(self, req: dict[str, Any], conn: socket.socket | None) -> Reply:
        timeout = req.get("timeout")
        # NaN and Infinity parse as JSON numbers; a deadline of now + nan is never reached.
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or not math.isfinite(timeout) or timeout <= 0):
            return {"ok": False, "error": "stop: \"timeout\" must be a finite number of seconds "
                                          "above 0 (e.g. ksup stop --timeout 30)"}, False
        result = self.commands.request_stop("stop requested over the control socket",
                                            None if timeout is None else float(timeout))
        if req.get("wait") and conn is not None:
            self.waiters.append(conn)  # answered with the exit code when ksup exits
            return None, True
        return result, False

    def _drop(self, conn: socket.socket) -> None:
        """Forget a connection and close it (a waiter whose caller went away too: left in the
        selector, its end of file would wake the loop forever)."""
        self._buffers.pop(conn, None)
        self._since.pop(conn, None)
        self._out.pop(conn, None)
        for waiting in (self.waiters, self.reload_waiters):
            if conn in waiting:
                waiting.remove(conn)
        if self._selector is not None:
            try:
                self._selector.unregister(conn)
            except (KeyError, ValueError):
                pass
        conn.close()

    def reload_done(self, summary: dict[str, Any]) -> None:
        waiting, self.reload_waiters = self.reload_waiters, []
        for conn in waiting:
            self._finish(conn, summary)

    def close(self, exit_code: int) -> None:
        """Answer every ``stop --wait`` client with the exit code, then remove the socket. The
        loop has ended: each answer is what the client's socket takes at once (a few bytes)."""
        for conn in self.waiters:
            _send_now(conn, {"ok": True, "exit_code": exit_code})
        for conn in [*self.waiters, *self.reload_waiters, *self._since]:  # _since: reading or replying
            self._drop(conn)
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass


# What each "cmd" runs: a new control command is a method of ControlServer and a line here.
COMMANDS: dict[str, Callable[[ControlServer, dict[str, Any], socket.socket | None], Reply]] = {
    "status": ControlServer._status,
    "health": ControlServer._health,
    "ready": ControlServer._ready,
    "scale": ControlServer._scale,
    "reload": ControlServer._reload,
    "stop": ControlServer._stop,
}


def _send_now(conn: socket.socket, body: dict[str, Any]) -> None:
    """What a non-blocking socket takes of ``body`` at once (a short answer fits a fresh socket)."""
    try:
        conn.send(json.dumps(body).encode() + b"\n")
    except OSError:
        pass


def _alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def request(path: str, body: dict[str, Any], timeout: float | None = 10.0) -> dict[str, Any]:
    """Client side: send one request, return the (last) response. Raises OSError/ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ValueError("the supervisor closed the connection without answering")
    result: dict[str, Any] = json.loads(data.splitlines()[-1])
    return result


class ControlSocketHooks(Hooks):
    """Opens the control socket when the supervisor starts and closes it (answering
    ``stop --wait`` clients) when it exits."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server: ControlServer | None = None

    def on_start(self, sup: Any) -> None:
        from supervisor.parent.commands import SupervisorCommands

        self.server = ControlServer(self.path, SupervisorCommands(sup))
        self.server.open(sup.selector)
        log.info("control socket at %s", self.path)

    def on_tick(self, sup: Any) -> None:
        if self.server is not None:
            self.server.tick(time.monotonic())

    def on_reload_done(self, sup: Any, summary: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.reload_done(summary)

    def on_exit(self, sup: Any, exit_code: int) -> None:
        if self.server is not None:
            self.server.reload_done({"ok": False, "error": "ksup stopped"})
            self.server.close(exit_code)
