"""The batched fetch path (records in chunks, issue 16) where two things happen at once: a retry,
a stop, a revoke, a drain or a partition coming back in the middle of a 500-record chunk,
against a real broker, with the real ConsumerLoop and HandlerRunner in this process (as
tests/test_fetch_path.py drives them). Written in a hostile review of the change; the last test
is the runner alone (a race window held open by a subclass)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException

from supervisor.child.drain import finish_in_flight
from supervisor.child.loop import ConsumerLoop
from supervisor.child.policies import ErrorPolicy, Executor
from supervisor.child.runner import HandlerRunner
from tests.kafkautil import committed_offsets, create_topic, produce_sequence
from tests.test_fetch_path import _QuietChannel


def _conf(bootstrap: str, group: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "enable.auto.offset.store": "false", "enable.auto.commit": "true",
            "auto.commit.interval.ms": "1000", "fetch.queue.backoff.ms": "50",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def _make(bootstrap: str, group: str, topic: str, executor: Executor, conf: dict[str, Any] | None = None,
          **runner_kw: Any):
    runner = HandlerRunner(executor, **runner_kw)
    consumer = Consumer(conf or _conf(bootstrap, group))
    loop = ConsumerLoop(consumer, runner, _QuietChannel(), [topic], {})  # type: ignore[arg-type]
    runner.start()
    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=loop.on_revoke, on_lost=loop.on_lost)
    return runner, consumer, loop


def _stop_on_error(process: Any, batch: bool = False) -> Executor:
    return Executor(process, [ErrorPolicy.STOP], 0, 0.0, None, set())


def _commit_what_is_stored(consumer: Consumer) -> None:
    """Commit the stored offsets now. _NO_OFFSET means the auto-commit (every second) already
    committed all of them: the broker's committed offsets, asserted after, are the oracle."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            raise


def _second_member_joins_and_leaves(loop: ConsumerLoop, conf: dict[str, Any], topic: str, linger_steps: int = 0) -> int:
    """Another member joins the loop's group, gets a partition and leaves (after
    ``linger_steps`` more rounds of both; its partition comes back to the loop). Returns that
    partition. This thread drives both."""
    got_other: list[int] = []
    other = Consumer({**conf, "enable.auto.commit": "false"})
    other.subscribe([topic], on_assign=lambda c, ps: got_other.extend(p.partition for p in ps))
    deadline = time.monotonic() + 60
    while not got_other:
        assert time.monotonic() < deadline, "no assignment for the second member"
        other.poll(0.01)
        loop.step(time.monotonic())
    for _ in range(linger_steps):
        other.poll(0.01)
        loop.step(time.monotonic())
    other.close()
    return got_other[0]


def _step_until(loop: ConsumerLoop, predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        loop.step(time.monotonic())


@pytest.mark.parametrize("batch", [False, True])
def test_a_retry_in_the_middle_of_a_chunk_resumes_at_the_failed_offset(bootstrap, names, batch):
    """One failure at offset 250 of a 500-message fetch, retried once: every offset before it
    handled once, 250 again, then the rest in order; the broker's commit ends at the end."""
    topic, group = names
    n = 1200
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, n)
    calls: list[int] = []
    failed = threading.Event()

    def one(record):  # per message
        calls.append(record.offset)
        if record.offset == 250 and not failed.is_set():
            failed.set()
            raise RuntimeError("flaky")

    batches: list[list[int]] = []

    def many(records):  # batch
        batches.append([r.offset for r in records])
        if any(r.offset == 250 for r in records) and not failed.is_set():
            failed.set()
            raise RuntimeError("flaky")

    executor = Executor(many if batch else one, [ErrorPolicy.RETRY, ErrorPolicy.STOP], 2, 0.05, None, set())
    kw = {"batch_size": 100, "batch_timeout_s": 0.05} if batch else {}
    runner, consumer, loop = _make(bootstrap, group, topic, executor, **kw)
    try:
        _step_until(loop, lambda: loop.book.owned.get((topic, 0)) is not None
                    and loop.book.owned[(topic, 0)].stored >= n, 60, "all stored")
        assert runner.failure is None
        _commit_what_is_stored(consumer)
    finally:
        runner.stop()
        consumer.close()
    if batch:
        i = next(k for k, b in enumerate(batches) if 250 in b)
        assert batches[i + 1] == batches[i], "the failed batch again, whole"
        flat = [o for k, b in enumerate(batches) if k != i for o in b]
        assert flat == list(range(n)), "each offset once (besides the retried batch), in order"
    else:
        assert calls == list(range(251)) + list(range(250, n)), "250 twice, everything else once, in order"
    assert committed_offsets(bootstrap, group, topic, 1) == {0: n}


