"""What the supervisor does when a worker speaks or exits (parent side): reports, boot results,
ready-to-leave and exit notices over the pipe; reaping, the cause of each death, the messages
it held (poison counting), and what follows (restart with backoff, crash-loop halt, removal).
Functions of the Supervisor, called from its loop."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from supervisor.contract import inflight_board
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, WorkerExit, describe_returncode
from supervisor.errors import HaltSupervisor
from supervisor.parent import policy, worker_output
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import State

if TYPE_CHECKING:
    from supervisor.parent.supervisor import Supervisor

log = logging.getLogger("ksup.supervisor")


def read_messages(sup: Supervisor, slot: WorkerSlot) -> None:
    assert slot.channel is not None
    for msg in slot.channel.read_available():
        on_message(sup, slot, msg)
    if slot.channel.closed:
        try:
            sup.selector.unregister(slot.channel)
        except (KeyError, ValueError):
            pass
        slot.channel.close()

def on_message(sup: Supervisor, slot: WorkerSlot, msg: m.Message) -> None:
    if isinstance(msg, m.Report):
        before = slot.report.problems if slot.report is not None else []
        if msg.problems != before:  # a standing Kafka problem began, changed or ended: say so once
            for problem in msg.problems:
                if problem.split(" for ", 1)[0] not in " | ".join(before):
                    log.warning("worker %d: %s", slot.index, problem)
            if before and not msg.problems:
                log.info("worker %d: Kafka problems resolved", slot.index)
        slot.report, slot.report_at = msg, time.monotonic()
        if msg.state in ("assigned", "draining") and slot.assigned_at is None:
            slot.assigned_at = time.monotonic()
    elif isinstance(msg, m.Loaded):
        slot.advance("loaded")
        sup.partitions_total = msg.partitions
        slot.handler_version = msg.handler_version
        slot.report_at = time.monotonic()
        log.info("worker %d (pid %d) loaded %s (confluent-kafka %s)",
                 slot.index, msg.pid, msg.handler, msg.client_version)
    elif isinstance(msg, m.BootFailed):
        slot.boot_failed = msg
        if slot not in sup.slots:
            return  # an incoming worker of a rolling reload: the roll stops, the old one stays
        # A worker that cannot even import the handler will not do better on a restart.
        if sup.state is State.STARTING or msg.exit_code != WorkerExit.BROKER_UNREACHABLE:
            raise HaltSupervisor(msg.reason, policy.halt_code_for_boot_failure(msg.exit_code))
    elif isinstance(msg, m.ReadyToLeave):
        slot.ready_to_leave = True
        sup.release_leavers()
    elif isinstance(msg, m.Exiting):
        slot.exiting = msg
        sup.receipt.add(slot.index, msg)

def reap_workers(sup: Supervisor, now: float) -> None:
    """Collect exited workers; log each death with its cause; decide what follows."""
    for slot in list(sup.slots):
        if slot.proc is None or slot.state == "exited" or slot.proc.poll() is None:
            continue
        if slot.channel is not None and not slot.channel.closed:
            read_messages(sup, slot)
        worker_output.read_stderr(slot, sup.selector, final=True)
        report = describe_returncode(slot.proc.returncode)
        slot.state = "exited"
        sup.hooks.on_worker_exit(sup, slot, report)
        clean = report.code == 0 and slot.drain_sent_at is not None
        if clean:
            log.info("worker %d (pid %d) exited: %s", slot.index, slot.pid,
                     slot.exiting.reason if slot.exiting else report.describe())
        else:
            inflight = note_poison(sup, slot) if sup.state is State.RUNNING else ""
            log.log(logging.WARNING if sup.state is State.STOPPING else logging.ERROR,
                    "worker %d (pid %d) %s%s%s%s", slot.index, slot.pid, report.describe(),
                    worker_output.last_moments(slot), f"; in flight at death: {inflight}" if inflight else "",
                    worker_output.stderr_tail(slot))
        kafka = slot.configure.kafka if slot.configure else {}
        fatal = policy.halt_for_worker_exit(report.code, slot.index, slot.exiting.reason if slot.exiting else "",
                                            kafka.get("group.instance.id", ""), sup.settings.group)
        if fatal is not None:
            raise HaltSupervisor(fatal[1], fatal[0])
        after_exit(sup, slot, now, clean, report.describe())

def after_exit(sup: Supervisor, slot: WorkerSlot, now: float, clean: bool, how: str) -> None:
    if sup.state is not State.RUNNING or slot.then == "replaced":
        return  # a replaced slot's successor is put in place by the rolling reload
    if slot.then == "remove":
        sup.slots.remove(slot)
        log.info("worker slot %d removed (%d workers)", slot.index, len(sup.slots))
        return
    if slot.then == "recycle" and clean:
        slot.respawn_at = now
        return
    slot.deaths.append(now)
    sup.deaths.append(now)
    if policy.is_crash_loop(sup.deaths, now, sup.settings.crash_loop_deaths, sup.settings.crash_loop_window):
        raise HaltSupervisor(f"crash loop: {sup.settings.crash_loop_deaths} worker deaths within "
                             f"{sup.settings.crash_loop_window:g}s; last: {how}", ExitCode.CRASH_LOOP)
    delay = policy.restart_delay(slot.deaths, now, sup.settings.restart_delay)
    slot.respawn_at = now + delay
    log.info("worker %d restarts in %.1fs", slot.index, delay)

def note_poison(sup: Supervisor, slot: WorkerSlot) -> str:
    """After a worker died: count a death against each message it had in flight (read from
    its in-flight board); a message at --poison-after deaths goes to dead-letter/skip next
    time. Returns the in-flight messages, for the log."""
    board = slot.configure.options.get("board") if slot.configure else None
    inflight = inflight_board.read(str(board)) if board else []
    for key in inflight:
        sup.poison_counts[key] += 1
        fallback = [p for p in sup.settings.on_error if p in ("dead-letter", "skip")]
        if sup.poison_counts[key] >= sup.settings.poison_after and fallback and key not in sup.poison:
            sup.poison.add(key)
            log.error("%s[%d]@%d killed %d worker processes: the next worker will %s it without "
                      "running the handler", *key, sup.poison_counts[key], fallback[0])
    return ", ".join(f"{t}[{p}]@{o}" for t, p, o in inflight)
