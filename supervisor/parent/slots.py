"""WorkerSlot: what the supervisor knows about one worker slot (parent side).

A slot (0..N-1) is stable across restarts; the process in it changes. Times are monotonic
seconds from the core's injected clock. ``state`` only moves forward for one process (see
``SlotState``); a respawn starts a new process in the same slot.

The decision fields belong to the core (``core.py``); ``proc``, ``channel``, ``stderr_buf`` and
``stderr_tail`` belong to the I/O loop (``supervisor.py``, ``worker_output.py``): the core never
reads them, so a simulation can drive the core with no process behind a slot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from supervisor.contract import messages as m
from supervisor.parent.state import After, SlotState

STDERR_TAIL_LINES = 20


@dataclass(eq=False)  # identity: the I/O loop keys its processes by slot object
class WorkerSlot:
    index: int
    state: SlotState = SlotState.EXITED
    pid: int | None = None             # set by the I/O loop once the process exists
    returncode: int | None = None      # set when the process was reaped (negative: a signal)
    spawned_at: float = 0.0
    drain_sent_at: float | None = None
    kill_at: float | None = None       # SIGKILL deadline once a drain was asked
    killed: bool = False               # we sent SIGKILL
    joined: bool = False               # told Go: a group member (or about to be)
    member: bool = False               # some process of this slot joined: under static membership
    #                                    its instance id is in the group (even dead) until its session expires
    ready_to_leave: bool = False       # drained and committed, waiting for Leave
    leave_sent: bool = False
    handler_version: str = ""          # as the worker reported it when it loaded
    in_final_drain: bool = False       # drained by the supervisor's stop (counts for its exit code)
    rejoins_to_leave: bool = False     # started during a stop only to rejoin and leave (membership.py)
    stuck_reason: str | None = None    # why we are stopping it (handler timeout, silent, boot deadline)
    stacks_asked: bool = False         # we sent SIGUSR1 (worker dumps its threads' stacks)
    respawn_at: float | None = None
    configure: m.Configure | None = None  # what this process was started with (set by the I/O loop)
    report: m.Report | None = None
    report_at: float = 0.0             # when the last report (or Loaded) arrived
    assigned_at: float | None = None   # first report with an assignment: the join is done
    then: After = After.RESTART        # what follows this process's exit
    recycle_after: int | None = None   # processed-message count that triggers a recycle
    exiting: m.Exiting | None = None
    boot_failed: m.BootFailed | None = None
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # unexpected deaths, for backoff
    held_since: float | None = None    # KIP-848: since when the broker refuses this slot's instance id
    #                                    (its workers exited INSTANCE_ID_HELD); None once one got partitions
    # I/O side (never read by the core)
    proc: Any = None
    channel: Any = None
    stderr_buf: bytes = b""
    stderr_cutting: bool = False       # inside a line that was cut at MAX_LINE: drop up to its newline
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))

    @property
    def alive(self) -> bool:
        return self.state is not SlotState.EXITED

    def advance(self, state: SlotState) -> None:
        """One-way within a process's life; ignored when it would go backwards."""
        if state.rank > self.state.rank:
            self.state = state

    def reset_for_spawn(self, now: float) -> None:
        self.state, self.spawned_at = SlotState.BOOTING, now
        self.pid = self.returncode = None
        self.drain_sent_at = self.kill_at = self.respawn_at = None
        self.stuck_reason = None
        self.killed = self.stacks_asked = self.ready_to_leave = self.leave_sent = self.joined = False
        self.report = self.exiting = self.boot_failed = None
        self.report_at, self.assigned_at, self.then = now, None, After.RESTART
        self.proc = self.channel = None
        self.stderr_buf, self.stderr_cutting = b"", False
        self.stderr_tail.clear()
