"""Signal handling for the supervisor (parent side).

The handlers only record the signal number; the main loop wakes up through
``signal.set_wakeup_fd`` on a pipe it selects on together with the worker pipes, and acts.
"""

from __future__ import annotations

import os
import signal
from collections import deque

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGTTIN, signal.SIGTTOU)


class SignalQueue:
    def __init__(self) -> None:
        # A deque: the handler appends and take() pops, each one atomic operation, so a signal
        # that arrives while the loop takes is either taken now or left for the next take.
        self.pending: deque[int] = deque()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def _record(self, signum: int, frame: object) -> None:
        """Runs in signal context: NO LOGGING, no locks, just record."""
        self.pending.append(signum)

    def install(self) -> None:
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._record)

    def take(self) -> list[int]:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        taken = []
        while self.pending:
            taken.append(self.pending.popleft())
        return taken

    def uninstall(self, ignore: bool = False) -> None:
        """Stop listening. ``ignore``: on the way out, after the receipt is written, a late
        SIGTERM/SIGINT must not turn our exit code into 143/130, so they stay ignored."""
        for sig in HANDLED:
            keep = ignore and sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
            signal.signal(sig, signal.SIG_IGN if keep else signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.close(self.read_fd)
        os.close(self.write_fd)
