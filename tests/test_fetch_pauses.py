"""The worker's pauses of fetching (retry backoffs), against a real broker with the real
ConsumerLoop and HandlerRunner in this process (as tests/test_fetch_concurrency.py drives
them). Oracles: the handler's own list of (partition, offset), and the broker's committed
offsets."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer

from supervisor.child.policies import ErrorPolicy, Executor
from tests.kafkautil import committed_offsets, create_topic, produce_sequence
from tests.test_fetch_concurrency import _commit_what_is_stored, _conf, _make, _step_until


def _all_stored(loop: Any, topic: str, ends: dict[int, int]) -> bool:
    owned = loop.book.owned
    return all((topic, p) in owned and owned[(topic, p)].stored >= end for p, end in ends.items())


def test_a_partition_revoked_during_its_retry_backoff_is_fetched_again_when_it_comes_back(bootstrap, names):
    """Both partitions' messages at offset 5 fail once and wait out a 3 s retry backoff, their
    fetching paused; meanwhile a second member joins and leaves, so a partition goes and comes
    back. librdkafka keeps an application's pause across an unassign: on the old code the
    partition came back paused and was never fetched again (its lag grew while ksup looked
    healthy). Everything must be handled and committed."""
    topic, group = names
    per_partition = 40
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, per_partition * 2, partitions=2)
    failed: set[int] = set()
    handled: list[tuple[int, int]] = []

    def one(record):
        if record.offset == 5 and record.partition not in failed:
            failed.add(record.partition)
            raise RuntimeError("flaky")
        handled.append((record.partition, record.offset))

    executor = Executor(one, [ErrorPolicy.RETRY, ErrorPolicy.STOP], 2, 3.0, None, set())
    runner, consumer, loop = _make(bootstrap, group, topic, executor)
    ends = {0: per_partition, 1: per_partition}
    got_other: list[int] = []
    try:
        _step_until(loop, lambda: loop.paused == {(topic, 0), (topic, 1)}, 60, "both partitions backing off")
        other = Consumer({**_conf(bootstrap, group), "enable.auto.commit": "false"})
        other.subscribe([topic], on_assign=lambda c, ps: got_other.extend(p.partition for p in ps))
        deadline = time.monotonic() + 60
        while not got_other:  # both members served: this thread drives both loops
            assert time.monotonic() < deadline, "no assignment for the second member"
            other.poll(0.01)
            loop.step(time.monotonic())
        other.close()  # leaves at once: its partition comes back
        back = (topic, got_other[0])
        _step_until(loop, lambda: back in loop.book.owned, 60, "the partition back")
        _step_until(loop, lambda: _all_stored(loop, topic, ends), 30,
                    f"everything stored (partition {back[1]} came back during its backoff)")
        _commit_what_is_stored(consumer)
    finally:
        runner.stop()
        consumer.close()
    assert committed_offsets(bootstrap, group, topic, 2) == ends
    for p in (0, 1):
        assert {o for q, o in handled if q == p} == set(range(per_partition))
