"""Reporter: the worker's state, sent to the supervisor on change and at a steady interval."""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING

import psutil

from supervisor.child.offsets import tp_name
from supervisor.contract import messages as m
from supervisor.contract.channel import Channel

if TYPE_CHECKING:
    from supervisor.child.loop import ConsumerLoop


class Reporter:
    def __init__(self, channel: Channel, interval_s: float) -> None:
        self.channel = channel
        self.interval_s = interval_s
        self._last = 0.0
        self._proc = psutil.Process(os.getpid())

    def maybe_send(self, loop: ConsumerLoop, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        oldest = loop.runner.oldest_running()
        in_flight = None
        if oldest is not None:
            r = oldest[0]
            in_flight = m.InFlight(r.topic, r.partition, r.offset, oldest[1])
        book = loop.book
        latency, latency_sum = loop.runner.latency()
        self.channel.send(m.Report(
            pid=os.getpid(),
            state=loop.state,
            assignment=sorted(tp_name(tp) for tp in book.owned),
            in_flight=in_flight,
            processed=loop.processed,
            failed=loop.failed,
            stored={tp_name(tp): b.stored for tp, b in book.owned.items() if b.stored >= 0},
            committed={tp_name(tp): b.committed for tp, b in book.history.items() if b.committed >= 0},
            rss_bytes=self._proc.memory_info().rss,
            revocations=loop.revocations,
            skipped=loop.skipped,
            dead_lettered=loop.dead_lettered,
            retries=loop.runner.retries,
            assignments=loop.assignments,
            counts={tp_name(tp): list(v) for tp, v in loop.counts.items()},
            high_watermarks={k: v for k, v in loop.high_watermarks.items()
                             if (k.rpartition("[")[0], int(k.rpartition("[")[2][:-1])) in book.owned},
            latency_counts=list(itertools.accumulate(latency)),
            latency_sum=latency_sum,
            at=time.time(),
            problems=loop.problems.lines(),
            handler_threads=loop.runner.concurrency,
            handler_threads_alive=loop.runner.threads_alive(),
            group_state=loop.group_state,
            join_state=loop.join_state,
            group_seen_at=loop.group_seen_at,
            rebalanced_at=loop.rebalanced_at,
        ))
