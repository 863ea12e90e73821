"""The parent's rules as they were before issue 13 (commit a188b2a), ported to the core's
interface, for showing that the simulation finds the old bugs. Used by the tests only.

What the Hypothesis machine reported against these rules (shrunk stories; 14 runs of 300
examples each, 2026-11-24):
- "a worker that cannot boot left ksup starting for 25s": start, the worker dies (or hangs) at
  import, time passes (finding 3);
- "worker 1 told to join although the target is 1 workers (scale down already decided)": 2
  workers, the handler fails on every message, SIGTTOU, 5 s (finding 2); also reload x2,
  scale 3, scale 1;
- "partition 0 without a consumer for 33s": 2 workers, a reload, SIGKILL of worker 0, 40 s:
  the restart waits behind the roll (findings 1 and 3); also SIGKILL then a boot hang;
- "an always-failing handler was not detected as a crash loop within 90s": 2 workers, 1
  partition, the handler fails on every message, a reload, 95 s: restarts wait behind the roll,
  deaths stop (finding 1: crash loops hidden by the membership rule);
- "processes left behind at exit: [105]" (a crash-loop halt while a restart was due; not
  analysed further: it may come from mixing the old rule with the new core).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from supervisor.parent import membership, policy, readiness, worker_events
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import After, SlotState, State

if TYPE_CHECKING:
    import pytest

    from supervisor.parent.core import SupervisorCore


def old_manage(core: SupervisorCore) -> None:
    """membership.manage at a188b2a: nothing else changes while any change is in progress, a
    restart included; a loaded slot is told Go whatever the target."""
    now = core.now
    if core.state is State.STOPPING:
        if not any(s.alive for s in core.processes()):
            core.state = State.STOPPED
        return
    if core.state is State.STARTING:
        if all(s.state is SlotState.LOADED for s in core.slots):
            core.state = State.RUNNING
            for slot in core.slots:
                core.go(slot)
        return
    for slot in core.slots:
        if slot.state is SlotState.LOADED and not slot.joined:
            core.go(slot)
    if core.rolling() or membership.change_in_progress(core):
        return
    for slot in core.slots:
        if not slot.alive and slot.respawn_at is not None and now >= slot.respawn_at:
            slot.restarts += 1
            core.spawn(slot)
            return
    if any(not s.alive and s.respawn_at is not None for s in core.slots):
        return
    if len(core.slots) < core.target_workers:
        used = {s.index for s in core.slots}
        slot = WorkerSlot(min(i for i in range(len(core.slots) + 1) if i not in used))
        core.slots.append(slot)
        core.slots.sort(key=lambda s: s.index)
        core.spawn(slot)
        return
    live = [s for s in core.slots if s.then is not After.REMOVE]
    if len(live) > core.target_workers:
        victim = max(live, key=lambda s: s.index)
        victim.then = After.REMOVE
        if victim.alive:
            core.drain_slot(victim, "scale down", core.settings.worker_drain_timeout, core.settings.graceful_timeout)
        else:
            core.slots.remove(victim)


def old_change_in_progress(core: SupervisorCore) -> bool:
    for s in core.slots:
        if s.alive and (s.drain_sent_at is not None or s.assigned_at is None) \
                and core.now - s.spawned_at < membership.CHANGE_SETTLE_MAX_S:
            return True
    return False


def old_roll_gate(slots: list[WorkerSlot], incoming: WorkerSlot, old_assignment: list[str], static: bool,
                  steady_since: float | None, now: float) -> tuple[bool, float | None]:
    """The roll's gate at a188b2a: the new worker has its assignment and the supervisor is
    settled (its workers own every partition). With a dead worker's member still holding its
    partitions it is not: here, every slot has a live worker with an assignment."""
    settled = all(s.alive and s.assigned_at is not None for s in slots)
    return incoming.assigned_at is not None and settled, steady_since


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the old rules in place: the old membership rule, the old roll gate, no halt for a
    worker that dies while starting (its exit was ignored), no boot deadline."""
    monkeypatch.setattr(readiness, "roll_gate", old_roll_gate)
    monkeypatch.setattr(membership, "manage", old_manage)
    monkeypatch.setattr(membership, "change_in_progress", old_change_in_progress)
    monkeypatch.setattr(policy, "boot_deadline", lambda s: float("inf"))
    real_on_exit = worker_events.on_exit

    def on_exit(core: SupervisorCore, event: Any) -> None:
        if core.state is State.STARTING and event.slot in core.slots:
            event.slot.state = SlotState.EXITED  # the old reaper: logged, then nothing followed
            event.slot.returncode = event.returncode
            return
        real_on_exit(core, event)

    monkeypatch.setattr(worker_events, "on_exit", on_exit)
