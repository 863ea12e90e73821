"""The worker's batched fetch path (child/loop.py ConsumerLoop.fetch) against a real broker, in
this process: a real Consumer and the real ConsumerLoop and HandlerRunner, with ksup's pipe to
the supervisor replaced by a stub that reads nothing (the pipe is ksup's, not Kafka's)."""

from __future__ import annotations

import threading
import time

from confluent_kafka import Consumer

from supervisor.child import loop as loop_mod
from supervisor.child.loop import ConsumerLoop
from supervisor.child.policies import Executor
from supervisor.child.runner import HandlerRunner
from tests.kafkautil import create_topic, produce_sequence


class _QuietChannel:
    """The supervisor's side of the pipe: sends nothing, takes everything."""

    closed = False

    def read_available(self) -> list[object]:
        return []

    def send(self, msg: object) -> None:
        pass


def test_a_stuck_handler_does_not_grow_the_backlog(bootstrap, names):
    """With the handler stuck and the backlog full, the loop still serves the consumer every
    SERVE_INTERVAL_S (max.poll.interval.ms), but takes at most one message each time: what it
    holds stays bounded however long the handler takes (on 2843370 each serve took a whole
    fetch of 500: 1,000 more messages a second)."""
    group, topic = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 6000)
    release = threading.Event()
    executor = Executor(lambda record: release.wait(60), [], 0, 0.0, None, set())
    runner = HandlerRunner(executor)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.offset.store": "false"})
    loop = ConsumerLoop(consumer, runner, _QuietChannel(), [topic], {})  # type: ignore[arg-type]
    runner.start()
    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=loop.on_revoke, on_lost=loop.on_lost)
    try:
        deadline = time.monotonic() + 30
        while runner.backlog_size() < loop_mod.MAX_BACKLOG:  # the observed event: a full backlog
            assert time.monotonic() < deadline, f"backlog stayed at {runner.backlog_size()}"
            loop.step(time.monotonic())
        full = runner.backlog_size()
        serves = 4
        until = time.monotonic() + serves * loop_mod.SERVE_INTERVAL_S + 0.2
        while time.monotonic() < until:
            loop.step(time.monotonic())
        assert runner.backlog_size() <= full + serves + 1, (full, runner.backlog_size())
    finally:
        release.set()
        runner.stop()
        consumer.close()
