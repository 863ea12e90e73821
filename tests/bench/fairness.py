"""Fairness under a backlog (issue 16): with a slow handler and a backlog on every partition, how
long does a partition with waiting messages go untouched? One consumer, 4 partitions of
BACKLOG messages each, produced before it starts; a 5 ms handler. For every partition: the
longest time between the start (first handler call of anybody) or its previous message and its
next message, while it still had messages waiting. The plain ``poll()`` loop with the same
handler is the baseline of the same run (it handles messages in librdkafka's fetch order), and
so is ksup with its fairness rule switched off (``KSUP_FAIR_FETCH=0``): what the rule costs in
run time (first handler start to last message handled)::

    python -m tests.bench.fairness [--backlog N] [--partitions N] [--sleep S] [--concurrency N] [--runs N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer

from tests.bench.throughput import produce
from tests.harness import KsupRun, wait_until
from tests.kafkautil import create_topic
from tests.localkafka import LocalKafka

PARTITIONS = 4


def longest_untouched(starts: list[tuple[int, float]]) -> dict[int, float]:
    """Partition -> longest wait between handler starts (seconds), counted from the first start
    of all; ``starts`` is (partition, monotonic seconds) in handling order."""
    begin = min(t for _, t in starts)
    last: dict[int, float] = {}
    worst: dict[int, float] = {}
    for p, t in sorted(starts, key=lambda s: s[1]):
        worst[p] = max(worst.get(p, 0.0), t - last.get(p, begin))
        last[p] = t
    return worst


def plain(bootstrap: str, topic: str, count: int, sleep: float) -> dict[int, float]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"plain-fair-{time.monotonic_ns()}",
                  "auto.offset.reset": "earliest", "enable.auto.offset.store": False})
    c.subscribe([topic])
    starts: list[tuple[int, float]] = []
    while len(starts) < count:
        m = c.poll(1.0)
        if m is None or m.error() is not None:
            continue
        starts.append((m.partition(), time.monotonic()))
        time.sleep(sleep)
        c.store_offsets(message=m)
    c.close()
    return longest_untouched(starts)


def ksup(bootstrap: str, topic: str, count: int, sleep: float, work: Path, concurrency: int = 1,
         fair: bool = True) -> tuple[dict[int, float], float]:
    """Longest untouched per partition, and the run time (seconds)."""
    record = work / f"fair-{time.monotonic_ns()}.txt"
    env = {"BENCH_RECORD": str(record), "BENCH_SLEEP": str(sleep), **({} if fair else {"KSUP_FAIR_FETCH": "0"})}
    run = KsupRun("tests.bench.timed_handler:process", bootstrap, topic, f"fair-{time.monotonic_ns()}",
                  env=env, workdir=work, extra=["--concurrency", str(concurrency)])
    try:
        wait_until(lambda: record.exists() and len(record.read_text().splitlines()) >= count, 600, "all handled", 0.5)
        run.signal(signal.SIGTERM)
        run.wait(60)
    finally:
        run.kill_everything()
    # The handler writes after its sleep: the start is the write time less the sleep.
    rows = [line.split() for line in record.read_text().splitlines()]
    ends = [int(r[3]) / 1e9 for r in rows]
    return longest_untouched([(int(r[0]), t - sleep) for r, t in zip(rows, ends, strict=True)]), \
        max(ends) - min(ends) + sleep


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=400, help="messages per partition")
    parser.add_argument("--partitions", type=int, default=PARTITIONS)
    parser.add_argument("--sleep", type=float, default=0.005, help="handler seconds per message")
    parser.add_argument("--concurrency", type=int, default=1, help="ksup's handler threads")
    parser.add_argument("--runs", type=int, default=1, help="alternating runs of each")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ksup-fair-"))
    broker = LocalKafka()
    count = args.backlog * args.partitions
    result: dict[str, Any] = {"partitions": args.partitions, "backlog": args.backlog, "handler_s": args.sleep,
                              "concurrency": args.concurrency}
    b = broker
    measures = {
        "ksup, 1 worker": lambda: ksup(b.bootstrap, "fair", count, args.sleep, work, args.concurrency),
        "ksup, 1 worker, fairness off": lambda: ksup(b.bootstrap, "fair", count, args.sleep, work,
                                                     args.concurrency, fair=False),
    }
    if not args.no_plain:
        measures = {"plain poll loop": lambda: (plain(b.bootstrap, "fair", count, args.sleep), 0.0), **measures}
    try:
        broker.start()
        create_topic(broker.bootstrap, "fair", args.partitions)
        produce(broker.bootstrap, "fair", count, args.partitions)
        for _ in range(args.runs):
            for name, measure in measures.items():
                worst, took = measure()
                entry = result.setdefault(name, {"longest_untouched_s": [], "run_s": [], "per_partition_s": []})
                entry["longest_untouched_s"].append(round(max(worst.values()), 3))
                entry["run_s"].append(round(took, 3))
                entry["per_partition_s"].append({str(p): round(v, 3) for p, v in sorted(worst.items())})
                print(name, entry["longest_untouched_s"][-1], entry["run_s"][-1], flush=True)
    finally:
        broker.cleanup()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
