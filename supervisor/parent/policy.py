"""Pure decisions of the supervisor (parent side): no I/O, no clock of their own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from supervisor.contract.exitcodes import ExitCode, WorkerExit

if TYPE_CHECKING:
    from supervisor.config import Settings
    from supervisor.parent.slots import WorkerSlot

BOOT_EXTRA_S = 15.0  # a worker's boot deadline: --broker-timeout plus this (import, Consumer())
HEALTHY_RESET_S = 60.0  # a worker that lived this long restarts with the first delay again


def restart_delay(deaths: list[float], now: float, first_delay: float, max_delay: float) -> float:
    """Exponential backoff per slot over the deaths since it was last healthy for a while."""
    recent = [t for t in deaths if now - t < HEALTHY_RESET_S]
    return float(min(first_delay * 2.0 ** max(len(recent) - 1, 0), max_delay))


def boot_deadline(s: Settings) -> float:
    """How long a worker may take from its start to ``Loaded``: its own broker wait plus time to
    import the handler and create the Consumer. Past it the worker is killed (it hangs)."""
    return s.broker_timeout + BOOT_EXTRA_S


def is_crash_loop(all_deaths: list[float], now: float, limit: int, window: float) -> bool:
    return len([t for t in all_deaths if now - t <= window]) >= limit


def halt_code_for_boot_failure(worker_code: int) -> ExitCode:
    return {
        WorkerExit.CONFIG: ExitCode.CONFIG,
        WorkerExit.BROKER_UNREACHABLE: ExitCode.BROKER_UNREACHABLE,
        WorkerExit.AUTH_FAILED: ExitCode.AUTH_FAILED,
    }.get(WorkerExit(worker_code) if worker_code in WorkerExit._value2member_map_ else WorkerExit.INTERNAL,
          ExitCode.BOOT_FAILED)


HELD_RETRY_S = 2.0  # a slot whose instance id the broker still holds tries again this often


def halt_for_worker_exit(worker_code: int | None, index: int, worker_reason: str,
                         instance_id: str, group: str, held_for: float = 0.0,
                         instance_id_wait: float = 0.0) -> tuple[ExitCode, str] | None:
    """A worker exit that no restart can cure stops ksup: fenced (another consumer uses this
    slot's group.instance.id), a broker without the chosen group protocol, or one that refused
    the credentials (a restarted worker gets the same ones: ksup resolves them once). An
    instance id the broker still holds (KIP-848) counts as fenced only once the slot has been
    refused for ``held_for`` > ``instance_id_wait`` seconds: before that it may be the slot's own
    predecessor, dead without leaving, whose session has not expired yet."""
    held = worker_code == WorkerExit.INSTANCE_ID_HELD
    if worker_code == WorkerExit.FENCED or (held and held_for > instance_id_wait):
        prefix = instance_id.rpartition("-")[0] or instance_id
        how = (f"the broker still refused its group.instance.id {instance_id!r} after {held_for:.0f}s "
               f"(--instance-id-wait): another consumer in group {group!r} uses it" if held else
               f"another consumer in group {group!r} uses group.instance.id {instance_id!r}")
        return ExitCode.FENCED, (
            f"worker {index} was fenced: {how} (--instance-id-prefix {prefix!r}, on this host or another); "
            f"give each ksup of the group its own --instance-id-prefix")
    if worker_code == WorkerExit.BROKER_UNSUPPORTED:
        return ExitCode.BROKER_UNSUPPORTED, worker_reason or f"worker {index}: the broker lacks a feature"
    if worker_code == WorkerExit.AUTH_FAILED:
        return ExitCode.AUTH_FAILED, worker_reason or f"worker {index}: the broker refused its credentials"
    return None


# What a worker's exit at the end of a drain ksup asked for makes of ksup's own exit code (the
# README's table). Whatever is not here (a signal, a code of no drain) did not drain: FORCED.
DRAIN_END: dict[int, ExitCode] = {
    WorkerExit.OK: ExitCode.OK,
    WorkerExit.COMMIT_FAILED: ExitCode.COMMIT_FAILED,  # finished work not confirmed: redelivered
    WorkerExit.KAFKA_FATAL: ExitCode.COMMIT_FAILED,    # the consumer is unusable: nor is its commit
    WorkerExit.DRAIN_TIMEOUT: ExitCode.FORCED,         # a message abandoned: not stored, redelivered
    WorkerExit.HANDLER_FAILED: ExitCode.FORCED,        # the message it raised on: not stored
    WorkerExit.HANDLER_CRASHED: ExitCode.FORCED,       # what the dead thread held: not stored
    WorkerExit.INTERNAL: ExitCode.INTERNAL,            # a bug in the worker: the traceback is in the log
}

# The worst of several workers' ends is ksup's: first in this order.
SEVERITY = (ExitCode.INTERNAL, ExitCode.FORCED, ExitCode.COMMIT_FAILED, ExitCode.OK)


def worst(codes: Iterable[ExitCode]) -> ExitCode:
    """The first of ``codes`` in SEVERITY; OK for none (a stop's and a reload's verdict)."""
    present = set(codes)
    return next((c for c in SEVERITY if c in present), ExitCode.OK)


def drain_end_code(worker_code: int | None) -> ExitCode:
    """ksup's code for one drained worker's end; ``None`` is a worker killed by a signal."""
    return ExitCode.FORCED if worker_code is None else DRAIN_END.get(worker_code, ExitCode.FORCED)


def final_exit_code(worker_codes: list[int | None], forced: bool) -> ExitCode:
    """The supervisor's code after every worker stopped on a normal stop request: the worst of
    the workers' ends (DRAIN_END). ``forced``: the graceful timeout killed a worker."""
    return worst([*map(drain_end_code, worker_codes), *([ExitCode.FORCED] if forced else [])])


def stuck(slot: WorkerSlot, now: float, wall_now: float, s: Settings) -> str | None:
    """Why a joined worker needs stopping: its handler ran past --handler-timeout, or its loop
    stopped reporting for --heartbeat-timeout. None when it is fine."""
    if not slot.joined or slot.drain_sent_at is not None:
        return None
    report = slot.report
    if s.handler_timeout and report is not None and report.in_flight is not None:
        age = wall_now - report.in_flight.since
        if age > s.handler_timeout:
            f = report.in_flight
            return f"handler stuck on {f.topic}[{f.partition}]@{f.offset} for {age:.1f}s (--handler-timeout)"
    if report is not None and report.handler_threads_alive < report.handler_threads:
        dead = report.handler_threads - report.handler_threads_alive
        return f"has {dead} dead handler thread(s) of {report.handler_threads}"
    if now - slot.report_at > s.heartbeat_timeout:
        return f"silent for {now - slot.report_at:.1f}s (no report; --heartbeat-timeout)"
    return None


def recycle_reason(slot: WorkerSlot, s: Settings) -> str | None:
    report = slot.report
    if report is None or slot.drain_sent_at is not None:
        return None
    if slot.recycle_after is not None and report.processed >= slot.recycle_after:
        return f"processed {report.processed} messages (--max-messages)"
    if s.max_memory and report.rss_bytes > s.max_memory:
        return f"RSS {report.rss_bytes >> 20} MiB over {s.max_memory >> 20} MiB (--max-memory)"
    return None


def jittered(limit: int, slot: int, generation: int) -> int:
    """``limit`` plus up to 10% so that workers started together do not all recycle together.
    Deterministic per slot and generation, so tests can predict it."""
    spread = max(limit // 10, 0)
    return limit + (hash((slot, generation)) % (spread + 1) if spread else 0)


def session_timeout_s(settings: Settings) -> float:
    """How long the broker keeps a member that stopped heartbeating (classic: the client's
    session.timeout.ms; KIP-848: the broker's group.consumer.session.timeout.ms, 45 s by default)."""
    if settings.group_protocol == "classic":
        return int(settings.kafka.get("session.timeout.ms", "45000")) / 1000
    return 45.0
