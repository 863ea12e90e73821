"""Pure decisions of the supervisor (parent side): no I/O, no clock of their own."""

from __future__ import annotations

from supervisor.contract.exitcodes import ExitCode, WorkerExit

MAX_RESTART_DELAY_S = 30.0
HEALTHY_RESET_S = 60.0  # a worker that lived this long restarts with the first delay again


def restart_delay(deaths: list[float], now: float, first_delay: float) -> float:
    """Exponential backoff per slot over the deaths since it was last healthy for a while."""
    recent = [t for t in deaths if now - t < HEALTHY_RESET_S]
    return float(min(first_delay * 2.0 ** max(len(recent) - 1, 0), MAX_RESTART_DELAY_S))


def is_crash_loop(all_deaths: list[float], now: float, limit: int, window: float) -> bool:
    return len([t for t in all_deaths if now - t <= window]) >= limit


def halt_code_for_boot_failure(worker_code: int) -> ExitCode:
    return {
        WorkerExit.CONFIG: ExitCode.CONFIG,
        WorkerExit.BROKER_UNREACHABLE: ExitCode.BROKER_UNREACHABLE,
    }.get(WorkerExit(worker_code) if worker_code in WorkerExit._value2member_map_ else WorkerExit.INTERNAL,
          ExitCode.BOOT_FAILED)


def final_exit_code(worker_codes: list[int | None], forced: bool) -> ExitCode:
    """The supervisor's code after every worker stopped on a normal stop request.
    ``None`` is a worker killed by a signal."""
    if forced or any(c is None or c == WorkerExit.DRAIN_TIMEOUT for c in worker_codes):
        return ExitCode.FORCED
    if any(c == WorkerExit.COMMIT_FAILED for c in worker_codes):
        return ExitCode.COMMIT_FAILED
    return ExitCode.OK
