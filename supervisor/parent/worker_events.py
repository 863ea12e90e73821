"""What the supervisor decides when a worker speaks or exits (parent side, sans I/O): reports,
boot results, ready-to-leave and exit notices; the cause of each death, the messages it held
(poison counting), and what follows (restart with backoff, the crash-loop halt, removal).
Functions of the SupervisorCore; the I/O loop reads the pipes and reaps the processes."""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from supervisor.child.policies import QUARANTINE
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, ExitReport, WorkerExit, describe_returncode
from supervisor.errors import HaltSupervisor
from supervisor.parent import membership, policy
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import After, SlotState, State

if TYPE_CHECKING:
    from supervisor.parent.core import SupervisorCore
    from supervisor.parent.events import WorkerExited

log = logging.getLogger("ksup.supervisor")


def on_message(core: SupervisorCore, slot: WorkerSlot, msg: m.Message) -> None:
    now = core.now
    if isinstance(msg, m.Report):
        before = slot.report.problems if slot.report is not None else []
        if msg.problems != before:  # a standing Kafka problem began, changed or ended: say so once
            for problem in msg.problems:
                if problem.split(" for ", 1)[0] not in " | ".join(before):
                    log.warning("worker %d: %s", slot.index, problem)
            if before and not msg.problems:
                log.info("worker %d: Kafka problems resolved", slot.index)
        slot.report, slot.report_at = msg, now
        if msg.state in ("assigned", "draining") and slot.assigned_at is None:
            slot.assigned_at = now
        if msg.state == "assigned":  # (a worker that gives up reports "draining" on its way out)
            slot.held_since = None
        core.receipt.note_report(msg)
    elif isinstance(msg, m.Loaded):
        slot.advance(SlotState.LOADED)
        core.partitions_total = msg.partitions
        slot.handler_version = msg.handler_version
        slot.report_at = now
        log.info("worker %d (pid %d) loaded %s (confluent-kafka %s)",
                 slot.index, msg.pid, msg.handler, msg.client_version)
    elif isinstance(msg, m.BootFailed):
        slot.boot_failed = msg
        if slot not in core.slots:
            return  # an incoming worker of a rolling reload: the roll stops, the old one stays
        # A worker that cannot even import the handler will not do better on a restart.
        if core.state is State.STARTING or msg.exit_code != WorkerExit.BROKER_UNREACHABLE:
            raise HaltSupervisor(msg.reason, policy.halt_code_for_boot_failure(msg.exit_code))
    elif isinstance(msg, m.ReadyToLeave):
        slot.ready_to_leave = True
        core.release_leavers()
    elif isinstance(msg, m.Exiting):
        slot.exiting = msg
        core.receipt.add(slot.index, msg)


def on_exit(core: SupervisorCore, event: WorkerExited) -> None:
    """A reaped worker: log its death with its cause; decide what follows."""
    slot = event.slot
    if slot.state is SlotState.EXITED:
        return
    was = slot.state
    slot.returncode = event.returncode
    report = describe_returncode(event.returncode)
    slot.state = SlotState.EXITED
    # Whatever the worker started and left behind in its session goes with it.
    core.kill_group_of_exited(slot)
    core.notify("on_worker_exit", slot, report)
    # A clean stop is one the worker reported (Exiting): an exit 0 without that report is a
    # drain that never ran (a library in the handler turned SIGTERM into an exit), see without_drain.
    clean = report.code == 0 and slot.drain_sent_at is not None and slot.exiting is not None
    death = not clean and died_of_a_message(slot, report)
    if clean and slot.exiting is not None:  # (clean implies the report)
        log.info("worker %d (pid %s) exited: %s", slot.index, slot.pid, slot.exiting.reason)
    else:
        inflight = "" if core.state is not State.RUNNING else note_poison(core, event.inflight) \
            if death else names(event.inflight)
        log.log(logging.WARNING if core.state is State.STOPPING else logging.ERROR,
                "worker %d (pid %s) %s%s%s%s", slot.index, slot.pid,
                WITHOUT_DRAIN if without_drain(slot) else report.describe(),
                last_moments(slot, core.wall), f"; in flight at death: {inflight}" if inflight else "",
                event.tail)
    kafka = slot.configure.kafka if slot.configure else {}
    held = report.code == WorkerExit.INSTANCE_ID_HELD
    if held and slot.held_since is None:
        slot.held_since = core.now
    fatal = policy.halt_for_worker_exit(report.code, slot.index, slot.exiting.reason if slot.exiting else "",
                                        kafka.get("group.instance.id", ""), core.settings.group,
                                        core.now - slot.held_since if held and slot.held_since is not None else 0.0,
                                        core.settings.instance_id_wait)
    if fatal is not None:
        raise HaltSupervisor(fatal[1], fatal[0])
    if slot not in core.slots:
        return  # an incoming worker of a rolling reload, or a killed stray: rolling.py decides
    core.note_departure(slot, clean)
    if core.state is State.STARTING and not clean:
        # Died before every worker loaded: the code or the config cannot boot (BootFailed, when
        # the worker could say so, already halted with its own code).
        why = slot.stuck_reason or f"{report.describe()} while booting, before it loaded the handler"
        raise HaltSupervisor(f"worker {slot.index} (pid {slot.pid}) {why}{event.tail}", ExitCode.BOOT_FAILED)
    after_exit(core, slot, death, slot.stuck_reason or report.describe(), booting=was is SlotState.BOOTING,
               held=held, left=clean)


