"""`make demo`: a local Kafka broker, 4,000 orders, `ksup start --workers 4`, a SIGTERM while the
handlers are busy, a restart that finishes the work, and a count that shows nothing was lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.kafkautil import committed_offsets, create_topic, end_offsets  # noqa: E402
from tests.localkafka import LocalKafka  # noqa: E402

ORDERS, PARTITIONS, TOPIC, GROUP = 4000, 8, "orders", "billing"
WORK = REPO / ".demo"


def produce_orders(bootstrap: str) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for n in range(ORDERS):
        order = {"id": n, "items": [{"qty": 1 + n % 3, "price": 9.5}, {"qty": 1, "price": n % 7}]}
        p.produce(TOPIC, json.dumps(order).encode(), key=str(n).encode())
        p.poll(0)
    p.flush(30)


def ksup(bootstrap: str, ledger: Path, receipt: Path) -> subprocess.Popen[bytes]:
    cmd = [str(Path(sys.executable).parent / "ksup"), "start", "--workers", "4",
           "--bootstrap-servers", bootstrap, "--group", GROUP, "--topic", TOPIC,
           "--log-format", "text", "--receipt", str(receipt), "handler:process"]
    print("$", " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=REPO / "examples", env={**os.environ, "DEMO_LEDGER": str(ledger)},
                            start_new_session=True)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def unique_done(path: Path) -> int:
    return len({tuple(line.split()[:2]) for line in lines(path)})


def main() -> int:
    WORK.mkdir(exist_ok=True)
    ledger, receipt = WORK / "ledger.txt", WORK / "receipt.json"
    ledger.unlink(missing_ok=True)
    broker = LocalKafka(WORK / "kafka")
    proc: subprocess.Popen[bytes] | None = None
    try:
        print("== starting a local Kafka broker (Apache Kafka 4.3.1, KRaft, 127.0.0.1)", flush=True)
        broker.start()
        print(f"   {broker.bootstrap}, up in {broker.start_seconds:.1f}s, RSS {broker.rss_bytes() >> 20} MiB")
        create_topic(broker.bootstrap, TOPIC, PARTITIONS)
        produce_orders(broker.bootstrap)
        print(f"== produced {ORDERS} orders to {TOPIC} ({PARTITIONS} partitions)\n", flush=True)

        proc = ksup(broker.bootstrap, ledger, receipt)
        while len(lines(ledger)) < ORDERS // 3:
            time.sleep(0.05)
        print(f"\n== SIGTERM to ksup while handlers are busy ({len(lines(ledger))} done)", flush=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        first = json.loads(receipt.read_text())
        print(f"== ksup exited {code}; receipt (last processed -> committed):")
        for name, part in first["partitions"].items():
            print(f"   {name:<12} {part['last_processed']:>6} -> {part['committed']}")

        print("\n== starting again to finish the work", flush=True)
        proc = ksup(broker.bootstrap, ledger, receipt)
        while unique_done(ledger) < ORDERS:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)

        seen = Counter(tuple(line.split()[:2]) for line in lines(ledger))
        ends = end_offsets(broker.bootstrap, TOPIC, PARTITIONS)
        committed = committed_offsets(broker.bootstrap, GROUP, TOPIC, PARTITIONS)
        lost = sum(1 for p, end in ends.items() for o in range(end) if (str(p), str(o)) not in seen)
        dups = sum(n - 1 for n in seen.values() if n > 1)
        print(f"\n== ksup exited {code}")
        print(f"   produced {sum(ends.values())}, processed {len(seen)}, lost {lost}, processed twice {dups}")
        print(f"   committed == end of partition for every partition: {committed == ends}")
        return 0 if lost == 0 and committed == ends else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        broker.cleanup()


if __name__ == "__main__":
    sys.exit(main())
