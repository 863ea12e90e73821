"""What goes into the parent's core (events) and what comes out (actions). Plain data, no I/O.

The I/O loop (``supervisor.py``) turns what it sees (a worker's message, a reaped process, a
signal, the clock, a control-socket command) into events for ``SupervisorCore.handle`` and
carries out the actions the core returns, in order. A simulation does the same without any
process (``tests/sim``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from supervisor.contract import messages as m
from supervisor.parent.slots import WorkerSlot

# ---- events (in) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerMessage:
    slot: WorkerSlot
    msg: m.Message


@dataclass(frozen=True)
class WorkerExited:
    """The process in ``slot`` was reaped. ``inflight``: the messages its in-flight board held
    (topic, partition, offset); ``tail``: its last lines of output, for the death report."""

    slot: WorkerSlot
    returncode: int
    inflight: list[tuple[str, int, int]] = field(default_factory=list)
    tail: str = ""


@dataclass(frozen=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True)
class Tick:
    """Time passed (the clock is the ``now`` given with every event)."""


@dataclass(frozen=True)
class Scale:
    workers: int


@dataclass(frozen=True)
class Reload:
    pass


@dataclass(frozen=True)
class Stop:
    reason: str
    quick: bool = False
    timeout: float | None = None


@dataclass(frozen=True)
class LeftoverMembers:
    """The broker's answer at start (adapters/leftovers.py): slots above --workers whose static
    member a previous ksup left in the group."""

    slots: tuple[int, ...]


Event = WorkerMessage | WorkerExited | SignalReceived | Tick | Scale | Reload | Stop | LeftoverMembers


# ---- actions (out) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spawn:
    """Start a fresh worker process for ``slot`` (already reset by the core) with the poison
    list; the I/O loop sets ``slot.pid``."""

    slot: WorkerSlot
    poison: tuple[tuple[str, int, int], ...] = ()
    # Batch mode: records of a batch that was in flight when a worker died; each runs alone
    # (a batch of one) so that the next death names the poison one.
    suspects: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class Send:
    slot: WorkerSlot
    msg: m.ToWorker


@dataclass(frozen=True)
class Kill:
    """Send ``sig`` to the worker; ``group``: to its whole process group (its own children
    too: workers run in sessions of their own)."""

    slot: WorkerSlot
    sig: int
    group: bool = False


@dataclass(frozen=True)
class Notify:
    """Call the adapters' hook ``name`` (see ``hooks.Hooks``) with ``args`` after ``sup``."""

    name: str
    args: tuple[Any, ...] = ()


Action = Spawn | Send | Kill | Notify