def after_exit(core: SupervisorCore, slot: WorkerSlot, death: bool, how: str, booting: bool = False,
               held: bool = False, left: bool = True) -> None:
    """``death``: the exit counts as a death (backoff, crash loop). A clean stop is not one, nor
    is a drain ksup asked for that ran out of time (see died_of_a_message). ``left``: the worker
    ended its drain as it reported (so a slot scaled away left the group)."""
    now = core.now
    if core.state is not State.RUNNING or slot.then is After.REPLACED:
        return  # a replaced slot's successor is put in place by the rolling reload
    if slot.then is After.REMOVE:
        if left or not membership.must_rejoin(core, slot):
            core.slots.remove(slot)
            log.info("worker slot %d removed (%d workers)", slot.index, len(core.slots))
            return
        # Scaled away, but it ended before its LeaveGroup: its static member is still in the
        # group and would hold up every rebalance of it until its session expires. The slot
        # comes back once (a restart like any other), rejoins, and the scale-down takes it again.
        log.warning("worker %d was scaled away but ended before it left the group: it restarts to rejoin and "
                    "leave", slot.index)
        slot.then = After.RESTART
    if slot.then is After.RECYCLE and not death:
        slot.respawn_at = now
        return
    if held:
        # Not a death (no backoff, no crash loop): most likely this slot's own predecessor died
        # without leaving, and the broker gives its instance id back when that session expires.
        slot.respawn_at = now + policy.HELD_RETRY_S
        log.warning("worker %d: the broker still holds its group.instance.id (a previous worker of this slot "
                    "that died without leaving, until its session expires; or another consumer): trying again "
                    "in %.0fs (refused for %.0fs; ksup halts after --instance-id-wait %gs)", slot.index,
                    policy.HELD_RETRY_S, now - (slot.held_since or now), core.settings.instance_id_wait)
        return
    if not death:
        slot.respawn_at = now
        log.info("worker %d restarts now (ksup asked it to drain, and it ended so: not a death)", slot.index)
        return
    slot.deaths.append(now)
    core.deaths.append(now)
    if policy.is_crash_loop(core.deaths, now, core.settings.crash_loop_deaths, core.settings.crash_loop_window):
        raise HaltSupervisor(f"crash loop: {core.settings.crash_loop_deaths} worker deaths within "
                             f"{core.settings.crash_loop_window:g}s; last: worker {slot.index} {how}",
                             ExitCode.CRASH_LOOP)
    delay = policy.restart_delay(slot.deaths, now, core.settings.restart_delay, core.settings.max_restart_delay)
    slot.respawn_at = now + delay
    log.info("worker %d restarts in %.1fs", slot.index, delay)


# What a worker's own exit code means, for the one line an operator reads at the end (the
# worker's stop reason alone, such as "SIGTERM received", says why it stopped, not what went
# wrong). ``reason`` is the worker's: for 10, 12 and 14 it names the failure that came during the drain.
WORKER_EXIT_SAYS: dict[int, str] = {
    WorkerExit.COMMIT_FAILED: "the broker did not confirm its final commit (its finished messages will be "
                              "redelivered) (exit 5; {reason})",
    WorkerExit.DRAIN_TIMEOUT: "its handler did not finish {abandoned} within the drain's time (not stored: "
                              "redelivered) (exit 11; {reason})",
    WorkerExit.HANDLER_FAILED: "{reason}: that message was not stored and will be redelivered (exit 10)",
    WorkerExit.HANDLER_CRASHED: "{reason}: what that thread held was not stored and will be redelivered "
                                "(exit 14; the traceback is in the log)",
    WorkerExit.KAFKA_FATAL: "{reason}: its final commit is not confirmed, so its finished messages may be "
                            "redelivered (exit 12)",
    WorkerExit.INTERNAL: "crashed, a bug in ksup's worker (exit 70; the traceback is in the log): its last "
                         "finished messages may be redelivered",
}
UNKNOWN_EXIT_SAYS = "exited {code} ({reason})"


