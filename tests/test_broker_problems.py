"""The broker as ksup's health sees it, on brokers of this module's own (never the shared
session broker): a Kafka 3.9 broker without KIP-848 refuses --group-protocol consumer with a
clear exit, and a frozen broker, failing commits or a deleted topic make `ksup health` and
/healthz say unhealthy with the reason."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from supervisor.child.loop import ConsumerLoop
from supervisor.child.policies import ErrorPolicy, Executor
from supervisor.child.runner import HandlerRunner
from supervisor.contract import messages
from supervisor.contract.exitcodes import WorkerExit
from supervisor.record import Record
from tests.harness import ksup_cli, read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, free_port_unused, produce_sequence
from tests.localkafka import LocalKafka
from tests.test_observability import endpoint

pytestmark = pytest.mark.kafka

HANDLER = "tests.handlers.recording:process"


@pytest.fixture(scope="module")
def kafka39() -> Iterator[LocalKafka]:
    broker = LocalKafka(version="3.9.2")  # the last 3.x: no KIP-848 (ConsumerGroupHeartbeat)
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


def test_group_protocol_consumer_on_kafka_3_9_is_a_clear_error(ksup, kafka39, names, tmp_path):
    topic, group = names
    create_topic(kafka39.bootstrap, topic, 2)
    produce_sequence(kafka39.bootstrap, topic, 10, partitions=2)
    record = tmp_path / "record.txt"
    run = ksup(HANDLER, kafka39.bootstrap, topic, group, workers=2, env={"KSUP_TEST_RECORD": str(record)},
               extra=["--group-protocol", "consumer"])
    assert run.wait(60) == 9, run.tail()
    last = run.log_text().strip().splitlines()[-1]
    assert last.startswith("ksup: exit 9 (BROKER_UNSUPPORTED):"), last
    assert "KIP-848" in last and "--group-protocol classic" in last and "Kafka 4" in last, last
    assert read_record(record) == [], "nothing was consumed"
    # The same settings with the classic protocol work on that broker.
    ok = ksup(HANDLER, kafka39.bootstrap, topic, group, workers=2, env={"KSUP_TEST_RECORD": str(record)})
    wait_until(lambda: len(read_record(record)) == 10, 60, "classic consumes on 3.9")
    assert ok.stop() == 0, ok.tail()


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[LocalKafka]:
    """A broker this module may freeze and whose topics it may delete."""
    broker = LocalKafka()
    try:
        broker.start()
        yield broker
    finally:
        if broker.proc is not None:
            os.kill(broker.proc.pid, signal.SIGCONT)
        broker.cleanup()


def _verdicts(sock, port) -> tuple[int, str, int, list[str]]:
    out = ksup_cli("health", "--socket", str(sock))
    code, body = endpoint(port, "/healthz")
    return out.returncode, out.stderr, code, body["problems"]


def _start(ksup, kafka, topic, group, tmp_path, sleep: float = 0.0, consumed: int = 100):
    """ksup on a 2-partition topic of 100 messages, once ``consumed`` of them were handled
    (each taking ``sleep`` seconds) and it says healthy."""
    create_topic(kafka.bootstrap, topic, 2)
    produce_sequence(kafka.bootstrap, topic, 100, partitions=2)
    record = tmp_path / "record.txt"
    port, sock = free_port_unused(), tmp_path / "ctl.sock"
    run = ksup(HANDLER, kafka.bootstrap, topic, group, env={"KSUP_TEST_RECORD": str(record),
                                                            "KSUP_TEST_SLEEP": str(sleep)},
               extra=["--metrics-addr", f"127.0.0.1:{port}", "--control-socket", str(sock),
                      "--progress-timeout", "4", "-X", "session.timeout.ms=6000"])
    wait_until(lambda: len(read_record(record)) >= consumed, 60, "consumed")
    wait_until(lambda: _verdicts(sock, port)[0] == 0, 30, "healthy")
    assert _verdicts(sock, port)[2] == 200
    return run, sock, port


def test_health_sees_a_frozen_broker(ksup, own_kafka, names, tmp_path):
    topic, group = names
    run, sock, port = _start(ksup, own_kafka, topic, group, tmp_path)
    assert own_kafka.proc is not None
    os.kill(own_kafka.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _verdicts(sock, port)[0] == 1, 60, "ksup health unhealthy while the broker is frozen")
        code, stderr, http, problems = _verdicts(sock, port)
        assert code == 1 and http == 503, (stderr, problems)
        assert "broker" in stderr and any("broker" in p for p in problems), (stderr, problems)
    finally:
        os.kill(own_kafka.proc.pid, signal.SIGCONT)
    wait_until(lambda: _verdicts(sock, port)[0] == 0, 90, "healthy again after the broker is back")
    assert _verdicts(sock, port)[2] == 200
    assert run.stop(90) == 0, run.tail()


def test_health_sees_a_deleted_topic(ksup, own_kafka, names, tmp_path):
    from confluent_kafka.admin import AdminClient

    topic, group = names
    # A slow handler: the messages fetched before the deletion are still being handled after
    # it, so their offsets are stored and their commits refused.
    run, sock, port = _start(ksup, own_kafka, topic, group, tmp_path, sleep=0.25, consumed=5)
    admin = AdminClient({"bootstrap.servers": own_kafka.bootstrap})
    admin.delete_topics([topic])[topic].result(30)
    wait_until(lambda: _verdicts(sock, port)[0] == 1, 60, "ksup health unhealthy after the topic was deleted")
    code, stderr, http, problems = _verdicts(sock, port)
    assert http == 503 and "topic" in stderr and any(topic in p for p in problems), (stderr, problems)
    # The offsets stored after the deletion can never be committed: after --progress-timeout
    # (4 s) that is a standing problem of its own.
    wait_until(lambda: "commits failing for" in _verdicts(sock, port)[1], 30, "commits failing reported")
    assert any("commits failing for" in p for p in _verdicts(sock, port)[3])
    run.stop(60)


def _stopped_with_the_broker_frozen(ksup, kafka, names, tmp_path, extra, stop) -> tuple[int, str]:
    """20 messages consumed with no periodic auto-commit (only the drain commits), then the broker
    frozen and ``stop(run)`` called; returns ksup's exit code and its last line."""
    topic, group = names
    create_topic(kafka.bootstrap, topic, 1)
    produce_sequence(kafka.bootstrap, topic, 20)
    record = tmp_path / "record.txt"
    run = ksup(HANDLER, kafka.bootstrap, topic, group, env={"KSUP_TEST_RECORD": str(record)},
               extra=[*extra, "-X", "auto.commit.interval.ms=120000", "-X", "session.timeout.ms=6000"])
    wait_until(lambda: len(read_record(record)) == 20, 60, "consumed")
    assert kafka.proc is not None
    os.kill(kafka.proc.pid, signal.SIGSTOP)
    try:
        stop(run)
        code = run.wait(40)
    finally:
        os.kill(kafka.proc.pid, signal.SIGCONT)
    return code, run.log_text().strip().splitlines()[-1]


