"""Rolling reload (parent side, sans I/O): replace every worker, one slot at a time, with a
fresh process that imports the code installed now.

For each slot, in order (``RollPhase``):
1. BOOT: start the incoming process next to the old one. It imports the handler, creates its
   Consumer and checks the broker, then waits: it has not joined the group, so it shares its
   ``group.instance.id`` with no live member. If it cannot boot (it fails, dies, or is not loaded
   within the boot deadline), the roll stops here and the old worker keeps running.
2. DRAIN: the old worker drains (finish in flight, store, commit, close). Under static
   membership it does not leave the group, so nothing is rebalanced.
3. JOIN: once the old process has exited, the incoming one takes the slot and joins; under
   static membership it gets the same partitions back. The next slot waits for the gate of
   ``readiness.roll_gate``: static, the new worker got its partitions back; dynamic, the group
   rebalanced to stable as every worker of this ksup sees it (never "this ksup owns every
   partition": other ksup instances may share the group). A crash here stops the roll.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from supervisor.contract.exitcodes import ExitCode
from supervisor.parent import membership, policy, readiness, worker_events
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import After, RollPhase, SlotState

if TYPE_CHECKING:
    from supervisor.parent.core import SupervisorCore

log = logging.getLogger("ksup.supervisor")

JOIN_TIMEOUT_S = 120.0  # an incoming worker without an assignment after this long fails the roll


@dataclass
class SlotResult:
    slot: int
    old_pid: int | None
    new_pid: int | None = None
    gap_s: float | None = None  # from the old worker's drain request to the new one's assignment
    error: str | None = None
    # How the old worker's drain ended when not cleanly (worker_events.drain_verdict): the slot
    # was replaced, but some of its messages will be handled again.
    old_drain: str | None = None
    old_drain_code: ExitCode = ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "old_pid": self.old_pid, "new_pid": self.new_pid,
                "gap_s": None if self.gap_s is None else round(self.gap_s, 3), "error": self.error,
                "old_drain": self.old_drain}


@dataclass
class Roll:
    queue: list[int]
    started_at: float
    phase: RollPhase = RollPhase.BOOT
    current: int | None = None
    incoming: WorkerSlot | None = None
    old: WorkerSlot | None = None
    drain_started: float = 0.0
    old_assignment: list[str] = field(default_factory=list)  # what the replaced worker owned
    steady_since: float | None = None  # the gate: since when every worker is in the group
    results: list[SlotResult] = field(default_factory=list)
    error: str | None = None
    ended_at: float | None = None

    @property
    def done(self) -> bool:
        return self.phase is RollPhase.DONE

    def unclean_code(self) -> ExitCode:
        """OK when every old worker drained cleanly; else the code of the README's table for
        the worst, as for a stop (policy.worst)."""
        return policy.worst(r.old_drain_code for r in self.results)

    def summary(self, now: float) -> dict[str, Any]:
        return {"ok": self.error is None, "error": self.error,
                "slots": [r.as_dict() for r in self.results],
                "seconds": round((self.ended_at or now) - self.started_at, 3),
                "unclean_code": int(self.unclean_code())}


def start_roll(core: SupervisorCore) -> Roll:
    roll = Roll(queue=sorted(s.index for s in core.slots if s.alive), started_at=core.now)
    log.info("rolling reload of %d worker(s) begins", len(roll.queue))
    return roll


def step(core: SupervisorCore, roll: Roll) -> None:
    """Advance the roll by whatever is possible now. Called on every tick."""
    _STEPS[roll.phase](core, roll)


def _boot(core: SupervisorCore, roll: Roll) -> None:
    if roll.incoming is None:
        _begin_slot(core, roll)
    else:
        _check_boot(core, roll)


def _begin_slot(core: SupervisorCore, roll: Roll) -> None:
    while roll.queue:
        index = roll.queue.pop(0)
        old = next((s for s in core.slots if s.index == index and s.alive and s.joined
                    and s.then is not After.REMOVE), None)
        if old is None or membership.above_target(core, old):
            continue  # gone meanwhile (scaled down, or dead and restarting with new code anyway),
            # or about to be removed by a scale-down: a new process must not join in its place
        roll.current, roll.old = index, old
        roll.results.append(SlotResult(index, old.pid))
        incoming = WorkerSlot(index, restarts=old.restarts)
        core.spawn(incoming)  # not in core.slots until the old process has gone
        roll.incoming, roll.phase = incoming, RollPhase.BOOT
        log.info("reload: worker %d: a new process is booting next to %s", index, old.pid)
        return
    finish(core, roll, None)


def _check_boot(core: SupervisorCore, roll: Roll) -> None:
    incoming, old = roll.incoming, roll.old
    assert incoming is not None and old is not None
    if roll.results and roll.results[-1].new_pid is None:
        roll.results[-1].new_pid = incoming.pid
    if incoming.boot_failed is not None or incoming.state is SlotState.EXITED or incoming.stuck_reason:
        why = incoming.boot_failed.reason if incoming.boot_failed else \
            incoming.stuck_reason or "the new process exited while booting"
        core.kill(incoming, signal.SIGKILL, group=True)
        if incoming.alive:
            core.strays.append(incoming)
        roll.incoming = None
        finish(core, roll, f"worker {roll.current}: {why}; the old worker keeps running")
        return
    if membership.above_target(core, old):
        _drop_slot_from_roll(core, roll, "scaled down during the roll")
        return
    if not old.alive:
        # The old worker died meanwhile: the slot restarts with the new code anyway.
        core.kill(incoming, signal.SIGKILL, group=True)
        core.strays.append(incoming)
        roll.incoming, roll.old, roll.phase = None, None, RollPhase.BOOT
        roll.results[-1].error = "the old worker died during the roll; restarted instead"
        return
    if incoming.state is SlotState.LOADED:
        roll.phase, roll.drain_started = RollPhase.DRAIN, core.now
        roll.old_assignment = list(old.report.assignment) if old.report is not None else []
        roll.steady_since = None
        core.drain_slot(old, "rolling reload", core.settings.worker_drain_timeout, core.settings.graceful_timeout)
        old.then = After.REPLACED


def _drop_slot_from_roll(core: SupervisorCore, roll: Roll, why: str) -> None:
    """Give up replacing the current slot (the roll goes on with the next): its incoming
    process, which never joined, is killed."""
    incoming = roll.incoming
    if incoming is not None:
        core.kill(incoming, signal.SIGKILL, group=True)
        if incoming.alive:
            core.strays.append(incoming)
    if roll.results:
        roll.results[-1].error = why
    roll.incoming = roll.old = None
    roll.phase = RollPhase.BOOT


def _check_drain(core: SupervisorCore, roll: Roll) -> None:
    old, incoming = roll.old, roll.incoming
    assert old is not None and incoming is not None
    if old.alive:
        return
    verdict = worker_events.drain_verdict(old)
    if verdict is not None and roll.results:
        roll.results[-1].old_drain_code, roll.results[-1].old_drain = verdict
        log.warning("reload: worker %d: the old process (pid %s) %s", roll.current, old.pid, verdict[1])
    if membership.above_target(core, old):
        # Scaled down while its old worker drained: its successor never joins. The old worker
        # closed as a static member handing over (no LeaveGroup), so its member still holds its
        # partitions: then the slot restarts once to rejoin and leave (membership.must_rejoin),
        # else it goes now.
        _drop_slot_from_roll(core, roll, "scaled down during the roll")
        if membership.must_rejoin(core, old):
            old.then, old.respawn_at = After.RESTART, core.now
            return
        core.slots.remove(old)
        log.info("worker slot %d removed (%d workers)", old.index, len(core.slots))
        return
    if incoming.state is SlotState.EXITED:
        old.then = After.RESTART
        old.respawn_at = core.now
        roll.incoming = None
        finish(core, roll, f"worker {roll.current}: the new process died before joining")
        return
    # The old process is gone: only now may its successor use the slot's group.instance.id.
    position = core.slots.index(old)
    core.slots[position] = incoming
    core.go(incoming)
    roll.phase = RollPhase.JOIN


def _check_join(core: SupervisorCore, roll: Roll) -> None:
    incoming = roll.incoming
    assert incoming is not None
    if not incoming.alive:
        finish(core, roll, f"worker {roll.current}: the new process died after joining")
        return
    passed, roll.steady_since = readiness.roll_gate(core.slots, incoming, roll.old_assignment,
                                                    core.settings.static_membership, roll.steady_since, core.now)
    if passed and incoming.assigned_at is not None:
        roll.results[-1].gap_s = incoming.assigned_at - roll.drain_started
        log.info("reload: worker %d replaced (pid %s -> %s), partitions without a consumer for %.3fs",
                 roll.current, roll.results[-1].old_pid, incoming.pid, roll.results[-1].gap_s)
        roll.incoming = roll.old = None
        roll.phase = RollPhase.BOOT
    elif core.now - incoming.spawned_at > JOIN_TIMEOUT_S:
        finish(core, roll, f"worker {roll.current}: no assignment {JOIN_TIMEOUT_S:.0f}s after joining")


def _done(core: SupervisorCore, roll: Roll) -> None:
    pass


_STEPS = {RollPhase.BOOT: _boot, RollPhase.DRAIN: _check_drain, RollPhase.JOIN: _check_join,
          RollPhase.DONE: _done}


def finish(core: SupervisorCore, roll: Roll, error: str | None) -> None:
    if roll.done:
        return
    roll.error, roll.phase, roll.ended_at = error, RollPhase.DONE, core.now
    if error:
        if roll.results:
            roll.results[-1].error = error
        log.error("rolling reload stopped: %s", error)
    else:
        unclean = [r.slot for r in roll.results if r.old_drain]
        log.log(logging.WARNING if unclean else logging.INFO,
                "rolling reload done: %d worker(s) replaced in %.1fs%s", len(roll.results),
                core.now - roll.started_at,
                f"; the old process of worker(s) {', '.join(map(str, unclean))} did not drain cleanly "
                "(some messages will be handled again)" if unclean else "")
    core.notify("on_reload_done", roll.summary(core.now))
