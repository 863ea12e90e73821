"""Fairness under a backlog (issue 16): with a slow handler and a backlog on every partition, how
long does a partition with waiting messages go untouched? One consumer, 4 partitions of
BACKLOG messages each, produced before it starts; a 5 ms handler. For every partition: the
longest time between the start (first handler call of anybody) or its previous message and its
next message, while it still had messages waiting. The plain ``poll()`` loop with the same
handler is the baseline of the same run (it handles messages in librdkafka's fetch order)::

    python -m tests.bench.fairness [--backlog N] [--sleep S] [--json FILE]
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


def ksup(bootstrap: str, topic: str, count: int, sleep: float, work: Path) -> dict[int, float]:
    record = work / f"fair-{time.monotonic_ns()}.txt"
    run = KsupRun("tests.bench.timed_handler:process", bootstrap, topic, f"fair-{time.monotonic_ns()}",
                  env={"BENCH_RECORD": str(record), "BENCH_SLEEP": str(sleep)}, workdir=work)
    try:
        wait_until(lambda: record.exists() and len(record.read_text().splitlines()) >= count, 600, "all handled", 0.5)
        run.signal(signal.SIGTERM)
        run.wait(60)
    finally:
        run.kill_everything()
    # The handler writes after its sleep: the start is the write time less the sleep.
    rows = [line.split() for line in record.read_text().splitlines()]
    return longest_untouched([(int(r[0]), int(r[3]) / 1e9 - sleep) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog", type=int, default=400, help="messages per partition")
    parser.add_argument("--sleep", type=float, default=0.005, help="handler seconds per message")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ksup-fair-"))
    broker = LocalKafka()
    count = args.backlog * PARTITIONS
    result: dict[str, Any] = {"partitions": PARTITIONS, "backlog": args.backlog, "handler_s": args.sleep}
    try:
        broker.start()
        create_topic(broker.bootstrap, "fair", PARTITIONS)
        produce(broker.bootstrap, "fair", count, PARTITIONS)
        for name, measure in (("plain poll loop", lambda: plain(broker.bootstrap, "fair", count, args.sleep)),
                              ("ksup, 1 worker", lambda: ksup(broker.bootstrap, "fair", count, args.sleep, work))):
            worst = measure()
            result[name] = {"longest_untouched_s": round(max(worst.values()), 3),
                            "per_partition_s": {str(p): round(v, 3) for p, v in sorted(worst.items())}}
    finally:
        broker.cleanup()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