def test_an_unconfirmed_final_commit_is_exit_5_within_a_short_graceful_timeout(ksup, own_kafka, names, tmp_path):
    """Issue 13 finding 7: the worker's commit and close waits come from the drain budget. With
    --graceful-timeout 8 and the broker frozen at SIGTERM, the final commit cannot be confirmed:
    the truth is COMMIT_FAILED (5), reached before the supervisor's SIGKILL (which would say
    FORCED, 4: hard-coded 10 s + 5 s waits outlived the 8 s budget)."""
    code, last = _stopped_with_the_broker_frozen(ksup, own_kafka, names, tmp_path, ["--graceful-timeout", "8"],
                                                 lambda run: run.signal(signal.SIGTERM))
    assert code == 5 and last.startswith("ksup: exit 5 (COMMIT_FAILED)"), last


def test_a_quick_stop_during_an_unconfirmed_final_commit_is_still_exit_5(ksup, own_kafka, names, tmp_path):
    """The broker frozen at SIGINT; a second signal (SIGQUIT: quick stop) shortens the drain while
    the worker waits for its final commit. The worker must give up the commit within the shorter
    budget and say so: COMMIT_FAILED (5), not the supervisor's SIGKILL (FORCED, 4, which named a
    message in flight long finished). Hostile testing found the commit wait ignored the quick stop."""
    def quick_stop(run) -> None:
        run.signal(signal.SIGINT)
        # The worker logs this, then (nothing in flight) goes straight to its final commit.
        run.wait_for_log("drain requested", 10)
        run.signal(signal.SIGQUIT)

    code, last = _stopped_with_the_broker_frozen(ksup, own_kafka, names, tmp_path, ["--quick-timeout", "1"],
                                                 quick_stop)
    assert code == 5 and last.startswith("ksup: exit 5 (COMMIT_FAILED)"), last