def test_a_stop_in_the_middle_of_a_chunk_stores_nothing_past_it(bootstrap, names):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 1000)
    calls: list[int] = []

    def one(record):
        calls.append(record.offset)
        if record.offset == 300:
            raise RuntimeError("bad")

    runner, consumer, loop = _make(bootstrap, group, topic, _stop_on_error(one))
    try:
        _step_until(loop, lambda: loop.stop_reason is not None or runner.failure is not None, 60, "the stop")
        loop.collect()
        time.sleep(0.3)  # pace only: let a wrongly running handler show itself (the assertion is on calls)
        loop.collect()
        _commit_what_is_stored(consumer)
    finally:
        runner.stop()
        consumer.close()
    assert calls == list(range(301))
    assert committed_offsets(bootstrap, group, topic, 1) == {0: 300}


def test_a_revoke_while_a_chunk_is_half_handled(bootstrap, names):
    """A second member joins while the first is in the middle of 500-message runs of both
    partitions: after on_revoke returns, no record of a revoked partition goes into the handler
    (until it is assigned again), and every offset below what the group committed for it was
    handled (the handler's own record is the oracle)."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 20000, partitions=2)
    events: list[tuple[float, str, int, int]] = []  # (perf_counter, kind, partition, offset)
    lock = threading.Lock()

    def one(record):
        with lock:
            events.append((time.perf_counter(), "start", record.partition, record.offset))
        time.sleep(0.0005)

    runner, consumer, loop = _make(bootstrap, group, topic, _stop_on_error(one))
    real_revoke, real_assign = loop.on_revoke, loop.on_assign

    def on_revoke(c, parts):
        real_revoke(c, parts)
        with lock:
            for p in parts:
                events.append((time.perf_counter(), "revoked", p.partition, -1))

    def on_assign(c, parts):
        with lock:
            for p in parts:
                events.append((time.perf_counter(), "assigned", p.partition, -1))
        real_assign(c, parts)

    consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=loop.on_lost)
    other = Consumer({**_conf(bootstrap, group), "enable.auto.commit": "false"})
    got_other: list[int] = []
    stop_other = threading.Event()

    def other_member():
        other.subscribe([topic], on_assign=lambda c, ps: got_other.extend(p.partition for p in ps))
        while not stop_other.is_set():
            other.poll(0.05)  # never stores nor commits: the committed offsets are the first member's

    t = threading.Thread(target=other_member)
    try:
        _step_until(loop, lambda: len(events) > 700, 60, "handling under way")
        t.start()
        _step_until(loop, lambda: bool(got_other), 60, "the second member's assignment")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            loop.step(time.monotonic())
    finally:
        stop_other.set()
        t.join(10)
        other.close()
        runner.stop()
        consumer.close()
    revoked_at: dict[int, float] = {}
    late = []
    for when, kind, p, off in events:
        if kind == "revoked":
            revoked_at[p] = when
        elif kind == "assigned":
            revoked_at.pop(p, None)
        elif p in revoked_at:
            late.append((p, off, round(when - revoked_at[p], 4)))
    assert revoked_at, "the second member took a partition"
    assert not late, f"handled after their partition's revoke returned: {late[:10]} ({len(late)})"
    committed = committed_offsets(bootstrap, group, topic, 2)
    for p in revoked_at:
        handled = {off for _, kind, q, off in events if kind == "start" and q == p}
        missing = [o for o in range(committed[p]) if o not in handled]
        assert not missing, f"partition {p}: committed {committed[p]} but never handled {missing[:10]}"


def _drain_with_a_fetch_queued(runner: HandlerRunner, consumer: Any, loop: ConsumerLoop,
                               started: Any) -> tuple[float, float]:
    """Consume until a full fetch is queued behind the handler (and ``started()``), then drain as
    the worker does: when the drain was requested and when the message in flight was done."""
    try:
        _step_until(loop, lambda: runner.backlog_size() >= 400 and started(), 60, "a queued fetch")
        loop.request_drain("test")
        t_req = time.perf_counter()
        finish_in_flight(loop, time.monotonic())
        t_done = time.perf_counter()
        loop.collect()
        _commit_what_is_stored(consumer)
    finally:
        runner.stop()
        consumer.close()
    return t_req, t_done


def test_a_drain_with_a_full_fetch_queued_finishes_only_the_message_in_flight(bootstrap, names):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 3000)
    starts: list[tuple[float, int]] = []

    def one(record):
        starts.append((time.perf_counter(), record.offset))
        time.sleep(0.005)

    runner, consumer, loop = _make(bootstrap, group, topic, _stop_on_error(one))
    t_req, t_done = _drain_with_a_fetch_queued(runner, consumer, loop, lambda: len(starts) >= 20)
    after = [off for when, off in starts if when > t_req]
    assert len(after) <= 1, f"started after the drain was requested: {after[:10]} ({len(after)})"
    assert t_done - t_req < 0.5
    handled = [off for _, off in starts]
    assert handled == list(range(len(handled)))
    assert committed_offsets(bootstrap, group, topic, 1) == {0: len(handled)}


def test_by_key_a_retry_mid_chunk_holds_the_stored_offset_below_it(bootstrap, names):
    """--order-by key, four handler threads: while offset 250 waits out its backoff the later
    keys finish, but the stored (and committed) offset stays at 250 until it is done. Every
    message is fetched before a handler runs: the backoff pauses the partition's fetching, so a
    message fetched after the failure would wait out the backoff too (under load this test
    once saw 250 retried before the rest was fetched)."""
    topic, group = names
    n = 1000  # = MAX_BACKLOG: two fetches, all in the backlog before the handler threads start
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, n)
    done: set[int] = set()
    failed = threading.Event()

    def one(record):
        if record.offset == 250 and not failed.is_set():
            failed.set()
            raise RuntimeError("flaky")
        done.add(record.offset)

    executor = Executor(one, [ErrorPolicy.RETRY, ErrorPolicy.STOP], 2, 5.0, None, set())
    runner = HandlerRunner(executor, concurrency=4, order_by="key")
    consumer = Consumer(_conf(bootstrap, group))
    loop = ConsumerLoop(consumer, runner, _QuietChannel(), [topic], {"order_by": "key"})  # type: ignore[arg-type]
    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=loop.on_revoke, on_lost=loop.on_lost)
    tp = (topic, 0)
    try:
        _step_until(loop, lambda: runner.backlog_size() >= n, 60, "everything fetched")
        runner.start()
        _step_until(loop, lambda: failed.is_set() and len(done) >= n - 1, 60, "all but 250 handled")
        assert 250 not in done, "250 is still in its 5 s backoff"
        loop.collect()
        assert loop.book.owned[tp].stored <= 250, loop.book.owned[tp].stored
        assert committed_offsets(bootstrap, group, topic, 1)[0] <= 250
        _step_until(loop, lambda: loop.book.owned[tp].stored >= n, 60, "all stored")
        loop.commit_partitions([tp])
    finally:
        runner.stop()
        consumer.close()
    assert done == set(range(n))
    assert committed_offsets(bootstrap, group, topic, 1) == {0: n}


def test_a_partition_back_right_after_its_revoke(bootstrap, names):
    """A second member joins and leaves at once: the first member's partitions go and come
    back while 500-message runs are queued. Nothing is handled between a revoke and the next
    assignment of that partition; in the end every offset was handled and is committed."""
    topic, group = names
    n = 8000
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, n, partitions=2)
    events: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def one(record):
        with lock:
            events.append(("start", record.partition, record.offset))
        time.sleep(0.0003)

    runner, consumer, loop = _make(bootstrap, group, topic, _stop_on_error(one))
    real_revoke, real_assign = loop.on_revoke, loop.on_assign

    def on_revoke(c, parts):
        real_revoke(c, parts)
        with lock:
            events.extend(("revoked", p.partition, -1) for p in parts)

    def on_assign(c, parts):
        with lock:
            events.extend(("assigned", p.partition, -1) for p in parts)
        real_assign(c, parts)

    consumer.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=loop.on_lost)
    try:
        _step_until(loop, lambda: len(events) > 600, 60, "handling under way")
        tp_back = (topic, _second_member_joins_and_leaves(loop, _conf(bootstrap, group), topic))
        _step_until(loop, lambda: tp_back in loop.book.owned, 60, "the partition back")
        _step_until(loop, lambda: all(loop.book.owned.get((topic, p)) is not None
                                      and loop.book.owned[(topic, p)].stored >= n // 2 for p in (0, 1)),
                    90, "everything stored")
        _commit_what_is_stored(consumer)
    finally:
        runner.stop()
        consumer.close()
    gone: set[int] = set()
    late = []
    for kind, p, off in events:
        if kind == "revoked":
            gone.add(p)
        elif kind == "assigned":
            gone.discard(p)
        elif p in gone:
            late.append((p, off))
    assert any(k == "revoked" for k, _, _ in events)
    assert not late, f"handled between revoke and re-assignment: {late[:10]} ({len(late)})"
    for p in (0, 1):
        handled = {off for kind, q, off in events if kind == "start" and q == p}
        never = sorted(set(range(n // 2)) - handled)
        assert not never, f"partition {p}: {never[:10]} never handled"
    assert committed_offsets(bootstrap, group, topic, 2) == {0: n // 2, 1: n // 2}


def test_a_failure_mid_chunk_then_a_revoke(bootstrap, names):
    """Offset 250 of each partition fails and waits out a long retry backoff; meanwhile a second
    member takes a partition. The first member committed exactly up to the failed message for
    it (everything before it handled, nothing after it), and handles nothing of it after the
    revoke returned."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 4000, partitions=2)
    events: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    failed: set[int] = set()

    def one(record):
        with lock:
            events.append(("start", record.partition, record.offset))
        if record.offset == 250 and record.partition not in failed:
            failed.add(record.partition)
            raise RuntimeError("flaky")

    executor = Executor(one, [ErrorPolicy.RETRY, ErrorPolicy.STOP], 3, 30.0, None, set())
    runner, consumer, loop = _make(bootstrap, group, topic, executor, concurrency=2)
    real_revoke = loop.on_revoke

    def on_revoke(c, parts):
        real_revoke(c, parts)
        with lock:
            events.extend(("revoked", p.partition, -1) for p in parts)

    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=on_revoke, on_lost=loop.on_lost)
    try:
        _step_until(loop, lambda: len(failed) == 2, 60, "both partitions failing at 250")
        moved = _second_member_joins_and_leaves(loop, _conf(bootstrap, group), topic, linger_steps=50)
    finally:
        runner.stop()
        consumer.close()
    i = events.index(("revoked", moved, -1))
    after = [e for e in events[i:] if e[0] == "start" and e[1] == moved]
    assert not after, after[:5]
    handled = [off for kind, p, off in events[:i] if kind == "start" and p == moved]
    assert handled == list(range(251)), handled[-5:]
    assert committed_offsets(bootstrap, group, topic, 2)[moved] == 250