WITHOUT_DRAIN = ("exited 0 without draining (no exit report: did the handler, or a library it uses, turn "
                 "SIGTERM into an exit?); its last finished messages were not committed and will be redelivered")


def coords(inflight: m.InFlight) -> str:
    return f"{inflight.topic}[{inflight.partition}]@{inflight.offset}"


def drain_verdict(slot: WorkerSlot) -> tuple[ExitCode, str] | None:
    """How a worker that ksup drained ended, when not cleanly: the exit code with that meaning
    in the README's table (policy.DRAIN_END: 4 killed or a message not stored, 5 its finished
    work not committed, 1 a bug) and what happened, in words; None for a clean drain (its exit
    report, exit 0). A stop and a reload both judge by this."""
    if slot.returncode is None:
        return None
    if slot.killed:
        inflight = slot.report.in_flight if slot.report is not None else None
        where = f" (in flight: {coords(inflight)})" if inflight else ""
        return ExitCode.FORCED, (f"did not drain within --graceful-timeout and was killed{where}; its "
                                 "unfinished and uncommitted messages will be redelivered")
    if without_drain(slot):
        return ExitCode.COMMIT_FAILED, WITHOUT_DRAIN
    if describe_returncode(slot.returncode).code is None:  # a signal nobody here sent (OOM killer)
        return ExitCode.FORCED, f"{describe_returncode(slot.returncode).describe()} while draining"
    ex = slot.exiting
    code = ex.exit_code if ex is not None else slot.returncode
    end = policy.drain_end_code(code)
    if end is ExitCode.OK:
        return None
    abandoned = coords(ex.abandoned) if ex is not None and ex.abandoned else "a message"
    return end, WORKER_EXIT_SAYS.get(code, UNKNOWN_EXIT_SAYS).format(
        reason=ex.reason if ex is not None else "no exit report", abandoned=abandoned, code=code)


def without_drain(slot: WorkerSlot) -> bool:
    """The worker exited 0 without its exit report: whatever it did, it was not ksup's drain."""
    return slot.returncode == 0 and slot.exiting is None


def died_of_a_message(slot: WorkerSlot, report: ExitReport) -> bool:
    """Whether this unclean exit counts against the messages in flight (--poison-after): a crash
    (a signal, an exit nobody asked for) or a stop for being stuck (--handler-timeout, silence).
    Not a drain that ksup asked for (recycle, reload, scale-down) and that ran out of time: the
    worker's own exit after giving up, or ksup's SIGKILL at the drain deadline. That message was
    slow, not fatal; counting it made a healthy slow message poison, skipped without running."""
    if slot.stuck_reason is not None or slot.drain_sent_at is None:
        return True
    return report.signal is not None and not slot.killed and report.signal != signal.SIGTERM


def names(inflight: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for t, p, o in inflight)


def note_poison(core: SupervisorCore, inflight: list[tuple[str, int, int]]) -> str:
    """After a worker died: count a death against each message it had in flight (its in-flight
    board, read by the I/O loop); a message at --poison-after deaths goes to dead-letter/skip
    next time. Returns the in-flight messages, for the log.

    Batch mode: a death with several records of one batch in flight does not say which one
    killed it, so they become suspects instead: the next worker runs each alone, and a death
    with one record in flight counts against that record only."""
    if core.settings.batch_size > 1 and len(inflight) > 1:
        core.suspects.update(inflight)
        log.warning("a batch of %d records was in flight: the next worker runs each of them alone",
                    len(inflight))
        return names(inflight)
    for key in inflight:
        core.poison_counts[key] += 1
        fallback = [p for p in core.settings.on_error if p in QUARANTINE]
        if core.poison_counts[key] >= core.settings.poison_after and fallback and key not in core.poison:
            core.poison.add(key)
            log.error("%s[%d]@%d killed %d worker processes: the next worker will %s it without "
                      "running the handler", *key, core.poison_counts[key], fallback[0].value)
    return names(inflight)


def last_moments(slot: WorkerSlot, wall: float) -> str:
    """What the worker was doing when it ended, for the death log line."""
    if slot.exiting is not None:
        return f": {slot.exiting.reason}"
    if slot.stuck_reason:
        return f": {slot.stuck_reason}"
    inflight = slot.report.in_flight if slot.report else None
    if inflight is not None:
        return f"; in flight: {inflight.topic}[{inflight.partition}]@{inflight.offset} for {wall - inflight.since:.1f}s"
    return ""