def test_kafka_problems_rules():
    """Pure logic: which errors become which problem lines, and when they clear."""
    from confluent_kafka import KafkaError, TopicPartition

    from supervisor.child.kafka_problems import KafkaProblems, classify
    from supervisor.contract.exitcodes import WorkerExit

    p = KafkaProblems(after_s=0.0)
    p.on_commit(KafkaError(KafkaError.REQUEST_TIMED_OUT))
    assert any(line.startswith("commits failing") for line in p.lines())
    p.on_commit(None)
    assert not any(line.startswith("commits failing") for line in p.lines())
    p.on_commit(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART), [TopicPartition("orders", 0)])
    assert any(line.startswith("topic gone: orders") for line in p.lines())
    p.on_assign()
    p.on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert any("all broker connections are down" in line for line in p.lines())
    p.after_s = 10.0
    p.on_stats({"brokers": {"b/1": {"state": "UP", "rxidle": 0}}})
    p.on_commit(None)
    assert p.lines() == []
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer with "
                                           "same group.instance.id: Fatal consumer error")
    verdict = classify(fenced, "h-g-0", "g")
    assert verdict is not None and verdict.code == WorkerExit.FENCED and "'h-g-0'" in verdict.reason
    assert classify(KafkaError(KafkaError._FATAL), "", "g").code == WorkerExit.KAFKA_FATAL  # type: ignore[union-attr]
    assert classify(KafkaError(KafkaError._TRANSPORT), "", "g") is None


class _LeaveAtOnce:
    """The supervisor's side of the pipe for a loop driven in this process: it sends nothing but
    lets the draining worker leave as soon as it says it is ready (ReadyToLeave)."""

    closed = False

    def __init__(self) -> None:
        self.loop: Any = None

    def read_available(self) -> list[object]:
        return []

    def send(self, msg: object) -> None:
        if isinstance(msg, messages.ReadyToLeave):
            self.loop.leave_now = True


