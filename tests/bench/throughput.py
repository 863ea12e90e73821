"""Throughput, scaling and footprint benchmarks (ratios in one run, same machine, same broker).

1. One worker, no-op handler, 1,000,000 small messages on one partition: ksup vs the plainest
   correct confluent-kafka loop (poll, store_offsets); ksup's batch handler vs a
   consume(num_messages=500) loop. Each plain loop runs twice: with librdkafka's defaults (what
   one writes), and with the fetch settings ksup gives its workers (config.FETCH_DEFAULTS), so
   the Python side is also compared like for like. ``--rounds`` repeats this part, alternating
   the contenders, so a slow phase of the machine hits all of them; ratios are per round.
   In batch mode a third loop gives the floor of ksup's design in the same run: the
   consume(500) loop with the fetch setting, which also builds ksup's Records (the conversion its
   worker runs, supervisor.child.loop.to_records) and hands each batch to a second thread that
   drops it: the least a worker with ksup's handler API and a consumer thread of its own does.
   A fourth builds the Records and drops them in the loop's own thread: what the Records alone
   cost, before any second thread.
2. Scaling: 1, 2, 4 workers on an 8-partition topic, handler sleeping 1 ms (I/O-bound).
3. Footprint: the supervisor's RSS and CPU while idle and while 4 workers process.

    python -m tests.bench.throughput [--messages N] [--rounds R] [--throughput-only] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, Message, Producer

from supervisor.child.loop import to_records
from supervisor.config import FETCH_DEFAULTS
from supervisor.record import Record
from tests.harness import KsupRun, wait_until
from tests.kafkautil import create_topic
from tests.localkafka import LocalKafka

_topic: Any = Message.topic  # as the worker reads them: mapped over a fetch, in C
_partition: Any = Message.partition


def produce(bootstrap: str, topic: str, count: int, partitions: int) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000,
                  "queue.buffering.max.messages": 1_000_000, "compression.type": "lz4"})
    value = b"x" * 16
    for n in range(count):
        try:
            p.produce(topic, value, partition=n % partitions)
        except BufferError:
            p.poll(0.5)
            p.produce(topic, value, partition=n % partitions)
        if n % 10000 == 0:
            p.poll(0)
    assert p.flush(120) == 0


def plain_loop(bootstrap: str, topic: str, count: int, batch: bool,
               kafka: dict[str, str] | None = None, records: bool = False,
               handoff: bool = True) -> tuple[float, float]:
    """The plainest correct explicit-store loop: messages per second from first to last, and
    this process's CPU seconds (all threads, librdkafka's too) per message over the same span.
    ``kafka``: librdkafka properties besides the loop's own (none: librdkafka's defaults).
    ``records`` (batch only): each fetch also becomes ksup's Records, handed to a thread that
    drops them (the floor of ksup's design: see the module's docstring); without ``handoff``
    the loop drops them itself."""
    queued: queue.Queue[list[Record] | None] = queue.Queue(2)
    # Takes every batch and keeps none (a deque of length 0), until None.
    taker = threading.Thread(target=lambda: deque(iter(queued.get, None), maxlen=0), daemon=True)
    threaded = records and handoff
    if threaded:
        taker.start()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"plain-{batch}-{time.monotonic_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.offset.store": False, **(kafka or {})})
    c.subscribe([topic])
    seen, first, first_cpu = 0, 0.0, 0.0
    while seen < count:
        if batch:
            msgs = c.consume(num_messages=500, timeout=1.0)
            good = [m for m in msgs if m.error() is None]
            if good:
                if not first:
                    first, first_cpu = time.monotonic(), time.process_time()
                seen += len(good)
                if records:
                    built = to_records(good, list(map(_topic, good)), list(map(_partition, good)))
                    if threaded:
                        queued.put(built)
                c.store_offsets(message=good[-1])
        else:
            m = c.poll(1.0)
            if m is None or m.error() is not None:
                continue
            if not first:
                first, first_cpu = time.monotonic(), time.process_time()
            seen += 1
            c.store_offsets(message=m)
    rate = seen / (time.monotonic() - first)
    cpu = (time.process_time() - first_cpu) / seen
    c.close()
    if threaded:
        queued.put(None)
        taker.join(10)
    return rate, cpu


def ksup_rate(bootstrap: str, topic: str, count: int, work: Path, workers: int = 1, extra: list[str] | None = None,
              handler: str = "tests.bench.noop:process", sleep: float = 0.0,
              started: Callable[[KsupRun], None] | None = None) -> tuple[float, KsupRun, float]:
    """Messages per second over all workers, the run, and the workers' CPU seconds per message
    (all threads of the worker processes; the supervisor's is in the footprint)."""
    out = work / f"done-{time.monotonic_ns()}.txt"
    env = {"BENCH_COUNT": str(count // workers if workers > 1 else count), "BENCH_OUT": str(out),
           "BENCH_SLEEP": str(sleep)}
    run = KsupRun(handler, bootstrap, topic, f"ksup-{time.monotonic_ns()}", workers=workers, env=env,
                  extra=["--log-format", "json", *(extra or [])], workdir=work)
    if started is not None:
        started(run)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= workers, 900, "all processed", 0.2)
    rows = [line.split() for line in out.read_text().splitlines()]
    first = min(float(r[1]) for r in rows)
    last = max(float(r[2]) for r in rows)
    count_done = sum(int(r[3]) for r in rows)
    return count_done / (last - first), run, sum(float(r[4]) for r in rows) / count_done


def footprint(run: KsupRun, seconds: float = 5.0) -> dict[str, float]:
    proc = psutil.Process(run.proc.pid)
    proc.cpu_percent(None)
    time.sleep(seconds)
    return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "cpu_percent": round(proc.cpu_percent(None), 1)}


