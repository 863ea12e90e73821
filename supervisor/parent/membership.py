"""Group membership changes (parent side): start, restart, recycle and scale workers, at most one
change at a time, so the group rebalances once per change instead of in a storm. Called from
the Supervisor's loop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from supervisor.parent import policy
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import State

if TYPE_CHECKING:
    from supervisor.parent.supervisor import Supervisor

log = logging.getLogger("ksup.supervisor")

CHANGE_SETTLE_MAX_S = 60.0  # a membership change counts as done after this long regardless


def manage(sup: Supervisor, now: float) -> None:
    """Start, restart, recycle and scale workers: at most one group-membership change at a
    time, so the group rebalances once per change instead of in a storm."""
    if sup.state is State.STOPPING:
        if not any(s.alive for s in sup.slots):
            sup.state = State.STOPPED
        return
    if sup.state is State.STARTING:
        if all(s.state == "loaded" for s in sup.slots):
            sup.state = State.RUNNING
            log.info("all %d workers loaded: joining group %s", len(sup.slots), sup.settings.group)
            for slot in sup.slots:
                sup.go(slot)
        return
    for slot in sup.slots:
        if slot.state == "loaded" and not slot.joined:
            sup.go(slot)
    if sup.rolling() or change_in_progress(sup, now):
        return
    for slot in sup.slots:
        if not slot.alive and slot.respawn_at is not None and now >= slot.respawn_at:
            slot.restarts += 1
            sup.spawn(slot, now)
            return
    if any(not s.alive and s.respawn_at is not None for s in sup.slots):
        # A dead worker's (static) membership holds up every rebalance until it is back or its
        # session expires: bring it back before anything else changes the group.
        return
    if len(sup.slots) < sup.target_workers:
        used = {s.index for s in sup.slots}
        slot = WorkerSlot(min(i for i in range(len(sup.slots) + 1) if i not in used))
        sup.slots.append(slot)
        sup.slots.sort(key=lambda s: s.index)
        sup.spawn(slot, now)
        return
    live = [s for s in sup.slots if s.then != "remove"]
    if len(live) > sup.target_workers:
        victim = max(live, key=lambda s: s.index)
        victim.then = "remove"
        if victim.alive:
            sup.drain_slot(victim, "scale down", sup.settings.worker_drain_timeout,
                            sup.settings.graceful_timeout)
        else:
            sup.slots.remove(victim)
        return
    for slot in sup.slots:
        why = policy.recycle_reason(slot, sup.settings)
        if slot.alive and slot.joined and why:
            slot.then = "recycle"
            log.info("worker %d (pid %d) recycles: %s", slot.index, slot.pid, why)
            sup.drain_slot(slot, f"recycle: {why}", sup.settings.worker_drain_timeout,
                            sup.settings.graceful_timeout)
            return

def change_in_progress(sup: Supervisor, now: float) -> bool:
    """A worker is booting, joining (no assignment yet) or draining out of the group."""
    for s in sup.slots:
        if s.alive and (s.drain_sent_at is not None or s.assigned_at is None) \
                and now - s.spawned_at < CHANGE_SETTLE_MAX_S:
            return True
    return False
