"""What the control socket can ask of the supervisor (parent side): status, health, scale, stop."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from supervisor.parent import readiness

if TYPE_CHECKING:
    from supervisor.parent.supervisor import Supervisor


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
                "group": {"state": r.group_state, "join_state": r.join_state} if r else {},
                "problems": r.problems if r else [],
            })
        return {"supervisor": {"pid": os.getpid(), "state": sup.state.value, "group": sup.settings.group,
                               "topics": list(sup.settings.topics), "handler": sup.settings.handler,
                               "workers_target": sup.target_workers,
                               "uptime_s": round(now_wall - sup.started_at, 1)},
                "workers": workers}

    def health(self) -> dict[str, Any]:
        """readiness.health: the same verdict as /healthz."""
        ok, problems = readiness.health(self.sup)
        return {"healthy": ok, "problems": problems}

    def ready(self) -> dict[str, Any]:
        """readiness.ready: the same verdict as /readyz and READY=1."""
        ok, problems = readiness.ready(self.sup)
        return {"ready": ok, "problems": problems}

    def scale(self, workers: int) -> dict[str, Any]:
        was = self.sup.target_workers
        error = self.sup.scale(workers)
        if error:
            return {"ok": False, "error": error}
        return {"ok": True, "workers": workers, "was": was}

    def reload(self) -> dict[str, Any]:
        """``refused``: no roll was started (one is under way, or ksup starts or stops), unlike a
        roll that started and stopped (a reply with ``slots``)."""
        error = self.sup.reload()
        return {"ok": False, "error": error, "refused": True} if error else {"ok": True, "reloading": True}

    def request_stop(self, reason: str, timeout: float | None) -> dict[str, Any]:
        self.sup.stop(reason, quick=False, timeout=timeout)
        return {"ok": True, "stopping": True}
