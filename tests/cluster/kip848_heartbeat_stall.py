"""Reproduces a librdkafka KIP-848 stall the cluster suite ran into (not a ksup bug; plain
confluent-kafka consumers here, no ksup):

member A owns every partition; member B joins; the group coordinator freezes (SIGSTOP) for
1.6 s, so A's next ConsumerGroupHeartbeat times out (librdkafka's request timeout is the
heartbeat interval, 1 s on the test brokers). The broker answered that request with A's new
target assignment (give partitions to B), which A never read; A's following heartbeats are
partial (no owned partitions, no subscription) and the broker does not send the assignment
again. A keeps every partition, B gets none, the group is not Stable, until the broker's
rebalance timeout (max.poll.interval.ms, 300 s) expels A. Measured with librdkafka 2.16.0 and
Kafka 4.3.1: stuck in 3 of 6 tries over three runs, 300 s each time it was waited out.

    python -m tests.cluster.kip848_heartbeat_stall [TRIES]     # exit 1 when a try got stuck
"""

from __future__ import annotations

import random
import sys
import threading
import time

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.cluster.brokerview import BrokerView
from tests.localcluster import LocalKafkaCluster

STUCK_AFTER_S = 30.0  # balanced within a few seconds normally


def _member(bootstrap: str, group: str, name: str, owned: dict[str, set[int]], stop: threading.Event) -> None:
    def on_assign(consumer: Consumer, parts: list) -> None:  # type: ignore[type-arg]
        owned[name] = owned.get(name, set()) | {p.partition for p in parts}

    def on_revoke(consumer: Consumer, parts: list) -> None:  # type: ignore[type-arg]
        owned[name] = owned.get(name, set()) - {p.partition for p in parts}

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "group.instance.id": name,
                         "group.protocol": "consumer", "log_level": 3})
    consumer.subscribe(["x"], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
    while not stop.is_set():
        consumer.poll(0.1)
    consumer.close()


def main(argv: list[str]) -> int:
    tries = int(argv[0]) if argv else 3
    cluster = LocalKafkaCluster(overrides={"group.consumer.heartbeat.interval.ms": "1000"})
    stuck = 0
    try:
        cluster.start()
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        admin.create_topics([NewTopic("x", 3)])["x"].result(30)
        view = BrokerView(cluster.bootstrap)
        for n in range(tries):
            group, owned, stop = f"g{n}", {}, threading.Event()
            members = [threading.Thread(target=_member, args=(cluster.bootstrap, group, name, owned, stop), daemon=True)
                       for name in ("a", "b")]
            members[0].start()
            deadline = time.monotonic() + 30
            while owned.get("a") != {0, 1, 2} and time.monotonic() < deadline:
                time.sleep(0.1)
            coordinator = cluster.coordinator(group)
            members[1].start()
            time.sleep(random.uniform(0.0, 1.5))
            cluster.pause_node(coordinator)
            time.sleep(1.6)
            cluster.resume_node(coordinator)
            t0 = time.monotonic()
            while time.monotonic() - t0 < STUCK_AFTER_S:
                answer = view.describe(group)
                if answer.get("state") == "STABLE" and owned.get("b"):
                    break
                time.sleep(0.5)
            else:
                stuck += 1
            print(f"try {n}: {'STUCK' if not owned.get('b') else 'balanced'} after the coordinator froze: "
                  f"{ {k: sorted(v) for k, v in owned.items()} }, broker {view.describe(group)}", flush=True)
            stop.set()
            for t in members:
                t.join(30)
        view.close()
    finally:
        cluster.cleanup()
    print(f"{stuck} of {tries} tries stuck for more than {STUCK_AFTER_S:.0f}s")
    return 1 if stuck else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
