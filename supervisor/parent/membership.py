"""The membership rule (parent side, sans I/O): start, restart, recycle and scale workers.

- Restarts never wait. A dead slot's (static) member holds up every rebalance of the group until
  it is back or its session expires, so its restart must not queue behind another member's join
  (that join waits for the dead member: a deadlock for a whole session timeout, and crash loops
  hidden behind 45 s gaps between deaths).
- A slot being removed never joins: the slots above the target that are not in the group now
  (booting, loaded, dead) go at once, drained before they are told Go or not restarted; a
  rolling reload does not replace them either. Except a slot whose static member is still in the
  group (its process died without leaving): until a process rejoins with its instance id, the
  broker keeps its partitions and every rebalance waits for it (classic protocol) until its
  session expires. Such a slot is restarted and rejoins first, then leaves for good like any
  joined slot (one boot instead of a whole session timeout without a consumer).
- At a stop, a dead slot that will not come back (above the configured --workers) but whose
  static member is still in the group is started once more, only to rejoin and leave: else the
  member would keep its partitions from the next ksup until its session expires.
- Everything else that changes the group (a new slot joining, a joined slot leaving, a recycle)
  happens one change at a time, so the group rebalances once per change instead of in a storm.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from supervisor.parent import policy
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import After, SlotState, State

if TYPE_CHECKING:
    from supervisor.config import Settings
    from supervisor.parent.core import SupervisorCore

log = logging.getLogger("ksup.supervisor")

CHANGE_SETTLE_MAX_S = 60.0  # a membership change counts as done after this long regardless
# A worker started at a stop only to rejoin and leave: boot, join and leave within this, or it is
# killed (its member then stays until its session expires; it handled nothing, so nothing is lost).
REJOIN_TO_LEAVE_S = 20.0


def manage(core: SupervisorCore) -> None:
    now = core.now
    if core.state is State.STOPPING:
        rejoin_to_leave(core)
        if not any(s.alive for s in core.processes()):
            core.state = State.STOPPED
        return
    if core.state is State.STARTING:
        if all(s.state is SlotState.LOADED for s in core.slots):
            core.state = State.RUNNING
            log.info("all %d workers loaded: joining group %s", len(core.slots), core.settings.group)
            for slot in core.slots:
                core.go(slot)
            add_leftovers(core, core.leftovers_waiting)
        return
    if core.state is not State.RUNNING:
        return
    scale_down_unjoined(core)
    for slot in core.slots:
        if slot.state is SlotState.LOADED and not slot.joined and slot.then is not After.REMOVE \
                and (not above_target(core, slot) or must_rejoin(core, slot)):
            core.go(slot)
    current = core.roll.current if core.rolling() and core.roll is not None else None
    for slot in core.slots:
        if not slot.alive and slot.respawn_at is not None and now >= slot.respawn_at and slot.index != current:
            slot.restarts += 1
            core.spawn(slot)
    if core.rolling() or change_in_progress(core):
        return
    if any(not s.alive and s.respawn_at is not None for s in core.slots):
        return  # bring the dead back before anything else changes the group
    if len(core.slots) < core.target_workers:
        used = {s.index for s in core.slots}
        add_slot(core, min(i for i in range(len(core.slots) + 1) if i not in used))
        return
    live = [s for s in core.slots if s.then is not After.REMOVE]
    if len(live) > core.target_workers:
        victim = max(live, key=lambda s: s.index)
        victim.then = After.REMOVE
        if victim.alive:
            core.drain_slot(victim, "scale down", core.settings.worker_drain_timeout, core.settings.graceful_timeout)
        else:
            core.slots.remove(victim)
        return
    for slot in core.slots:
        why = policy.recycle_reason(slot, core.settings)
        if slot.alive and slot.joined and why:
            slot.then = After.RECYCLE
            log.info("worker %d (pid %s) recycles: %s", slot.index, slot.pid, why)
            core.drain_slot(slot, f"recycle: {why}", core.settings.worker_drain_timeout,
                            core.settings.graceful_timeout)
            return


def add_slot(core: SupervisorCore, index: int) -> WorkerSlot:
    """A new slot, started: the slots stay in index order."""
    slot = WorkerSlot(index)
    core.slots.append(slot)
    core.slots.sort(key=lambda s: s.index)
    core.spawn(slot)
    return slot


def add_leftovers(core: SupervisorCore, slots: tuple[int, ...]) -> None:
    """Slots above --workers whose static member a previous ksup left in the group (it was
    killed while they were dead; adapters/leftovers.py): each is started once; it rejoins with
    its instance id, and the rule above then lets it leave for good like any slot scaled away
    whose member is still in the group (must_rejoin)."""
    for index in slots:
        if index < core.target_workers or any(s.index == index for s in core.slots):
            continue
        log.warning("worker slot %d: a previous ksup left its static member in the group (a slot scaled up "
                    "that died without leaving): it rejoins once, then leaves", index)
        slot = add_slot(core, index)
        slot.member = True  # its instance id is in the group: it must rejoin before it leaves


def scale_down_unjoined(core: SupervisorCore) -> None:
    """Above the target, the highest-numbered slots go. Those not in the group now go at once,
    with no group change: a process that has not been told Go is drained before it joins, a dead
    one is not restarted, unless its static member is still in the group (must_rejoin). Joined
    ones leave one change at a time (manage), with LeaveGroup."""
    live = sorted((s for s in core.slots if s.then is not After.REMOVE), key=lambda s: s.index)
    current = core.roll.current if core.rolling() and core.roll is not None else None
    for victim in live[core.target_workers:]:
        # A dead slot's member is in the group only as long as must_rejoin says (its joined flag
        # is its last process's): classic keeps it to rejoin and leave, KIP-848 removes it now.
        if (victim.joined and victim.alive) or victim.index == current or must_rejoin(core, victim):
            continue
        victim.then = After.REMOVE
        if victim.alive:
            core.drain_slot(victim, "scale down (never joined)", 0.0, core.settings.quick_timeout)
        else:
            core.slots.remove(victim)
            log.info("worker slot %d removed (%d workers)", victim.index, len(core.slots))


def rejoin_to_leave(core: SupervisorCore) -> None:
    """During a (graceful) stop: a slot that leaves for good (core.leaves_for_good), dead when
    the stop began, whose static member is still in the group, is started once more; once loaded
    it is told Go and at once Drain with LeaveGroup (core.rejoin_and_leave). With its instance id
    the broker hands it the member's partitions back without a rebalance, and its worker serves
    the consumer without taking work until the join is answered, then leaves. Without it the
    member held those partitions from the next ksup until its session expired (ksup verify: a
    46 s gap after a SIGTERM that found a scaled-up slot waiting for its restart)."""
    if core.quick:
        return  # a quick stop waits for no boot
    for slot in core.slots:
        if slot.alive:
            if slot.rejoins_to_leave and slot.state is SlotState.LOADED:
                core.rejoin_and_leave(slot)
            continue
        if slot.rejoins_to_leave or slot.in_final_drain or not must_rejoin(core, slot) \
                or not core.leaves_for_good(slot):
            continue
        log.info("worker %d: its static member is still in the group and the slot will not come back: "
                 "starting it once more to rejoin and leave", slot.index)
        core.spawn(slot)
        slot.rejoins_to_leave = True
        slot.kill_at = min(core.now + REJOIN_TO_LEAVE_S, core.stop_deadline_at or core.now + REJOIN_TO_LEAVE_S)


def rejoins_free_dead_members(settings: Settings) -> bool:
    """Whether a process rejoining with a dead member's instance id takes its place (and can then
    leave): static members of the classic protocol. KIP-848 refuses the rejoin of an instance id
    whose member died without leaving until that member's session expires
    (UNRELEASED_INSTANCE_ID, worker exit 16), so a rejoin can never free its partitions sooner,
    and its rebalances do not wait for it."""
    return settings.static_membership and settings.group_protocol == "classic"


def must_rejoin(core: SupervisorCore, slot: WorkerSlot) -> bool:
    """The slot's static member is in the group (a process of it joined and none left for good):
    removing it without a rejoin would leave its partitions, and every rebalance of a classic
    group, waiting for its session to expire (rejoins_free_dead_members)."""
    return slot.member and rejoins_free_dead_members(core.settings)


def above_target(core: SupervisorCore, slot: WorkerSlot) -> bool:
    """The slot is among those a scale-down will remove (the highest numbers beyond the target):
    it must not join, nor be replaced by a rolling reload."""
    kept = sorted((s for s in core.slots if s.then is not After.REMOVE), key=lambda s: s.index)
    return slot not in kept[:core.target_workers]


def change_in_progress(core: SupervisorCore) -> bool:
    """A worker is booting or joining (no assignment yet) or draining out of the group. A slot
    being removed before it ever joined changes nothing in the group."""
    for s in core.slots:
        if s.then is After.REMOVE and not s.joined:
            continue
        if s.alive and (s.drain_sent_at is not None or s.assigned_at is None) \
                and core.now - s.spawned_at < CHANGE_SETTLE_MAX_S:
            return True
    return False
