"""Signal handling for the supervisor (parent side).

Every signal is counted from ``signal.set_wakeup_fd``: CPython's C-level handler writes the
signal's number to a pipe each time the signal is delivered, and the main loop selects on that
pipe together with the worker pipes, reads the numbers and acts. The Python-level handler does
nothing: CPython runs it once for all deliveries of one signal since the main thread last checked
(a flag, not a count), so three SIGTTIN sent while the loop was busy used to count as one.

The kernel still keeps only one pending instance of each signal: deliveries faster than the
process is scheduled merge before any handler runs. ``ksup scale N`` is the exact way to scale.
"""

from __future__ import annotations

import os
import signal

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
           signal.SIGTTIN, signal.SIGTTOU)


class SignalQueue:
    """The signals delivered since the last ``take()``, in order, one entry per delivery.

    Bounded by the pipe (64 KiB on Linux): a delivery that finds it full is dropped by CPython,
    which needs 65,536 signals between two turns of the loop."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def _record(self, signum: int, frame: object) -> None:
        """Installed so the signal's default action is not taken. The count is the pipe's."""

    def install(self) -> None:
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._record)

    def take(self) -> list[int]:
        """Every signal number written since the last call. Reading the pipe is one step per
        chunk, so a delivery during the read is either in this chunk or left for the next."""
        taken: list[int] = []
        try:
            while chunk := os.read(self.read_fd, 4096):
                taken += chunk
        except (BlockingIOError, InterruptedError):
            pass
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
