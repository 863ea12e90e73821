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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from supervisor.parent.hooks import Hooks

log = logging.getLogger("ksup.control")

MAX_REQUEST = 64 * 1024


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
    def __init__(self, path: str, commands: Commands) -> None:
        self.path = path
        self.commands = commands
        self.sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._buffers: dict[socket.socket, bytes] = {}
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

    def _on_accept(self) -> None:
        assert self.sock is not None and self._selector is not None
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        if _peer_uid(conn) not in (os.getuid(), 0):
            self._reply(conn, {"ok": False, "error": "permission denied"})
            conn.close()
            return
        conn.setblocking(False)
        self._buffers[conn] = b""
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
        buf = self._buffers.get(conn, b"") + chunk
        if b"\n" not in buf:
            if len(buf) > MAX_REQUEST:
                self._reply(conn, {"ok": False, "error": "request too long"})
                self._drop(conn)
            else:
                self._buffers[conn] = buf
            return
        line = buf.split(b"\n", 1)[0]
        self._buffers[conn] = b""
        response, keep = self.handle(line, conn)
        if response is not None:
            self._reply(conn, response)
        if not keep:
            self._drop(conn, keep_waiter=True)

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
        try:
            if cmd == "status":
                return {"ok": True, **self.commands.status()}, False
            if cmd == "health":
                return {"ok": True, **self.commands.health()}, False
            if cmd == "ready":
                return {"ok": True, **self.commands.ready()}, False
            if cmd == "scale":
                workers = req.get("workers")
                if not isinstance(workers, int) or isinstance(workers, bool):
                    return {"ok": False, "error": "scale needs \"workers\": an integer >= 1"}, False
                return self.commands.scale(workers), False
            if cmd == "reload":
                result = self.commands.reload()
                if result.get("ok") and req.get("wait") and conn is not None:
                    self.reload_waiters.append(conn)
                    return None, True
                return result, False
            if cmd == "stop":
                timeout = req.get("timeout")
                # NaN and Infinity parse as JSON numbers; a deadline of now + nan is never reached.
                if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                            or not math.isfinite(timeout) or timeout <= 0):
                    return {"ok": False, "error": "stop: \"timeout\" must be a finite number of seconds "
                                                  "above 0 (e.g. ksup stop --timeout 30)"}, False
                result = self.commands.request_stop("stop requested over the control socket",
                                                    None if timeout is None else float(timeout))
                if req.get("wait") and conn is not None:
                    self.waiters.append(conn)
                    return None, True
                return result, False
        except Exception as exc:  # a bug in a command must not take the supervisor down
            log.exception("control command %r failed", cmd)
            return {"ok": False, "error": f"{cmd} failed: {exc}"}, False
        return {"ok": False, "error": f"unknown command {cmd!r} (status, health, ready, scale, reload, stop)"}, False

    def _reply(self, conn: socket.socket, body: dict[str, Any]) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(json.dumps(body).encode() + b"\n")
        except OSError:
            pass
        finally:
            try:
                conn.setblocking(False)
            except OSError:
                pass

    def _drop(self, conn: socket.socket, keep_waiter: bool = False) -> None:
        """Forget a connection. A waiter (``stop``/``reload --wait``) stays registered after its
        request (``keep_waiter``) until answered; one whose caller went away (end of file) is
        dropped here too: left in the selector, its EOF would wake the loop forever."""
        self._buffers.pop(conn, None)
        if keep_waiter and (conn in self.waiters or conn in self.reload_waiters):
            return
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
        for conn in self.reload_waiters:
            self._reply(conn, summary)
            try:
                self._selector.unregister(conn)  # type: ignore[union-attr]
            except (KeyError, ValueError):
                pass
            conn.close()
        self.reload_waiters.clear()

    def close(self, exit_code: int) -> None:
        """Answer every ``stop --wait`` client with the exit code, then remove the socket."""
        for conn in self.waiters:
            self._reply(conn, {"ok": True, "exit_code": exit_code})
            conn.close()
        self.waiters.clear()
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(self.path)
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


    def on_reload_done(self, sup: Any, summary: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.reload_done(summary)

    def on_exit(self, sup: Any, exit_code: int) -> None:
        if self.server is not None:
            self.server.reload_done({"ok": False, "error": "ksup stopped"})
            self.server.close(exit_code)
