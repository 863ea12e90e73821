"""Drain latency: SIGTERM to supervisor exit, 4 workers, idle and with a 200 ms handler, broken
down from the workers' own "drained" log lines (handler wait, commit, waiting for the others,
close), several runs each.

    python -m tests.bench.drain [--runs 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from tests.harness import KsupRun, wait_until
from tests.kafkautil import create_topic, produce_sequence
from tests.localkafka import LocalKafka

_STEPS = re.compile(r"handler ([\d.]+)s, commit ([\d.]+)s, wait for others ([\d.]+)s, close ([\d.]+)s")


def one(bootstrap: str, busy: bool, work: Path, n: int) -> dict[str, float]:
    topic = group = f"drain-{'busy' if busy else 'idle'}-{n}-{time.monotonic_ns()}"
    create_topic(bootstrap, topic, 8)
    if busy:
        produce_sequence(bootstrap, topic, 2000, partitions=8)
    env = {"BENCH_SLEEP": "0.2" if busy else "0", "BENCH_COUNT": "100000000", "BENCH_OUT": ""}
    run = KsupRun("tests.bench.noop:process", bootstrap, topic, group, workers=4, env=env, workdir=work)
    try:
        wait_until(lambda: _all_assigned(group), 60, "every worker has partitions")
        time.sleep(3 if busy else 2)  # busy: every worker mid-handler; idle: group settled
        t0 = time.monotonic()
        run.signal(signal.SIGTERM)
        code = run.wait(60)
        total = time.monotonic() - t0
        steps = [tuple(map(float, m.groups())) for m in _STEPS.finditer(run.log_text())]
        worst = max(steps, key=sum) if steps else (0.0, 0.0, 0.0, 0.0)
        return {"exit": code, "total_s": total, "handler_s": worst[0], "commit_s": worst[1],
                "wait_s": worst[2], "close_s": worst[3]}
    finally:
        run.kill_everything()


def _all_assigned(group: str) -> bool:
    from supervisor.adapters.control import default_socket_path, request

    try:
        workers = request(default_socket_path(group), {"cmd": "status"})["workers"]
    except (OSError, ValueError, KeyError):
        return False
    return len(workers) == 4 and all(w["partitions"] for w in workers)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ksup-bench-"))
    broker = LocalKafka()
    results: dict[str, Any] = {}
    try:
        broker.start()
        for busy in (False, True):
            runs = [one(broker.bootstrap, busy, work, i) for i in range(args.runs)]
            results["busy (200 ms handler)" if busy else "idle"] = {
                k: round(median(r[k] for r in runs), 3) for k in runs[0]}
    finally:
        broker.cleanup()
    print("| 4 workers | SIGTERM to exit (median) | handler wait | commit | wait for others | close |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['total_s']} s | {r['handler_s']} s | {r['commit_s']} s | {r['wait_s']} s | "
              f"{r['close_s']} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
