"""Both ends of the supervisor <-> worker socket pair.

A ``Channel`` wraps one non-blocking AF_UNIX stream socket. ``send`` never blocks for long and
never raises on a dead peer (it returns False); ``read_available`` returns the complete
messages received so far and ``closed`` once the peer is gone. The reaper, not the channel,
decides what a dead peer means.
"""

from __future__ import annotations

import os
import socket

from supervisor.contract import codec
from supervisor.contract import messages as m

# A worker's Configure can carry a few KB; reports are small. The cap protects the supervisor
# from a worker that writes garbage without newlines.
_MAX_LINE = 1 << 20


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = b""
        self.closed = False

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
        (a worker's bug must not take the supervisor down)."""
        out: list[m.Message] = []
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
                except codec.CodecError:
                    continue
        return out

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
