"""Both ends of the supervisor <-> worker socket pair.

A ``Channel`` wraps one non-blocking AF_UNIX stream socket. ``send`` never blocks for long and
never raises on a dead peer (it returns False); ``read_available`` returns the complete
messages received so far and ``closed`` once the peer is gone. The reaper, not the channel,
decides what a dead peer means.

A line that does not decode (a peer's bug, or a message type from a newer release) is skipped
and counted in ``decode_errors``, and logged at most ``_LOG_BURST`` times per ``_LOG_WINDOW_S``
(the count of the ones not logged goes into the next line): a peer writing garbage can neither
flood the log nor stall the reader. A Configure of an incompatible protocol version is kept in
``incompatible`` for the worker to refuse.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from supervisor.contract import codec
from supervisor.contract import messages as m

# A worker's Configure can carry a few KB; reports are small. The cap protects the supervisor
# from a worker that writes garbage without newlines.
_MAX_LINE = 1 << 20
_LOG_BURST = 3
_LOG_WINDOW_S = 10.0

log = logging.getLogger("ksup.channel")


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = b""
        self.closed = False
        self.decode_errors = 0
        self.incompatible: codec.IncompatibleVersion | None = None
        self._log_window_start = -_LOG_WINDOW_S
        self._logged_in_window = 0
        self._not_logged = 0
        self._unread: list[m.Message] = []  # given back by a reader that stopped at one message

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: m.Message) -> bool:
        """Send one message. False if the peer is gone (the caller carries on)."""
        if self.closed:
            return False
        data = codec.encode(msg)
        try:
            # Blocking just for this write keeps message boundaries whole; messages are small
            # and the peer drains its end every loop iteration.
            self.sock.setblocking(True)
            self.sock.settimeout(5.0)
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False
        finally:
            try:
                self.sock.setblocking(False)
            except OSError:
                self.closed = True

    def read_available(self) -> list[m.Message]:
        """Every complete message received so far; never blocks. Malformed lines are skipped
        and logged, rate-limited (a worker's bug must not take the supervisor down)."""
        out, self._unread = self._unread, []
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self._buf += chunk
            if len(self._buf) > _MAX_LINE and b"\n" not in self._buf:
                self._buf = b""
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    out.append(codec.decode(line))
                except codec.IncompatibleVersion as exc:
                    self.incompatible = exc
                except codec.CodecError as exc:
                    self._decode_error(exc)
        return out

    def unread(self, msgs: list[m.Message]) -> None:
        """Give back messages read but not handled: the next ``read_available`` returns them
        first, in order."""
        self._unread = list(msgs) + self._unread

    def _decode_error(self, exc: codec.CodecError) -> None:
        self.decode_errors += 1
        now = time.monotonic()
        if now - self._log_window_start >= _LOG_WINDOW_S:
            self._log_window_start, self._logged_in_window = now, 0
        if self._logged_in_window >= _LOG_BURST:
            self._not_logged += 1
            return
        self._logged_in_window += 1
        skipped = f" ({self._not_logged} more not logged)" if self._not_logged else ""
        self._not_logged = 0
        log.warning("skipped a line from the peer that is not a ksup message: %s%s", exc, skipped)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def socket_pair() -> tuple[Channel, socket.socket]:
    """The supervisor's end as a Channel, and the raw socket to pass to the child (inheritable)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    os.set_inheritable(child.fileno(), True)
    return Channel(parent), child
