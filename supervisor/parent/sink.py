"""The supervisor's stderr, which never blocks the loop (parent side).

Everything the supervisor writes there (its own log lines and the workers' forwarded output)
goes through one bounded queue of bytes, written with non-blocking writes whenever the loop
comes round. A log reader that stops reading (a full pipe, a stalled journald) costs dropped
lines, counted and reported in a line of their own once output flows again; it never stalls the
loop, the control socket or the graceful timeout.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque

LIMIT_BYTES = 1 << 20  # queued and not yet written; beyond this, new lines are dropped


class Sink:
    def __init__(self, fd: int, limit: int = LIMIT_BYTES) -> None:
        self.fd, self.limit = fd, limit
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.dropped = 0
        self.broken = False  # the fd is gone (EPIPE, EBADF): drop everything quietly
        self._was_blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        """Queue ``data`` (whole lines) and write what the fd takes now."""
        if self.broken:
            return
        if self.size + len(data) > self.limit:
            self.dropped += 1
            return
        self.chunks.append(data)
        self.size += len(data)
        self.flush()

    def flush(self) -> None:
        """Write as much as the fd takes without blocking."""
        while self.chunks and not self.broken:
            chunk = self.chunks[0]
            try:
                n = os.write(self.fd, chunk)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.broken = True
                self.chunks.clear()
                self.size = 0
                return
            self.size -= n
            if n < len(chunk):
                self.chunks[0] = chunk[n:]
                return
            self.chunks.popleft()
        if self.dropped and not self.chunks:
            note = f"ksup: {self.dropped} output line(s) dropped: stderr was not being read\n".encode()
            self.dropped = 0
            self.write(note)

    def pending(self) -> bool:
        return bool(self.chunks)

    def close(self, wait_s: float = 2.0) -> None:
        """On the way out: write what is queued, waiting at most ``wait_s`` for a slow reader,
        then give the fd back as it was."""
        deadline = time.monotonic() + wait_s
        while self.chunks and not self.broken and time.monotonic() < deadline:
            try:
                select.select([], [self.fd], [], max(deadline - time.monotonic(), 0.0))
            except (OSError, ValueError):
                break
            self.flush()
        try:
            os.set_blocking(self.fd, self._was_blocking)
        except OSError:
            pass


class SinkStream:
    """A text stream for logging.StreamHandler and click that writes into a Sink."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.write(text.encode(errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass


stderr: Sink | None = None  # the supervisor process's, once installed


def install() -> Sink:
    global stderr
    if stderr is None:
        stderr = Sink(2)
    return stderr
