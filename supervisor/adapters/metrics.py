"""Prometheus metrics and HTTP health endpoints (parent side), on ``--metrics-addr``.

One server in the supervisor aggregates what the workers report over their pipes (no port per
worker, no shared multiprocess directory). The loop builds an immutable snapshot each tick; the
HTTP thread only serves the latest snapshot, so it never touches the loop's state.

Where each figure comes from:
- processed / failed / skipped / dead-lettered / retries, handler latency: counted by the workers
  as handlers finish, sent in their reports (every second and on change); summed here across
  worker restarts;
- committed offsets: the workers' commit results (librdkafka's commit callback);
- high watermarks: librdkafka statistics (``statistics.interval.ms``, 1 s by default), so lag
  (high watermark minus committed) costs no extra broker request;
- restarts, states, RSS, drain durations: the supervisor's own view of its workers.

Endpoints: ``/metrics``; ``/livez`` (the supervisor loop ticked recently); ``/readyz`` and
``/healthz``: ``parent/readiness.py``'s ready and health verdicts, the same ones ``ksup health``
and READY=1 use. Each health endpoint answers 200 or 503 with a JSON body giving the reasons.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from supervisor.contract import messages as m
from supervisor.parent import readiness
from supervisor.parent.hooks import Hooks

log = logging.getLogger("ksup.metrics")

LIVE_S = 5.0  # the loop ticks at least every 0.5 s


@dataclass
class Snapshot:
    families: list[Metric] = field(default_factory=list)
    ready: tuple[bool, list[str]] = (False, ["starting"])
    healthy: tuple[bool, list[str]] = (False, ["starting"])


class Totals:
    """Counters summed over every worker process that ever ran (deltas per pid)."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.latency = [0] * (len(m.LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.scalars: Counter[str] = Counter()
        self._seen: dict[int, m.Report] = {}

    def add(self, report: m.Report) -> None:
        before = self._seen.get(report.pid)
        self._seen[report.pid] = report
        for name, (done, failed) in report.counts.items():
            prev = before.counts.get(name, [0, 0]) if before else [0, 0]
            tot = self.counts.setdefault(name, [0, 0])
            tot[0] += done - prev[0]
            tot[1] += failed - prev[1]
        if report.latency_counts:
            prev_lat = before.latency_counts if before and before.latency_counts else [0] * len(report.latency_counts)
            for i, (now_c, prev_c) in enumerate(zip(report.latency_counts, prev_lat, strict=False)):
                self.latency[i] += now_c - prev_c
            self.latency_sum += report.latency_sum - (before.latency_sum if before else 0.0)
        for key in ("skipped", "dead_lettered", "retries", "assignments", "revocations"):
            self.scalars[key] += getattr(report, key) - (getattr(before, key) if before else 0)

    def forget(self, pid: int) -> None:
        self._seen.pop(pid, None)


def _tp(name: str) -> tuple[str, str]:
    topic, _, rest = name.rpartition("[")
    return topic, rest.rstrip("]")


