"""ksup against its peers, in one run, on the same broker and the same topics (issue 16).

Single process, one partition, no-op handler: the plain ``poll()`` + ``store_offsets()`` loop (the
baseline), ksup with one worker, Arroyo ``RunTask``, Quix Streams. Four processes, four
partitions: ksup ``--workers 4`` against Arroyo ``RunTaskWithMultiprocessing`` with 4 processes.
Runs alternate (round 1 of every contender, then round 2, ...), so a slow phase of the machine
hits all of them; every figure is a ratio against the baseline of the same round.

Arroyo and Quix Streams run from virtual environments of their own (each brings the
confluent-kafka it pins; the librdkafka each used is reported), made by ``make bench``::

    python -m tests.bench.peers [--messages N] [--rounds R] [--json FILE]
        [--arroyo-python .venv-peers/arroyo/bin/python] [--quix-python .venv-peers/quix/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import libversion

from tests.bench.throughput import plain_loop, produce
from tests.harness import KsupRun, wait_until
from tests.kafkautil import create_topic
from tests.localkafka import LocalKafka

HERE = Path(__file__).resolve().parent
PEER_TIMEOUT_S = 900.0


def peer_rate(python: str, args: list[str], out: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one peer consumer script until it wrote its line; rate, CPU per message, librdkafka."""
    proc = subprocess.Popen([python, *args, str(out)], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: out.exists() and out.read_text().strip() != "" or proc.poll() is not None,
                   PEER_TIMEOUT_S, f"{args[0]} done", 0.2)
        if not out.exists():
            raise RuntimeError(f"{args[0]} exited {proc.returncode}: {proc.stderr.read()[-2000:]!r}")  # type: ignore[union-attr]
        _pid, first, last, count, cpu, librdkafka = out.read_text().split()[:6]
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        return {"rate": int(count) / (float(last) - float(first)), "cpu_us": float(cpu) / int(count) * 1e6,
                "librdkafka": librdkafka}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def ksup_run(bootstrap: str, topic: str, count: int, partitions: int, work: Path, workers: int) -> dict[str, Any]:
    """ksup on the whole topic: done when every partition's last message is (each worker notes
    it; the group may move partitions between workers while it starts)."""
    out = work / f"done-{time.monotonic_ns()}.txt"
    env = {"BENCH_PARTITION_END": str(count // partitions), "BENCH_OUT": str(out)}
    run = KsupRun("tests.bench.noop:process", bootstrap, topic, f"ksup-{time.monotonic_ns()}", workers=workers,
                  env=env, extra=["--log-format", "json"], workdir=work)
    try:
        def rows() -> list[list[str]]:
            return [line.split() for line in out.read_text().splitlines()] if out.exists() else []
        wait_until(lambda: len({r[5] for r in rows()}) == partitions, PEER_TIMEOUT_S, "every partition done", 0.2)
        first, last = min(float(r[1]) for r in rows()), max(float(r[2]) for r in rows())
        cpu = sum(float(r[4]) for r in {r[0]: r for r in rows()}.values())  # each worker's last line
        run.signal(signal.SIGTERM)
        run.wait(60)
    finally:
        run.kill_everything()
    return {"rate": count / (last - first), "cpu_us": cpu / count * 1e6, "librdkafka": libversion()[0]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--arroyo-python", default=".venv-peers/arroyo/bin/python")
    parser.add_argument("--quix-python", default=".venv-peers/quix/bin/python")
    args = parser.parse_args()
    n = args.messages
    work = Path(tempfile.mkdtemp(prefix="ksup-peers-"))
    broker = LocalKafka()
    rounds: list[dict[str, dict[str, Any]]] = []
    have_arroyo, have_quix = Path(args.arroyo_python).exists(), Path(args.quix_python).exists()
    try:
        broker.start()
        b = broker.bootstrap
        create_topic(b, "one", 1)
        create_topic(b, "four", 4)
        produce(b, "one", n, 1)
        produce(b, "four", n, 4)
        for r in range(args.rounds):
            res: dict[str, dict[str, Any]] = {}
            rate, cpu = plain_loop(b, "one", n, batch=False)
            res["plain poll loop"] = {"rate": rate, "cpu_us": cpu * 1e6, "librdkafka": libversion()[0]}
            res["ksup, 1 worker"] = ksup_run(b, "one", n, 1, work, 1)
            if have_arroyo:
                res["Arroyo RunTask"] = peer_rate(args.arroyo_python, [str(HERE / "peer_arroyo.py"), "run-task", b,
                                                  "one", str(n)], work / f"arroyo-{r}.txt")
            if have_quix:
                res["Quix Streams"] = peer_rate(args.quix_python, [str(HERE / "peer_quix.py"), b, "one", str(n)],
                                                work / f"quix-{r}.txt")
            res["ksup, 4 workers (4 partitions)"] = ksup_run(b, "four", n, 4, work, 4)
            if have_arroyo:
                res["Arroyo multiprocessing, 4 processes (4 partitions)"] = peer_rate(
                    args.arroyo_python, [str(HERE / "peer_arroyo.py"), "multiprocessing", b, "four", str(n)],
                    work / f"arroyo-mp-{r}.txt", env={"BENCH_PROCESSES": "4"})
            base = res["plain poll loop"]["rate"]
            for v in res.values():
                v["ratio"] = round(v["rate"] / base, 3)
                v["rate"], v["cpu_us"] = round(v["rate"]), round(v["cpu_us"], 2)
            rounds.append(res)
            print(json.dumps({"round": r + 1, **res}, indent=2), flush=True)
    finally:
        broker.cleanup()
    summary = {name: {"median_ratio": statistics.median(rd[name]["ratio"] for rd in rounds),
                      "ratios": [rd[name]["ratio"] for rd in rounds], "librdkafka": rounds[0][name]["librdkafka"]}
               for name in rounds[0]}
    result = {"messages": n, "machine": f"{os.cpu_count()} cores", "rounds": rounds, "summary": summary,
              "skipped": [p for p, ok in (("arroyo", have_arroyo), ("quix", have_quix)) if not ok]}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