def test_batch_mode_a_drain_with_a_full_fetch_queued_finishes_only_the_batch_in_flight(bootstrap, names):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 5000)
    batches: list[tuple[float, list[int]]] = []

    def many(records):
        batches.append((time.perf_counter(), [r.offset for r in records]))
        time.sleep(0.05)

    runner, consumer, loop = _make(bootstrap, group, topic, _stop_on_error(many, batch=True),
                                   batch_size=100, batch_timeout_s=0.05)
    t_req, t_done = _drain_with_a_fetch_queued(runner, consumer, loop, lambda: len(batches) >= 3)
    after = [b[0] for when, b in batches if when > t_req]
    assert len(after) <= 1, f"batches started after the drain was requested: {after}"
    assert t_done - t_req < 0.5
    handled = [o for _, b in batches for o in b]
    assert handled == list(range(len(handled)))
    assert committed_offsets(bootstrap, group, topic, 1) == {0: len(handled)}



def test_a_drop_just_after_a_handler_thread_took_a_run_is_noticed():
    """Runner only (no Kafka claim). A revoke's drop() that lands after a handler thread took a
    run off the lane (under the lock) but before _run_lane read ``_changes`` is never noticed:
    the thread handles the whole run of the dropped partition. The window is a few bytecodes
    wide in production; here it is held open by a subclass at exactly that point."""
    from supervisor.record import Record

    seen: list[int] = []
    entered, go = threading.Event(), threading.Event()

    class Widened(HandlerRunner):
        def _run_lane(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            entered.set()
            go.wait(5)
            return super()._run_lane(*args, **kwargs)

    runner = Widened(Executor(lambda r: seen.append(r.offset), [ErrorPolicy.STOP], 0, 0.0, None, set()))
    runner.submit([Record("t", 0, o, None, None, (), (0, 0)) for o in range(50)], 1)
    runner.start()
    try:
        assert entered.wait(5)
        runner.drop({("t", 0)})  # the revoke: partition 0 is no longer ours
        go.set()
        assert runner.wait_not_running(None, time.monotonic() + 5)
    finally:
        runner.stop()
    assert len(seen) <= 1, f"{len(seen)} records of a dropped partition handled after its drop: {seen[:5]}..."

