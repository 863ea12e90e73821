"""WorkerSlot: what the supervisor knows about one worker slot (parent side; no I/O here).

A slot (0..N-1) is stable across restarts; the process in it changes. Times are monotonic
seconds. ``state`` only moves forward for one process: booting -> loaded -> running ->
draining -> exited; a respawn starts a new process in the same slot.
"""

from __future__ import annotations

import subprocess
from collections import deque
from dataclasses import dataclass, field

from supervisor.contract import messages as m
from supervisor.contract.channel import Channel

STATES = ("booting", "loaded", "running", "draining", "exited")
STDERR_TAIL_LINES = 20


@dataclass
class WorkerSlot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: Channel | None = None
    state: str = "exited"
    spawned_at: float = 0.0
    drain_sent_at: float | None = None
    kill_at: float | None = None       # SIGKILL deadline once a drain was asked
    killed: bool = False               # we sent SIGKILL
    joined: bool = False               # told Go: a group member (or about to be)
    ready_to_leave: bool = False       # drained and committed, waiting for Leave
    leave_sent: bool = False
    handler_version: str = ""          # as the worker reported it when it loaded
    in_final_drain: bool = False       # drained by the supervisor's stop (counts for its exit code)
    stuck_reason: str | None = None    # why we are stopping it (handler timeout, silent)
    stacks_asked: bool = False         # we sent SIGUSR1 (worker dumps its threads' stacks)
    respawn_at: float | None = None
    configure: m.Configure | None = None  # what this process was started with
    report: m.Report | None = None
    report_at: float = 0.0             # when the last report (or Loaded) arrived
    assigned_at: float | None = None   # first report with an assignment: the join is done
    then: str = "restart"              # after this process exits: restart | recycle | remove
    recycle_after: int | None = None   # processed-message count that triggers a recycle
    exiting: m.Exiting | None = None
    boot_failed: m.BootFailed | None = None
    stderr_buf: bytes = b""
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # unexpected deaths, for backoff

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.state != "exited"

    def advance(self, state: str) -> None:
        """One-way within a process's life; ignored when it would go backwards."""
        if STATES.index(state) > STATES.index(self.state):
            self.state = state

    def reset_for_spawn(self, proc: subprocess.Popen[bytes], channel: Channel, now: float) -> None:
        self.proc, self.channel = proc, channel
        self.state, self.spawned_at = "booting", now
        self.drain_sent_at = self.kill_at = self.respawn_at = None
        self.stuck_reason = None
        self.killed = self.stacks_asked = self.ready_to_leave = self.leave_sent = self.joined = False
        self.report = self.exiting = self.boot_failed = None
        self.report_at, self.assigned_at, self.then = now, None, "restart"
        self.stderr_buf = b""
        self.stderr_tail.clear()
