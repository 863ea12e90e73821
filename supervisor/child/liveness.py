"""Orphan protection for a worker (child side).

A worker must never outlive its supervisor silently: the kernel sends it SIGTERM when the
supervisor dies (Linux ``PR_SET_PDEATHSIG``), and the loop also compares ``getppid()`` with the
pid it was started by, which covers the race where the parent died before prctl ran.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def ask_kernel_for_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the getppid() check still works


class ParentWatch:
    def __init__(self) -> None:
        self.parent_pid = os.getppid()

    def orphaned(self) -> bool:
        return os.getppid() != self.parent_pid
