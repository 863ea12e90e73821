"""What a ``ksup verify`` run does (its plan) and how a run can end early.

Faults come in two sorts. Scheduled ones are injected by verify, one at a time: after each, the
run waits until its ksup is ready again (``ready`` on the control socket, the readiness of the
README), so every gap and duplicate is the outcome of one fault, never of two on top of each
other. Message faults ride on messages (the recording handler raises on, hangs on or dies on the ones
verify marked; one kind kills its worker), spread evenly over the sequence numbers and, when handled, at least
MESSAGE_FAULT_SPACING_S apart per kind (a marked message that comes sooner is handled without
its fault; the report counts the faults that happened).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from enum import Enum


class Fault(str, Enum):
    SIGTERM = "sigterm"                  # SIGTERM to ksup, then a new ksup
    KILL = "kill"                        # SIGKILL of one worker
    SUPERVISOR_KILL = "supervisor-kill"  # SIGKILL of ksup: its workers exit by themselves, then a new ksup
    RELOAD = "reload"                    # rolling reload
    SCALE = "scale"                      # one worker more, next time one fewer
    SCALE_FLAP = "scale-flap"            # up by two and straight back down
    EXCEPTION = "exception"              # messages whose handler raises once
    HANG = "hang"                        # messages whose handler hangs once (--handler-timeout ends it)
    POISON = "poison"                    # messages that kill their worker once (SIGKILL mid-handler)
    BROKER_RESTART = "broker-restart"    # the user's --broker-restart-command
    BROKER_PAUSE = "broker-pause"        # the user's --broker-pause-command, 5 s, --broker-resume-command


@dataclass(frozen=True)
class MessageFault:
    """How a message fault rides on its messages: the value's suffix the producer adds, the
    marker the recording handler leaves when it happened (``record.txt.<marker>-P-O``), one
    marked message per ``every`` messages, placed at ``shift`` (0..1) of its share of the
    sequence so that kinds do not fall on the same messages."""

    suffix: str
    marker: str
    every: int
    shift: float


MESSAGE_FAULT_KINDS = {
    Fault.EXCEPTION: MessageFault(":fail", "failed", 5_000, 0.0),
    # fewer: each costs a --handler-timeout and a worker restart
    Fault.HANG: MessageFault(":hang", "hung", 20_000, 0.5),
    # a worker killed by its own message: no drain, in flight at death (the supervisor notes it)
    Fault.POISON: MessageFault(":poison", "poisoned", 20_000, 0.75),
}
MESSAGE_FAULTS = tuple(MESSAGE_FAULT_KINDS)
NEEDS_COMMAND = (Fault.BROKER_RESTART, Fault.BROKER_PAUSE)
DEFAULT_FAULTS = tuple(f for f in Fault if f not in NEEDS_COMMAND)

PROGRESS_EVERY_S = 10.0   # a progress line on stderr at least this often (soak runs, logs)
HANDLER_TIMEOUT_S = 3.0   # verify's ksup stops a hung handler after this long
BROKER_PAUSE_S = 5.0      # how long a broker-pause fault keeps the broker paused
COMMAND_TIMEOUT_S = 300.0  # a broker command must return within this
READY_WAIT_S = 90.0       # after a fault, its ksup must be ready again within this
MESSAGE_FAULT_SPACING_S = 2.0  # message faults of one kind at least this far apart (recorder.py)


@dataclass
class Plan:
    bootstrap: str
    messages: int = 20_000
    partitions: int = 8
    workers: int = 4
    rate: int = 2_000            # messages produced per second
    faults: tuple[Fault, ...] = DEFAULT_FAULTS
    fault_interval: float = 3.0  # seconds between the end of one scheduled fault and the next
    seed: int = 1
    kafka: dict[str, str] = field(default_factory=dict)
    keep_topic: bool = False
    handler_sleep: float = 0.0005
    timeout: float = 600.0
    broker_restart_command: str | None = None  # a shell command; returns once the broker is back
    max_gap: float = 10.0  # the verdict fails when a partition waited longer than this for a consumer
    broker_pause_command: str | None = None   # freezes a broker (e.g. ssh B kill -STOP <pid>)
    broker_resume_command: str | None = None  # and thaws it

    @property
    def scheduled(self) -> list[Fault]:
        return [f for f in self.faults if f not in MESSAGE_FAULTS]


class CouldNotRun(Exception):
    """The run could not go on (its ksup died, the producer failed, the broker is gone): no
    verdict about loss; verify exits COULD_NOT_RUN with this reason."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop cleanly, still report what was seen."""


class Cancel:
    """SIGTERM/SIGINT handler that only records; the run's loops and waits call ``check`` (or
    ``sleep``) and end with Interrupted in ordinary code, never inside a Kafka call."""

    def __init__(self) -> None:
        self.reason = ""

    def __call__(self, signum: int, frame: object) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def check(self) -> None:
        if self.reason:
            raise Interrupted(self.reason)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))
