"""``--on-worker-exit CMD``: a user hook run by the supervisor whenever a worker process ends
(parent side). The command runs through the shell, without blocking the loop, with the details
in its environment: KSUP_SLOT, KSUP_PID, KSUP_EXIT_CODE (empty when killed), KSUP_SIGNAL (empty
when it exited), KSUP_REASON, KSUP_IN_FLIGHT (topic[partition]@offset, when known).
(The hook on worker start is the handler class's ``setup()``, which runs in the worker.)"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any

from supervisor.contract import inflight_board
from supervisor.parent.hooks import Hooks

log = logging.getLogger("ksup.supervisor")


MAX_RUNNING = 8    # hooks running at once; a death beyond that gets none (said in the log)
EXIT_WAIT_S = 5.0  # at ksup's exit, for all hooks still running together; then their groups are killed


class WorkerExitCommand(Hooks):
    """Each run is a session of its own, whose process group id is its shell's pid. A run counts
    until every process of its group ended: what a command starts in the background (``cmd &``,
    the usual way not to block) counts against MAX_RUNNING and goes with the group at exit."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.groups: list[int] = []  # process groups of runs with a process alive
        self._shells: list[subprocess.Popen[bytes]] = []  # reaped here when ksup's waitpid(-1) did not

    def on_worker_exit(self, sup: Any, slot: Any, report: Any) -> None:
        env_inflight = _in_flight(slot)
        env = {**os.environ,
               "KSUP_SLOT": str(slot.index), "KSUP_PID": str(slot.pid),
               "KSUP_EXIT_CODE": "" if report.code is None else str(report.code),
               "KSUP_SIGNAL": "" if report.signal is None else signal.Signals(report.signal).name,
               "KSUP_REASON": slot.exiting.reason if slot.exiting is not None else report.describe(),
               "KSUP_IN_FLIGHT": env_inflight}
        self.on_tick(sup)
        if len(self.groups) >= MAX_RUNNING:
            # Hooks that do not end (a stuck script, a stdout nobody reads) must not pile up.
            log.warning("--on-worker-exit not run for worker %d (pid %s): %d earlier runs have not ended",
                        slot.index, slot.pid, len(self.groups))
            return
        try:
            shell = subprocess.Popen(self.command, shell=True, env=env, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        except OSError as exc:
            log.warning("--on-worker-exit could not run: %s", exc)
            return
        self._shells.append(shell)
        self.groups.append(shell.pid)

    def on_tick(self, sup: Any) -> None:
        self._shells = [p for p in self._shells if p.poll() is None]
        self.groups = [g for g in self.groups if _group_alive(g)]

    def on_exit(self, sup: Any, exit_code: int) -> None:
        """Give the runs still going EXIT_WAIT_S in all, then kill each one's process group (the
        shell and what it started). Runs after the receipt is written."""
        deadline = time.monotonic() + EXIT_WAIT_S
        self.on_tick(sup)
        while self.groups and time.monotonic() < deadline:
            time.sleep(0.05)  # paces the check: ksup is exiting, its loop has nothing left to serve
            self.on_tick(sup)
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.groups = []
        for shell in self._shells:
            shell.poll()


def _group_alive(pgid: int) -> bool:
    """A process of group ``pgid`` still exists. (A group id is not handed out again while any
    process of the group lives, so a live group is still the hook's.)"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # gone (PermissionError: the id is another user's now)
        return False
    return True


def _in_flight(slot: Any) -> str:
    """What the worker held when it ended: its in-flight board (written by the handler thread as
    a message starts, so right even for a worker that went silent before reporting it), else its
    last report. Several messages (``--concurrency``) are comma-separated."""
    board = slot.configure.options.get("board") if slot.configure is not None else None
    held = inflight_board.read(str(board)) if board else []
    if held:
        return ", ".join(f"{t}[{p}]@{o}" for t, p, o in held)
    inflight = slot.report.in_flight if slot.report is not None else None
    return f"{inflight.topic}[{inflight.partition}]@{inflight.offset}" if inflight else ""
