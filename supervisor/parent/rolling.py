"""Rolling reload (parent side): replace every worker, one slot at a time, with a fresh process
that imports the code installed now.

For each slot, in order:
1. ``boot``: start the incoming process next to the old one. It imports the handler, creates its
   Consumer and checks the broker, then waits: it has not joined the group, so it shares its
   ``group.instance.id`` with no live member. If it cannot boot, the roll stops here and the
   old worker keeps running (nothing was lost, nothing changed).
2. ``drain``: the old worker drains (finish in flight, store, commit, close). Under static
   membership it does not leave the group, so nothing is rebalanced.
3. ``join``: once the old process has exited, the incoming one takes the slot and joins; under
   static membership it gets the same partitions back. The next slot waits for the gate of
   ``readiness.roll_gate``: static, the new worker got its partitions back; dynamic, the group
   rebalanced to stable as every worker of this ksup sees it (never "this ksup owns every
   partition": other ksup instances may share the group). A crash here stops the roll.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supervisor.parent import readiness
from supervisor.parent.slots import WorkerSlot

if TYPE_CHECKING:
    from supervisor.parent.supervisor import Supervisor

log = logging.getLogger("ksup.supervisor")

JOIN_TIMEOUT_S = 120.0  # an incoming worker without an assignment after this long fails the roll


@dataclass
class SlotResult:
    slot: int
    old_pid: int | None
    new_pid: int | None = None
    gap_s: float | None = None  # from the old worker's drain request to the new one's assignment
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "old_pid": self.old_pid, "new_pid": self.new_pid,
                "gap_s": None if self.gap_s is None else round(self.gap_s, 3), "error": self.error}


@dataclass
class Roll:
    queue: list[int]
    started_at: float
    phase: str = "boot"
    current: int | None = None
    incoming: WorkerSlot | None = None
    old: WorkerSlot | None = None
    drain_started: float = 0.0
    old_assignment: list[str] = field(default_factory=list)  # what the replaced worker owned
    steady_since: float | None = None  # the gate: since when every worker is in the group
    results: list[SlotResult] = field(default_factory=list)
    error: str | None = None
    done: bool = False

    def summary(self) -> dict[str, Any]:
        return {"ok": self.error is None, "error": self.error,
                "slots": [r.as_dict() for r in self.results],
                "seconds": round(time.monotonic() - self.started_at, 3)}


def start_roll(sup: Supervisor) -> Roll:
    roll = Roll(queue=sorted(s.index for s in sup.slots if s.alive), started_at=time.monotonic())
    log.info("rolling reload of %d worker(s) begins", len(roll.queue))
    return roll


def step(sup: Supervisor, roll: Roll, now: float) -> None:
    """Advance the roll by whatever is possible now. Called from the supervisor loop."""
    if roll.done:
        return
    if roll.phase == "boot" and roll.incoming is None:
        _begin_slot(sup, roll, now)
    elif roll.phase == "boot":
        _check_boot(sup, roll)
    elif roll.phase == "drain":
        _check_drain(sup, roll, now)
    elif roll.phase == "join":
        _check_join(sup, roll, now)


def _begin_slot(sup: Supervisor, roll: Roll, now: float) -> None:
    while roll.queue:
        index = roll.queue.pop(0)
        old = next((s for s in sup.slots if s.index == index and s.alive and s.joined), None)
        if old is None:
            continue  # gone meanwhile (scaled down, or dead and restarting with new code anyway)
        roll.current, roll.old = index, old
        roll.results.append(SlotResult(index, old.pid))
        incoming = WorkerSlot(index, restarts=old.restarts)
        sup.spawn(incoming, now)  # not in sup.slots until the old process has gone
        roll.incoming, roll.phase = incoming, "boot"
        roll.results[-1].new_pid = incoming.pid
        log.info("reload: worker %d: new process %s is booting next to %d", index, incoming.pid, old.pid)
        return
    finish(sup, roll, None)


def _check_boot(sup: Supervisor, roll: Roll) -> None:
    incoming, old = roll.incoming, roll.old
    assert incoming is not None and old is not None
    if incoming.boot_failed is not None or (incoming.proc is not None and incoming.proc.poll() is not None):
        why = incoming.boot_failed.reason if incoming.boot_failed else "the new process exited while booting"
        sup.kill(incoming, 15)
        forget(sup, incoming)
        finish(sup, roll, f"worker {roll.current}: {why}; the old worker keeps running")
        return
    if incoming.state == "loaded":
        roll.phase, roll.drain_started = "drain", time.monotonic()
        roll.old_assignment = list(old.report.assignment) if old.report is not None else []
        roll.steady_since = None
        sup.drain_slot(old, "rolling reload", sup.settings.worker_drain_timeout, sup.settings.graceful_timeout)
        old.then = "replaced"


def _check_drain(sup: Supervisor, roll: Roll, now: float) -> None:
    old, incoming = roll.old, roll.incoming
    assert old is not None and incoming is not None
    if old.alive:
        return
    if incoming.proc is None or incoming.proc.poll() is not None:
        finish(sup, roll, f"worker {roll.current}: the new process died before joining")
        return
    # The old process is gone: only now may its successor use the slot's group.instance.id.
    position = sup.slots.index(old)
    sup.slots[position] = incoming
    sup.go(incoming)
    roll.phase = "join"


def _check_join(sup: Supervisor, roll: Roll, now: float) -> None:
    incoming = roll.incoming
    assert incoming is not None
    if not incoming.alive:
        finish(sup, roll, f"worker {roll.current}: the new process died after joining")
        return
    passed, roll.steady_since = readiness.roll_gate(sup, incoming, roll.old_assignment,
                                                    sup.settings.static_membership, roll.steady_since, now)
    if passed and incoming.assigned_at is not None:
        roll.results[-1].gap_s = incoming.assigned_at - roll.drain_started
        log.info("reload: worker %d replaced (pid %s -> %s), partitions without a consumer for %.3fs",
                 roll.current, roll.results[-1].old_pid, incoming.pid, roll.results[-1].gap_s)
        roll.incoming = roll.old = None
        roll.phase = "boot"
    elif now - incoming.spawned_at > JOIN_TIMEOUT_S:
        finish(sup, roll, f"worker {roll.current}: no assignment {JOIN_TIMEOUT_S:.0f}s after joining")


def finish(sup: Supervisor, roll: Roll, error: str | None) -> None:
    roll.error, roll.done = error, True
    if error:
        if roll.results:
            roll.results[-1].error = error
        log.error("rolling reload stopped: %s", error)
    else:
        log.info("rolling reload done: %d worker(s) replaced in %.1fs", len(roll.results),
                 time.monotonic() - roll.started_at)
    sup.hooks.on_reload_done(sup, roll.summary())


def forget(sup: Supervisor, slot: WorkerSlot) -> None:
    """Drop a process that never made it into the slot list (after it exits)."""
    if slot.proc is not None:
        try:
            slot.proc.wait(5)
        except Exception:
            slot.proc.kill()
            slot.proc.wait(5)
    for obj in (slot.channel, slot.proc.stderr if slot.proc else None):
        if obj is not None:
            try:
                sup.selector.unregister(obj)
            except (KeyError, ValueError):
                pass
    if slot.channel is not None:
        slot.channel.close()