def test_a_partition_revoked_during_the_drain_whose_commit_failed_is_not_exit_0(own_kafka, names):
    """Two things at once: a worker drains (its handler still on a message) when a second member
    joins and a partition is revoked, and the broker freezes for longer than the session just as
    the revoke commits it. The revoke's commit fails (unknown member after the thaw), the
    partition leaves, and the final commit finds nothing left to commit. The drain's exit code
    must then not say OK (0: everything committed) when the broker has not got the finished work:
    the oracle is the broker's committed offsets against what the handler finished. On 6e73764
    the worker said 0 with nothing committed. The real ConsumerLoop and drain in this process."""
    from supervisor.child.drain import drain

    topic, group = names
    kafka = own_kafka
    assert kafka.proc is not None
    create_topic(kafka.bootstrap, topic, 2)
    produce_sequence(kafka.bootstrap, topic, 20, partitions=2)
    handled: list[tuple[int, int]] = []
    in_handler, release = threading.Event(), threading.Event()
    last: dict[int, int] = {}

    def one(record: Record) -> None:
        if len(handled) == 19:  # the last message stays in the handler until the revoke
            in_handler.set()
            release.wait(60)
        handled.append((record.partition, record.offset))

    conf = {"bootstrap.servers": kafka.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "enable.auto.offset.store": "false", "enable.auto.commit": "true",
            "auto.commit.interval.ms": "120000",  # only the worker's own commits
            # Eager (librdkafka's default): the join revokes both partitions in one callback,
            # so none is left for a later loss (which the drain already counts).
            "partition.assignment.strategy": "range",
            "session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}
    runner = HandlerRunner(Executor(one, [ErrorPolicy.STOP], 0, 0.0, None, set()))
    box: list[ConsumerLoop] = []
    # As the worker wires it (child/main.py): librdkafka's commit results, its own commit at an
    # unassign included, go to the loop.
    consumer = Consumer({**conf, "on_commit": lambda err, parts: box[0].on_commit(err, parts) if box else None})
    channel = _LeaveAtOnce()
    loop = ConsumerLoop(consumer, runner, channel, [topic], {"graceful_timeout_s": 60.0})  # type: ignore[arg-type]
    channel.loop = loop
    box.append(loop)
    froze: list[float] = []
    thaw = threading.Timer(10.0, lambda: os.kill(kafka.proc.pid, signal.SIGCONT))  # type: ignore[union-attr]

    def on_revoke(c: Consumer, parts: list[TopicPartition]) -> None:
        if parts and loop.stop_reason is not None and not froze:
            os.kill(kafka.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            froze.append(time.monotonic())
            thaw.start()  # 10 s: past the 6 s session
            release.set()
        loop.on_revoke(c, parts)

    runner.start()
    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=on_revoke, on_lost=loop.on_lost)
    other = Consumer({**conf, "group.id": group})
    stop_other = threading.Event()

    def run_other() -> None:
        while not stop_other.is_set():
            other.poll(0.1)

    joiner = threading.Thread(target=run_other, daemon=True)
    try:
        deadline = time.monotonic() + 60
        while not (in_handler.is_set() and len(handled) == 19):
            assert time.monotonic() < deadline, "timed out waiting for 19 handled, the 20th in the handler"
            loop.step(time.monotonic())
        for _ in range(10):  # store what is finished (the collect at each step)
            loop.step(time.monotonic())
        loop.request_drain("test")
        other.subscribe([topic])
        joiner.start()
        code = drain(loop)
        assert froze, "no partition was revoked during the drain"
    finally:
        release.set()
        thaw.cancel()
        os.kill(kafka.proc.pid, signal.SIGCONT)
        stop_other.set()
        joiner.join(10)
        runner.stop()
        other.close()
    committed = committed_offsets(kafka.bootstrap, group, topic, 2)
    for p, off in handled:
        last[p] = max(last.get(p, -1), off)
    unconfirmed = {p: (committed.get(p), end + 1) for p, end in last.items() if committed.get(p, -1) < end + 1}
    assert len(handled) == 20
    if unconfirmed:  # finished work the broker has not got: it will be redelivered
        assert code == WorkerExit.COMMIT_FAILED, (int(code), unconfirmed)
    else:
        assert code == WorkerExit.OK, int(code)


def test_a_later_commit_result_confirms_what_a_revoke_left_unconfirmed():
    """Pure logic: librdkafka's own commit at an unassign may still confirm the offset a revoke's
    commit failed to; only a confirmed offset at or past the one stored clears the partition."""
    runner = HandlerRunner(Executor(lambda record: None, [ErrorPolicy.STOP], 0, 0.0, None, set()))
    loop = ConsumerLoop(None, runner, _LeaveAtOnce(), ["t"], {})  # type: ignore[arg-type]
    loop.released_unconfirmed.update({("t", 0): 10, ("t", 1): 10})
    loop.note_commit_result([TopicPartition("t", 0, 9), TopicPartition("t", 1, 10)])
    assert loop.released_unconfirmed == {("t", 0): 10}
    loop.note_commit_result([TopicPartition("t", 0)])  # no offset (-1001): confirms nothing
    assert loop.released_unconfirmed == {("t", 0): 10}
    loop.note_commit_result([TopicPartition("t", 0, 11)])
    assert loop.released_unconfirmed == {}


def test_a_drain_waits_for_the_unassign_commit_of_a_revoked_partition_but_not_for_a_lost_one():
    """Pure logic: a partition revoked with its offset unconfirmed is awaited (librdkafka commits
    a revoked partition's stored offset at the unassign) until that commit's result: a success
    clears it, a failure ends the wait and leaves it unconfirmed (exit 5). A lost partition is
    never committed by librdkafka, so nothing is awaited for it."""
    from confluent_kafka import KafkaError

    from supervisor.child.offsets import PartitionBook

    runner = HandlerRunner(Executor(lambda record: None, [ErrorPolicy.STOP], 0, 0.0, None, set()))
    loop = ConsumerLoop(None, runner, _LeaveAtOnce(), ["t"], {})  # type: ignore[arg-type]
    for p in (0, 1, 2):
        loop.book.owned[("t", p)] = PartitionBook(epoch=1, stored=10, committed=5)
    loop.note_released_unconfirmed([("t", 0), ("t", 1)], revoked=True)
    loop.note_released_unconfirmed([("t", 2)])  # lost
    assert loop.awaiting_commit == {("t", 0), ("t", 1)}
    loop.on_commit(None, [TopicPartition("t", 0, 10)])
    loop.on_commit(KafkaError(KafkaError.UNKNOWN_MEMBER_ID), [TopicPartition("t", 1, 10)])
    assert loop.awaiting_commit == set()
    assert loop.released_unconfirmed == {("t", 1): 10, ("t", 2): 10}