BATCH_FLAGS = ["--batch-size", "500", "--batch-timeout", "0.05"]


def one_round(b: str, n: int, work: Path, runs: list[KsupRun]) -> dict[str, Any]:
    """Part 1 once: each plain loop with librdkafka's defaults and with ksup's fetch settings,
    then ksup; per message, then batch. Rates in msg/s, CPU in microseconds per message."""
    res: dict[str, Any] = {}
    for mode, batch, extra, handler in (("per_message", False, [], "tests.bench.noop:process"),
                                        ("batch", True, BATCH_FLAGS, "tests.bench.noop:process_batch")):
        rate, cpu = plain_loop(b, "one", n, batch=batch)
        res[f"plain_{mode}"], res[f"cpu_plain_{mode}"] = round(rate), round(cpu * 1e6, 2)
        rate, cpu = plain_loop(b, "one", n, batch=batch, kafka=FETCH_DEFAULTS)
        res[f"plain_{mode}_fetch_tuned"], res[f"cpu_plain_{mode}_fetch_tuned"] = round(rate), round(cpu * 1e6, 2)
        if batch:
            rate, cpu = plain_loop(b, "one", n, batch=True, kafka=FETCH_DEFAULTS, records=True)
            res["floor_batch"], res["cpu_floor_batch"] = round(rate), round(cpu * 1e6, 2)
            rate, cpu = plain_loop(b, "one", n, batch=True, kafka=FETCH_DEFAULTS, records=True, handoff=False)
            res["records_inline_batch"], res["cpu_records_inline_batch"] = round(rate), round(cpu * 1e6, 2)
        rate, run, cpu = ksup_rate(b, "one", n, work, extra=extra, handler=handler)
        runs.append(run)
        res[f"ksup_{mode}"], res[f"cpu_ksup_{mode}"] = round(rate), round(cpu * 1e6, 2)
        run.signal(signal.SIGTERM)
        run.wait(60)
        res[f"ratio_{mode}"] = round(res[f"ksup_{mode}"] / res[f"plain_{mode}"], 3)
        res[f"ratio_{mode}_fetch_tuned"] = round(res[f"ksup_{mode}"] / res[f"plain_{mode}_fetch_tuned"], 3)
        res[f"cpu_ratio_{mode}"] = round(res[f"cpu_ksup_{mode}"] / res[f"cpu_plain_{mode}"], 2)
        res[f"cpu_ratio_{mode}_fetch_tuned"] = round(res[f"cpu_ksup_{mode}"] / res[f"cpu_plain_{mode}_fetch_tuned"], 2)
        if batch:  # how far the floor alone is from the goal, and ksup from the floor
            res["cpu_ratio_floor_batch"] = round(res["cpu_floor_batch"] / res["cpu_plain_batch"], 2)
            res["cpu_ratio_records_inline_batch"] = round(res["cpu_records_inline_batch"] / res["cpu_plain_batch"], 2)
            res["cpu_ratio_batch_to_floor"] = round(res["cpu_ksup_batch"] / res["cpu_floor_batch"], 2)
    return res


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--throughput-only", action="store_true", help="part 1 only (no scaling, no footprint)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="ksup-bench-"))
    broker = LocalKafka()
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                               "messages": n, "fetch_tuned": FETCH_DEFAULTS}
    runs: list[KsupRun] = []
    try:
        broker.start()
        b = broker.bootstrap
        create_topic(b, "one", 1)
        t0 = time.monotonic()
        produce(b, "one", n, 1)
        results["produce_s"] = round(time.monotonic() - t0, 1)
        rounds = []
        for r in range(args.rounds):
            rounds.append(one_round(b, n, work, runs))
            print(json.dumps({"round": r + 1, **rounds[-1]}), flush=True)
        results["rounds"] = rounds
        # The figures of the whole run: medians over the rounds (the keys plot.py reads).
        for key in rounds[0]:
            results[key] = statistics.median(rd[key] for rd in rounds)
        if args.throughput_only:
            return finish(results, args.json)

        create_topic(b, "eight", 8)
        scaled = 40_000
        produce(b, "eight", scaled * 3, 8)
        results["scaling"] = {}
        busy: dict[str, float] = {}

        def measure_while_busy(run: KsupRun) -> None:
            def measure() -> None:
                time.sleep(4)  # boot and join; the 4 workers then process for ~10 s
                busy.update(footprint(run, 3.0))
            threading.Thread(target=measure, daemon=True).start()

        for workers in (1, 2, 4):
            rate, run, _ = ksup_rate(b, "eight", scaled, work, workers=workers, sleep=0.001,
                                     started=measure_while_busy if workers == 4 else None)
            runs.append(run)
            results["scaling"][workers] = round(rate)
            if workers == 4:
                results["footprint_busy"] = dict(busy)
            run.signal(signal.SIGTERM)
            run.wait(60)
        create_topic(b, "idle", 4)
        run = KsupRun("tests.bench.noop:process", b, "idle", "idle", workers=4, workdir=work)
        runs.append(run)
        run.wait_for_log("all 4 workers loaded", 60)
        time.sleep(3)
        results["footprint_idle"] = footprint(run)
        run.signal(signal.SIGTERM)
        run.wait(60)
    finally:
        for r in runs:
            r.kill_everything()
        broker.cleanup()
    return finish(results, args.json)


def finish(results: dict[str, Any], json_path: str | None) -> int:
    print(json.dumps(results, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