class MetricsHooks(Hooks):
    def __init__(self, address: str, progress_timeout_s: float) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.progress_timeout_s = progress_timeout_s
        self.totals = Totals()
        self.snapshot = Snapshot()
        self.restarts: Counter[str] = Counter()
        self.drains = [0, 0.0]  # count, seconds
        self.server: ThreadingHTTPServer | None = None
        self.last_tick = 0.0

    # ---- hooks ----------------------------------------------------------------------------------

    def on_start(self, sup: Any) -> None:
        self.server = ThreadingHTTPServer((self.host, self.port), _handler_for(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="ksup-metrics", daemon=True).start()
        log.info("metrics and health on http://%s:%d/metrics", self.host, self.server.server_address[1])

    def on_worker_exit(self, sup: Any, slot: Any, report: Any) -> None:
        if slot.report is not None:
            self.totals.add(slot.report)
            self.totals.forget(slot.report.pid)
        if slot.exiting is not None and slot.exiting.drain_seconds:
            self.drains[0] += 1
            self.drains[1] += slot.exiting.drain_seconds
        if sup.state.value == "running" and slot.then.value != "replaced":
            self.restarts[_cause(slot, report)] += 1

    def on_tick(self, sup: Any) -> None:
        now = time.monotonic()
        self.last_tick = now
        for s in sup.slots:
            if s.report is not None and s.alive:
                self.totals.add(s.report)
        self.snapshot = Snapshot(self.families(sup), readiness.ready(sup), readiness.health(sup, now))

    def on_exit(self, sup: Any, exit_code: int) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # ---- what is served -------------------------------------------------------------------------

    def families(self, sup: Any) -> list[Metric]:
        t = self.totals
        out: list[Metric] = []
        processed = CounterMetricFamily("ksup_messages_processed", "Messages whose handler finished (stored).",
                                        labels=["topic", "partition"])
        failed = CounterMetricFamily("ksup_messages_failed", "Messages whose handler failed (not stored).",
                                     labels=["topic", "partition"])
        for name, (done, bad) in sorted(t.counts.items()):
            processed.add_metric(list(_tp(name)), done)
            failed.add_metric(list(_tp(name)), bad)
        out += [processed, failed]
        for key, help_text in (("skipped", "Failed messages stored anyway (--on-error skip)."),
                               ("dead_lettered", "Failed messages sent to the dead-letter topic."),
                               ("retries", "Handler attempts that failed and were retried."),
                               ("assignments", "Rebalances that assigned partitions to a worker."),
                               ("revocations", "Rebalances that revoked partitions from a worker.")):
            c = CounterMetricFamily(f"ksup_{key}", help_text)
            c.add_metric([], t.scalars[key])
            out.append(c)
        # The workers report cumulative bucket counts already.
        buckets = list(zip([*map(str, m.LATENCY_BUCKETS), "+Inf"], t.latency, strict=False))
        hist = HistogramMetricFamily("ksup_handler_seconds", "Handler duration per message (or batch).")
        hist.add_metric([], buckets, t.latency_sum)
        out.append(hist)
        out += self.partition_gauges(sup)
        out += self.worker_gauges(sup)
        return out

    def partition_gauges(self, sup: Any) -> list[Metric]:
        lag = GaugeMetricFamily("ksup_consumer_lag", "High watermark (librdkafka statistics) minus committed offset.",
                                labels=["topic", "partition"])
        committed = GaugeMetricFamily("ksup_committed_offset", "Committed offset (commit results).",
                                      labels=["topic", "partition"])
        high = GaugeMetricFamily("ksup_high_watermark", "High watermark (librdkafka statistics).",
                                 labels=["topic", "partition"])
        for name, (c, hw) in sorted(readiness.partition_offsets(sup).items()):
            labels = list(_tp(name))
            if c >= 0:
                committed.add_metric(labels, c)
            if hw >= 0:
                high.add_metric(labels, hw)
            if c >= 0 and hw >= 0:
                lag.add_metric(labels, max(hw - c, 0))
        return [lag, committed, high]

    def worker_gauges(self, sup: Any) -> list[Metric]:
        restarts = CounterMetricFamily("ksup_worker_restarts", "Worker restarts by cause.", labels=["cause"])
        for cause, n in sorted(self.restarts.items()):
            restarts.add_metric([cause], n)
        rss = GaugeMetricFamily("ksup_worker_rss_bytes", "Resident memory of each worker.", labels=["slot"])
        state = GaugeMetricFamily("ksup_worker_state", "1 for the state each worker slot is in.",
                                  labels=["slot", "state"])
        for s in sup.slots:
            if s.report is not None and s.alive:
                rss.add_metric([str(s.index)], s.report.rss_bytes)
            shown = s.report.state if s.report is not None and s.state.value == "running" else s.state.value
            state.add_metric([str(s.index), shown], 1)
        sup_state = GaugeMetricFamily("ksup_supervisor_state", "1 for the supervisor's state.", labels=["state"])
        sup_state.add_metric([sup.state.value], 1)
        workers = GaugeMetricFamily("ksup_workers", "Worker processes alive.")
        workers.add_metric([], sum(1 for s in sup.slots if s.alive))
        drain = GaugeMetricFamily("ksup_drain_seconds_sum", "Total seconds workers spent draining.")
        drain.add_metric([], self.drains[1])
        drains = CounterMetricFamily("ksup_drains", "Worker drains completed.")
        drains.add_metric([], self.drains[0])
        return [restarts, rss, state, sup_state, workers, drain, drains]


def _cause(slot: Any, report: Any) -> str:
    if slot.then.value == "recycle":
        return "recycle"
    if slot.stuck_reason:
        return "stuck"
    if report.signal is not None:
        return "killed"
    return {10: "handler_failed", 0: "exited"}.get(report.code, f"exit_{report.code}")


def _handler_for(hooks: MetricsHooks) -> type[BaseHTTPRequestHandler]:
    registry = CollectorRegistry(auto_describe=False)

    class _Collector:
        def collect(self) -> list[Metric]:
            return hooks.snapshot.families

    registry.register(_Collector())

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4; charset=utf-8")
            elif path == "/livez":
                age = time.monotonic() - hooks.last_tick
                ok = age < LIVE_S
                self._json(ok, [] if ok else [f"supervisor loop last ticked {age:.1f}s ago"])
            elif path == "/readyz":
                self._json(*hooks.snapshot.ready)
            elif path == "/healthz":
                self._json(*hooks.snapshot.healthy)
            else:
                self._send(404, b"not found: /metrics /livez /readyz /healthz\n", "text/plain")

        def _json(self, ok: bool, problems: list[str]) -> None:
            body = json.dumps({"ok": ok, "problems": problems}).encode() + b"\n"
            self._send(200 if ok else 503, body, "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not news
            pass

    return Handler
