"""Rolling-reload disruption benchmark: 4 workers on an 8-partition topic under steady load;
replace every worker with (a) ksup reload, static membership, (b) ksup reload, dynamic
membership (cooperative), (c) the naive way: stop everything, start everything (with dynamic membership, as other
supervisors do, and with ksup's static membership).

Measures per mode: the longest time any partition went without a processed message around the
change (under 400 msg/s, 50/s per partition, normal gaps are ~20 ms), duplicates and losses.

    python -m tests.bench.reload [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.harness import REPO, KsupRun, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets
from tests.localkafka import LocalKafka
from tests.test_rolling_reload import SteadyProducer

PARTITIONS, WORKERS, RATE = 8, 4, 400


def rows(path: Path) -> list[tuple[int, int, int, int]]:
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]  # type: ignore[misc]


def one_mode(bootstrap: str, mode: str, work: Path) -> dict[str, object]:
    topic = group = f"bench-reload-{mode}-{os.getpid()}"
    create_topic(bootstrap, topic, PARTITIONS)
    record = work / f"{mode}.txt"
    env = {"BENCH_RECORD": str(record), "BENCH_SLEEP": "0.001"}
    extra = ["--no-static-membership"] if mode in ("dynamic", "naive") else []
    handler = "tests.bench.timed_handler:process"
    run = KsupRun(handler, bootstrap, topic, group, workers=WORKERS, env=env, extra=extra, workdir=work)
    producer = SteadyProducer(bootstrap, topic, RATE)
    producer.start()
    runs = [run]
    try:
        wait_until(lambda: record.exists() and len({r[2] for r in rows(record)}) == WORKERS, 120, "all busy")
        time.sleep(3)
        t0 = time.monotonic_ns()
        if mode.startswith("naive"):
            old_pids = {r[2] for r in rows(record)}
            run.signal(signal.SIGTERM)
            assert run.wait(60) == 0
            run = KsupRun(handler, bootstrap, topic, group, workers=WORKERS, env=env, extra=extra, workdir=work)
            runs.append(run)
            wait_until(lambda: len({r[2] for r in rows(record)} - old_pids) == WORKERS, 120, "restarted")
        else:
            out = subprocess.run([sys.executable, "-m", "supervisor", "reload", "-g", group], capture_output=True,
                                 text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert out.returncode == 0, out.stderr
        t1 = time.monotonic_ns()
        time.sleep(3)
    finally:
        producer.stopped.set()
        producer.join(30)
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    wait_until(lambda: committed_offsets(bootstrap, group, topic, PARTITIONS) == ends, 180, "all committed", 0.5)
    run.stop(60)
    for r in runs:
        r.kill_everything()
    got = rows(record)
    seen = Counter((p, o) for p, o, _, _ in got)
    lost = sum(1 for p, end in ends.items() for o in range(end) if (p, o) not in seen)
    dups = sum(n - 1 for n in seen.values() if n > 1)
    worst = 0.0
    timeline: dict[int, list[tuple[float, float]]] = {}  # partition -> (seconds since t0, gap before it)
    for p in range(PARTITIONS):
        times = sorted(ts for q, _, _, ts in got if q == p and t0 - 2e9 <= ts <= t1 + 2e9)
        gaps = [(b - a) / 1e9 for a, b in zip(times, times[1:], strict=False)]
        worst = max([worst, *gaps])
        timeline[p] = [(round((b - t0) / 1e9, 3), round(g, 3)) for b, g in zip(times[1:], gaps, strict=True)]
    return {"mode": mode, "max_partition_gap_s": round(worst, 3), "duplicates": dups, "lost": lost,
            "change_s": round((t1 - t0) / 1e9, 2), "messages": sum(ends.values()), "gaps": timeline}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ksup-bench-"))
    broker = LocalKafka()
    try:
        broker.start()
        results = [one_mode(broker.bootstrap, mode, work) for mode in ("static", "dynamic", "naive", "naive-static")]
    finally:
        broker.cleanup()
    print("| replace 4 workers | longest partition gap | duplicates | lost | change took |")
    print("|---|---|---|---|---|")
    labels = {"static": "ksup reload, static membership", "dynamic": "ksup reload, dynamic (cooperative)",
              "naive": "stop all, start all (dynamic membership)",
              "naive-static": "stop all, start all (static membership)"}
    for r in results:
        print(f"| {labels[str(r['mode'])]} | {r['max_partition_gap_s']} s | {r['duplicates']} | {r['lost']} | "
              f"{r['change_s']} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
