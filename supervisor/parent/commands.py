"""What the control socket can ask of the supervisor (parent side): status, health, scale, stop."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from supervisor.parent import policy

if TYPE_CHECKING:
    from supervisor.parent.supervisor import Supervisor

LOOP_STALL_S = 5.0  # the loop ticks at least every 0.5 s; this long without a tick is a stall
UNOWNED_GRACE_S = 10.0  # a rebalance leaves partitions without a consumer for well under this


class SupervisorCommands:
    """The control socket's view of one Supervisor (called from the supervisor's loop)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def status(self) -> dict[str, Any]:
        sup = self.sup
        now_wall = time.time()
        workers = []
        for s in sup.slots:
            r = s.report
            inflight = None
            if r is not None and r.in_flight is not None:
                f = r.in_flight
                inflight = {"topic": f.topic, "partition": f.partition, "offset": f.offset,
                            "age_s": round(now_wall - f.since, 3)}
            workers.append({
                "slot": s.index, "pid": s.pid if s.alive else None,
                "state": (r.state if r is not None and s.state.value == "running" else s.state.value),
                "partitions": r.assignment if r else [],
                "in_flight": inflight,
                "processed": r.processed if r else 0,
                "failed": r.failed if r else 0,
                "stored": r.stored if r else {},
                "committed": r.committed if r else {},
                "lag": {name: max(r.high_watermarks[name] - r.committed.get(name, 0), 0)
                        for name in r.assignment if name in r.high_watermarks and name in r.committed} if r else {},
                "rss_bytes": r.rss_bytes if r else 0,
                "restarts": s.restarts,
                "handler_version": s.handler_version,
                "revocations": r.revocations if r else 0,
            })
        return {"supervisor": {"pid": os.getpid(), "state": sup.state.value, "group": sup.settings.group,
                               "topics": list(sup.settings.topics), "handler": sup.settings.handler,
                               "workers_target": sup.target_workers,
                               "uptime_s": round(now_wall - sup.started_at, 1)},
                "workers": workers}

    def health(self) -> dict[str, Any]:
        """Healthy: the loop is ticking, every worker is reporting and none is stuck."""
        sup = self.sup
        problems = []
        now = time.monotonic()
        if now - sup.last_tick > LOOP_STALL_S:
            problems.append(f"supervisor loop stalled for {now - sup.last_tick:.1f}s")
        if sup.state.value != "running":
            problems.append(f"supervisor is {sup.state.value}")
        for s in sup.slots:
            if not s.alive:
                problems.append(f"worker {s.index} is not running")
                continue
            problem = policy.stuck(s, now, time.time(), sup.settings)
            if problem:
                problems.append(f"worker {s.index} {problem}")
        coverage = sup.core.coverage_problem(UNOWNED_GRACE_S)
        if coverage:
            problems.append(coverage)
        return {"healthy": not problems, "problems": problems}

    def scale(self, workers: int) -> dict[str, Any]:
        was = self.sup.target_workers
        error = self.sup.scale(workers)
        if error:
            return {"ok": False, "error": error}
        return {"ok": True, "workers": workers, "was": was}

    def reload(self) -> dict[str, Any]:
        error = self.sup.reload()
        return {"ok": False, "error": error} if error else {"ok": True, "reloading": True}

    def request_stop(self, reason: str, timeout: float | None) -> dict[str, Any]:
        self.sup.stop(reason, quick=False, timeout=timeout)
        return {"ok": True, "stopping": True}
