"""Small helpers the tests use against the real broker: topics, producing, reading offsets."""

from __future__ import annotations

import concurrent.futures
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    """Create ``name`` and wait until every partition has a leader. A broker that was frozen by
    the test before (SIGSTOP, then SIGCONT) may take longer than one request's 30 s to answer
    again: the request is retried until 90 s have passed, and a topic that an earlier, timed-out
    attempt did create counts as created."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    give_up = time.monotonic() + 90
    while True:
        fut = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)],
                                  request_timeout=30)
        try:
            fut[name].result(35)
            break
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                break
            if not (err.retriable() or err.code() in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT)) \
                    or time.monotonic() >= give_up:
                raise
        except concurrent.futures.TimeoutError:
            if time.monotonic() >= give_up:
                raise
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until every partition has a leader
        md = admin.list_topics(name, timeout=10).topics.get(name)
        if md and md.error is None and len(md.partitions) == partitions and all(
                p.leader >= 0 for p in md.partitions.values()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} not ready")


def produce_sequence(bootstrap: str, topic: str, count: int, start: int = 0, partitions: int | None = None) -> None:
    """Produce values ``seq-<n>``, spread round-robin over partitions when given."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    for n in range(start, start + count):
        kwargs = {"partition": n % partitions} if partitions else {}
        while True:
            try:
                p.produce(topic, value=f"seq-{n}".encode(), key=str(n).encode(), **kwargs)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    left = p.flush(60)
    assert left == 0, f"{left} messages not delivered"


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ksup-test-probe"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


_COORDINATOR_MOVING = ("NOT_COORDINATOR", "COORDINATOR_LOAD_IN_PROGRESS", "COORDINATOR_NOT_AVAILABLE")


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets, as the broker has them. A broker that just started (or a
    coordinator that moved) answers NOT_COORDINATOR or COORDINATOR_LOAD_IN_PROGRESS for a
    while (seen in full runs on a fresh broker): asked again, for up to 30 s."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + 30
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        while True:
            try:
                tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
                return {tp.partition: tp.offset for tp in tps}
            except KafkaException as exc:
                if exc.args[0].name() not in _COORDINATOR_MOVING or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # paces the retries only
    finally:
        c.close()


def free_port_unused() -> int:
    """A loopback port nothing listens on (bound and released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
