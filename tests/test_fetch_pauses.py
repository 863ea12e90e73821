"""Pauses of fetching: fairness under a backlog (child/fair_fetch.py) and retry backoffs,
against a real broker with the real ConsumerLoop and HandlerRunner in this process (as
tests/test_fetch_concurrency.py drives them); then the rule alone, as a unit and as a
Hypothesis state machine.

Oracles: the handler's own list of (partition, offset) in handling order, and the broker's
committed offsets. Fairness is judged by order (how much of one partition was handled before
every partition had its turn), never by time."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from supervisor.child.fair_fetch import MIN_SHARE, OVERFLOW, STARVE_S, FairFetch, messages_wait, wanted_paused
from supervisor.child.loop import MAX_BACKLOG, ConsumerLoop
from supervisor.child.policies import ErrorPolicy, Executor
from supervisor.child.runner import HandlerRunner
from supervisor.record import Record
from tests.kafkautil import committed_offsets, create_topic, produce_sequence
from tests.test_fetch_concurrency import (
    _commit_what_is_stored,
    _conf,
    _make,
    _second_member_joins_and_leaves,
    _step_until,
)
from tests.test_fetch_path import _QuietChannel


def _make_with_stats(bootstrap: str, group: str, topic: str, executor: Executor,
                     consumer_class: type[Consumer] = Consumer) -> tuple[HandlerRunner, Consumer, ConsumerLoop]:
    """As the worker builds its loop (child/main.py): librdkafka's statistics every 500 ms go to
    the loop (under read_committed the starve gate reads each partition's last stable offset there)."""
    runner = HandlerRunner(executor)
    box: list[ConsumerLoop] = []
    conf = {**_conf(bootstrap, group), "statistics.interval.ms": "500",
            "stats_cb": lambda stats: box[0].on_stats(stats) if box else None}
    consumer = consumer_class(conf)
    loop = ConsumerLoop(consumer, runner, _QuietChannel(), [topic], {})  # type: ignore[arg-type]
    box.append(loop)
    runner.start()
    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=loop.on_revoke, on_lost=loop.on_lost)
    return runner, consumer, loop


def _run_until_stored_and_commit(runner: HandlerRunner, consumer: Consumer, loop: ConsumerLoop, topic: str,
                                 ends: dict[int, int]) -> None:
    try:
        _step_until(loop, lambda: _all_stored(loop, topic, ends), 120, "everything stored")
        assert runner.failure is None
        _commit_what_is_stored(consumer)
    finally:
        runner.stop()
        consumer.close()


def _turns(handled: list[tuple[int, int]], partitions: int) -> tuple[dict[int, int], int]:
    """Messages handled per partition, and the most of one partition handled before every
    partition had its turn."""
    counts = dict.fromkeys(range(partitions), 0)
    most = 0
    for p, _ in handled:
        counts[p] += 1
        if not all(counts.values()):
            most = max(most, max(counts.values()))
    return counts, most


def _all_stored(loop: Any, topic: str, ends: dict[int, int]) -> bool:
    owned = loop.book.owned
    return all((topic, p) in owned and owned[(topic, p)].stored >= end for p, end in ends.items())


@pytest.mark.parametrize("batch", [False, True])
def test_a_partition_whose_fetch_fills_the_backlog_does_not_keep_the_others_waiting(bootstrap, names, batch):
    """4 partitions x 3,000 small messages, all waiting before the worker starts, and a handler
    slower than the fetch: librdkafka hands over one partition's whole fetch first, more than the
    backlog holds. The handler takes 2 ms a message until every partition had its turn (so the
    backlog holds over fair_fetch.MIN_WORK_S of work), then none, to finish quickly. Every
    partition must have had messages handled before any partition had a backlog's worth
    (MAX_BACKLOG) handled; on the old code the first partition had over 1,500.
    Pausing and resuming must neither skip nor repeat a message: each offset handled once, in
    order per partition, and the broker's commits end at the end."""
    topic, group = names
    per_partition, partitions = 3000, 4
    create_topic(bootstrap, topic, partitions)
    produce_sequence(bootstrap, topic, per_partition * partitions, partitions=partitions)
    handled: list[tuple[int, int]] = []
    seen: set[int] = set()
    lock = threading.Lock()

    def one(record):
        with lock:
            handled.append((record.partition, record.offset))
            seen.add(record.partition)
        if len(seen) < partitions:
            time.sleep(0.002)

    def many(records):
        with lock:
            handled.extend((r.partition, r.offset) for r in records)
            seen.update(r.partition for r in records)
        if len(seen) < partitions:
            time.sleep(0.004 * len(records))  # slower: the rate is seen a batch at a time

    executor = Executor(many if batch else one, [ErrorPolicy.STOP], 0, 0.0, None, set())
    kw = {"batch_size": 50, "batch_timeout_s": 0.01} if batch else {}
    runner, consumer, loop = _make(bootstrap, group, topic, executor, **kw)
    ends = dict.fromkeys(range(partitions), per_partition)
    _run_until_stored_and_commit(runner, consumer, loop, topic, ends)
    counts, most_before_all_started = _turns(handled, partitions)
    assert all(counts.values())
    assert most_before_all_started < MAX_BACKLOG, (
        f"{most_before_all_started} messages of one partition were handled before every partition had its turn")
    for p in range(partitions):
        offsets = [o for q, o in handled if q == p]
        assert offsets == list(range(per_partition)), f"partition {p}: not each offset once, in order"
    assert committed_offsets(bootstrap, group, topic, partitions) == ends


def test_with_a_fast_handler_a_partition_waits_about_starve_s_not_a_whole_fetch(bootstrap, names):
    """The work gate alone never paused for a handler under about 1 ms: a backlog of 1,000
    messages at 200 us is 0.2 s of work, under MIN_WORK_S, so partitions waited in librdkafka's
    fetch order (a hostile review: 6 s with a 0.4 ms handler). The starve gate: once a partition
    has starved STARVE_S, the others are held. Judged by order: before every partition had its
    turn, one partition had at most about STARVE_S and a statistics interval of handling (the
    spell counts from the first last stable offset, read_committed: 1.5 s / 200 us = 7,500
    messages; 11,000 leaves room for a slow check; seen 5,500-6,850), where the old rule let the
    first partitions' whole fetches (all 15,000 of each) go first. Each offset handled once, in order."""
    topic, group = names
    per_partition, partitions, spin = 15000, 4, 200e-6
    create_topic(bootstrap, topic, partitions)
    produce_sequence(bootstrap, topic, per_partition * partitions, partitions=partitions)
    handled: list[tuple[int, int]] = []
    seen: set[int] = set()

    def one(record):
        handled.append((record.partition, record.offset))
        seen.add(record.partition)
        if len(seen) < partitions:  # paces the handler until every partition had its turn
            until = time.perf_counter() + spin
            while time.perf_counter() < until:
                pass

    executor = Executor(one, [ErrorPolicy.STOP], 0, 0.0, None, set())
    runner, consumer, loop = _make_with_stats(bootstrap, group, topic, executor)
    ends = dict.fromkeys(range(partitions), per_partition)
    _run_until_stored_and_commit(runner, consumer, loop, topic, ends)
    counts, most_before_all_started = _turns(handled, partitions)
    assert most_before_all_started < 11000, (
        f"{most_before_all_started} messages of one partition were handled before every partition had its turn")
    for p in range(partitions):
        assert [o for q, o in handled if q == p] == list(range(per_partition)), f"partition {p}"
    assert committed_offsets(bootstrap, group, topic, partitions) == ends


def test_a_fast_handler_and_an_empty_partition_cause_no_pause(bootstrap, names):
    """Hostile review of the first fairness rule: an empty partition (no position, no commit)
    counted as waiting, so every full backlog paused the busy partition, dropped what librdkafka
    had fetched for it, and the handler then sat idle while it was fetched again (3.8x slower,
    25x the messages fetched). A 50 us handler clears the backlog well within MIN_WORK_S, and an
    empty partition never waits: fetching is never paused, and every message is handled once."""
    topic, group = names
    n = 30000
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, n, partitions=1)  # partition 1 stays empty
    pauses: list[list[TopicPartition]] = []

    class Counting(Consumer):
        def pause(self, partitions):  # type: ignore[no-untyped-def]
            pauses.append(partitions)
            return super().pause(partitions)

    handled: list[int] = []

    def one(record):
        handled.append(record.offset)
        until = time.perf_counter() + 50e-6
        while time.perf_counter() < until:
            pass

    runner = HandlerRunner(Executor(one, [ErrorPolicy.STOP], 0, 0.0, None, set()))
    consumer = Counting(_conf(bootstrap, group))
    loop = ConsumerLoop(consumer, runner, _QuietChannel(), [topic], {})  # type: ignore[arg-type]
    runner.start()
    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=loop.on_revoke, on_lost=loop.on_lost)
    try:
        _step_until(loop, lambda: _all_stored(loop, topic, {0: n}), 120, "everything stored")
    finally:
        runner.stop()
        consumer.close()
    assert not pauses, f"fetching paused {len(pauses)} times"
    assert handled == list(range(n))


def test_an_open_transaction_on_an_idle_partition_is_not_a_partition_starving(bootstrap, names):
    """Under read_committed (librdkafka's default) a consumer gets no message past the last stable
    offset: with a transaction left open on partition 1, its high watermark is above the position
    for as long as the transaction stays open (up to transaction.timeout.ms, 60 s), yet nothing
    waits there to be taken. The starve gate took it for a partition starving and paused the
    busy partition 0 again and again, each time dropping and fetching again what librdkafka had
    prefetched for it. Now the end of a partition is its last stable offset (librdkafka's
    statistics): fetching is never paused, and every message of partition 0 is handled once."""
    from confluent_kafka import Producer

    topic, group = names
    n = 25000
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, n, partitions=1)
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"open-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for _ in range(5):
        producer.produce(topic, b"in an open transaction", partition=1)
    producer.flush(30)
    pauses: list[list[TopicPartition]] = []

    class Counting(Consumer):
        def pause(self, partitions):  # type: ignore[no-untyped-def]
            pauses.append(partitions)
            return super().pause(partitions)

    handled: list[tuple[int, int]] = []

    def one(record):
        handled.append((record.partition, record.offset))
        until = time.perf_counter() + 100e-6  # paces the handler: a backlog builds up
        while time.perf_counter() < until:
            pass

    executor = Executor(one, [ErrorPolicy.STOP], 0, 0.0, None, set())
    runner, consumer, loop = _make_with_stats(bootstrap, group, topic, executor, Counting)
    try:
        _step_until(loop, lambda: _all_stored(loop, topic, {0: n}), 120, "partition 0 stored")
    finally:
        runner.stop()
        consumer.close()
        producer.abort_transaction(30)
    assert not pauses, f"fetching paused {len(pauses)} times for a partition with an open transaction"
    assert handled == [(0, o) for o in range(n)]


def _protocol_conf(bootstrap: str, group: str, protocol: str) -> dict[str, Any]:
    """The in-process tests' consumer settings for a group protocol: KIP-848 takes none of the
    classic protocol's own."""
    conf = _conf(bootstrap, group)
    if protocol == "consumer":
        for key in ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms"):
            conf.pop(key)
        conf["group.protocol"] = "consumer"
    return conf


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_partition_revoked_during_its_retry_backoff_is_fetched_again_when_it_comes_back(bootstrap, names,
                                                                                          protocol):
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
    runner, consumer, loop = _make(bootstrap, group, topic, executor, _protocol_conf(bootstrap, group, protocol))
    ends = {0: per_partition, 1: per_partition}
    paused_at_revoke: list[set[tuple[str, int]]] = []
    real_revoke = loop.on_revoke

    def on_revoke(c, parts):
        paused_at_revoke.append({(p.topic, p.partition) for p in parts} & loop.paused)
        real_revoke(c, parts)

    consumer.subscribe([topic], on_assign=loop.on_assign, on_revoke=on_revoke, on_lost=loop.on_lost)
    try:
        _step_until(loop, lambda: loop.paused == {(topic, 0), (topic, 1)}, 60, "both partitions backing off")
        back = (topic, _second_member_joins_and_leaves(loop, _protocol_conf(bootstrap, group, protocol), topic))
        assert any(back in paused for paused in paused_at_revoke), "revoked while its backoff had it paused"
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


def test_a_pause_drops_what_librdkafka_fetched_and_a_resume_goes_on_from_the_next_offset(bootstrap, names):
    """What fair_fetch.py builds on, in librdkafka itself: after pause() the paused partition's
    fetched messages are not handed over (the next messages are another partition's), and
    after resume() it goes on exactly after the last message taken."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 4000, partitions=2)
    c = Consumer({**_conf(bootstrap, group), "enable.auto.commit": "false"})
    c.subscribe([topic])
    try:
        taken: list[tuple[int, int]] = []
        deadline = time.monotonic() + 60
        while len(taken) < 500:
            assert time.monotonic() < deadline
            taken += [(m.partition(), m.offset()) for m in c.consume(500 - len(taken), 0.5) if m.error() is None]
        first = taken[0][0]
        assert {p for p, _ in taken} == {first}, "one partition's fetch first"
        last = max(o for p, o in taken if p == first)
        c.pause([TopicPartition(topic, first)])
        after: list[tuple[int, int]] = []
        while len(after) < 100:
            assert time.monotonic() < deadline
            after += [(m.partition(), m.offset()) for m in c.consume(100, 0.5) if m.error() is None]
        assert {p for p, _ in after} == {1 - first}, "nothing more of the paused partition"
        c.resume([TopicPartition(topic, first)])
        again: list[int] = []
        while not again:
            assert time.monotonic() < deadline
            again = [m.offset() for m in c.consume(500, 0.5) if m.error() is None and m.partition() == first]
        assert again[0] == last + 1
    finally:
        c.close()


# ---- the rule alone -------------------------------------------------------------------------

A, B, C, D = (("t", p) for p in range(4))


def test_messages_wait_when_the_watermark_is_past_where_the_partition_starts():
    assert messages_wait(10, -1, 0, 20) and not messages_wait(20, -1, 0, 20)
    assert messages_wait(-1001, 5, 0, 20) and not messages_wait(-1001, 20, 0, 20)
    assert messages_wait(-1001, -1, 0, 20), "no position, no commit: from the low watermark"
    assert not messages_wait(-1001, -1, 0, 20, from_latest=True), "... or the high one"
    assert not messages_wait(-1001, -1, 0, 0) and not messages_wait(-1001, -1, 7, 7), "an empty partition never waits"
    assert not messages_wait(-1001, -1, -1001, -1001), "nothing fetched for it: nothing queued behind another"


def test_a_full_backlog_with_a_starving_partition_holds_those_with_a_share():
    fair = FairFetch(1000)
    owned = [A, B, C, D]
    assert fair.update(owned, {A: 1000}, [B, C, D], 1000) == {A}
    assert fair.overflow_limit(4, 1000) == 250
    assert fair.update(owned, {A: 990, B: 250}, [C, D], 1240) == {A, B}
    assert fair.update(owned, {A: 990, B: 250, C: 250}, [D], 1490) == {A, B, C}
    assert fair.update(owned, {A: 130, B: 240, C: 250, D: 250}, [], 870) == {A, B, C}, "D: nobody starves"
    assert fair.overflow_limit(4, 870) == 0, "nobody starves"
    assert fair.update(owned, {A: 124, B: 240, C: 250, D: 250}, [], 864) == {B, C}, "A: below half a share"


def test_nothing_is_held_while_the_backlog_has_room_or_nobody_starves():
    fair = FairFetch(1000)
    assert fair.update([A, B], {A: 900}, [B], 900) == set()
    assert fair.update([A, B], {A: 1000}, [], 1000) == set()
    assert fair.update([A, B], {A: 1000}, [B], 1000) == {A}
    fair.forget([A, B])
    assert fair.held == set() and fair.starving == set()


def test_the_backlog_stays_bounded_while_partitions_starve():
    fair = FairFetch(1000)
    fair.update([A, B], {A: 1000}, [B], 1000)
    assert fair.overflow_limit(2, 1000) == 500
    assert fair.overflow_limit(2, 1800) == 200
    assert fair.overflow_limit(2, OVERFLOW * 1000) == 0
    assert FairFetch(1000).share(1000) == MIN_SHARE


def test_a_partition_that_starved_for_starve_s_gets_its_turn_whatever_the_handlers_speed():
    """The second gate (a fast handler: its backlog never holds MIN_WORK_S of work; or the
    backlog not quite full at the check): a partition that starved STARVE_S without a break makes
    the others with a share held. A break in the spell starts it again."""
    fair = FairFetch(1000)
    owned = [A, B, C]
    assert not fair.watching(499) and fair.watching(500), "watched from half a backlog"
    assert not fair.starved_long([C], 10.0)
    assert not fair.starved_long([B, C], 10.0 + STARVE_S / 2)
    assert not fair.starved_long([B], 10.0 + STARVE_S * 0.9), "C's spell ended; B's began at the 2nd check"
    assert not fair.starved_long([B, C], 10.0 + STARVE_S)
    assert fair.starved_long([B, C], 10.0 + STARVE_S * 1.5), "B: STARVE_S without a break"
    assert not fair.starved_long([B, C], 10.0 + STARVE_S * 1.6, unsure=[B, C]), "not known to be waiting"
    assert fair.starved_long([B, C], 10.0 + STARVE_S * 1.7, unsure=[C]), "B's spell counted while it was unsure"
    assert fair.update(owned, {A: 900}, [B, C], 900) == set(), "without the gate a backlog with room holds nothing"
    assert fair.update(owned, {A: 900}, [B, C], 900, starved_long=True) == {A}
    fair.clear(keep_since=True)
    assert fair.held == set() and set(fair.since) == {B, C}, "the spells go on while watched"
    fair.forget([B])
    assert set(fair.since) == {C}
    fair.clear()
    assert fair.since == {}


def test_what_the_starve_gate_held_stays_held_until_it_holds_under_half_a_share():
    """Hostile review: once the starving partition had a message queued, the gate closed and
    everything held was resumed at the next check, dropping and fetching again the others'
    prefetch for a single fetch of the starving one. Held partitions now follow the release rule
    whether a gate is open or not; only new holds need one."""
    fair = FairFetch(1000)
    owned = [A, B, C]  # share 333
    assert fair.update(owned, {A: 600, B: 400}, [C], 1000, acts=True, starved_long=True) == {A, B}
    assert fair.update(owned, {A: 590, B: 150, C: 20}, [], 760, acts=False) == {A}, "B under half a share"
    assert fair.update(owned, {A: 590, C: 20}, [B], 1000, acts=False) == {A}, "no gate: nothing newly held"


class _LocalConsumer:
    """The few local librdkafka answers ``update_pauses`` reads (position, cached watermarks), and
    the pauses it makes. A claim about ksup's rule, not about Kafka: the broker tests above show
    what librdkafka does with a pause."""

    def __init__(self, waiting: set[tuple[str, int]]) -> None:
        self.waiting = waiting
        self.paused: list[tuple[str, int]] = []

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 0) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return (0, 100 if (tp.topic, tp.partition) in self.waiting else 0)

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused += [(tp.topic, tp.partition) for tp in tps]

    def resume(self, tps: list[TopicPartition]) -> None:
        pass


def test_with_several_threads_the_runs_they_took_count_toward_the_backlog_watched():
    """Hostile review, finding 2: with several handler threads the backlog the rule watched was
    the fetch limit's count, which leaves out the runs threads took. Four threads each holding a
    run of 400 left 0 queued, under half the limit at every check, so the starving partition's
    spell started again at each check and it waited for as long as the runs lasted. The runs now
    count: the spell runs on and the partitions holding a share are paused after STARVE_S."""
    gate = threading.Event()
    runner = HandlerRunner(Executor(lambda record: gate.wait(30), [], 0, 0.0, None, set()), concurrency=4)
    busy = [("t", p) for p in range(4)]
    starving = ("t", 4)
    consumer = _LocalConsumer({starving})
    loop = ConsumerLoop(consumer, runner, _QuietChannel(), ["t"], {})  # type: ignore[arg-type]
    loop.kafka_conf = {"isolation.level": "read_uncommitted"}  # no statistics needed for the end
    loop.book.acquire([*busy, starving])
    runner.start()
    try:
        runner.submit_runs([(tp, loop.book.owned[tp].epoch,
                             [Record(*tp, o, None, None, (), (0, 0)) for o in range(400)]) for tp in busy])
        deadline = time.monotonic() + 10
        while len(runner.running) < 4:  # the observed event: every thread took a run
            assert time.monotonic() < deadline, "the threads did not take the runs"
            runner.wait_progress(0.01)
        assert runner.backlog_size() < MAX_BACKLOG // 2, "the fetch limit's count: nothing queued"
        deadline = time.monotonic() + STARVE_S + 5
        while not consumer.paused:  # the observed event: the held partitions paused
            assert time.monotonic() < deadline, f"no pause within {STARVE_S + 5:.0f} s; spells {loop.fair.since}"
            loop._last_pause_check = 0.0
            loop.update_pauses()
            time.sleep(0.05)  # pacing only: the checks, as the loop makes them (CHECK_S)
        assert set(consumer.paused) == set(busy) and starving not in consumer.paused
        assert starving in loop.fair.since, "the starving partition's spell went on"
    finally:
        gate.set()
        runner.stop()


def test_a_partition_is_paused_while_either_fairness_or_a_backoff_wants_it():
    assert wanted_paused({A}, {B}, [A, B, C]) == {A, B}
    assert wanted_paused({A}, {A}, [A, B]) == {A}
    assert wanted_paused({A, D}, {B}, [A, C]) == {A}, "only owned partitions"


class FairFetchMachine(RuleBasedStateMachine):
    """Any order of checks, backlogs and revokes: a held partition is always owned and holds at
    least half a share (it was let go otherwise); a starving one is never held; the loop's
    overflow never takes the backlog past OVERFLOW x MAX_BACKLOG."""

    def __init__(self) -> None:
        super().__init__()
        self.fair = FairFetch(1000)
        self.owned: set[tuple[str, int]] = {A, B, C, D}
        self.queued: dict[tuple[str, int], int] = {}
        self.share = self.fair.share(4)  # as of the last check
        self.now = 0.0

    @rule(counts=st.dictionaries(st.sampled_from([A, B, C, D]), st.integers(0, 2000), max_size=4),
          starving=st.sets(st.sampled_from([A, B, C, D])), dt=st.sampled_from([0.05, 0.3, STARVE_S]),
          work_gate=st.booleans())
    def check(self, counts: dict[tuple[str, int], int], starving: set[tuple[str, int]], dt: float,
              work_gate: bool) -> None:
        self.queued = {tp: n for tp, n in counts.items() if n and tp in self.owned}
        backlog = sum(self.queued.values())
        self.share = self.fair.share(len(self.owned))
        before = set(self.fair.held)
        self.now += dt
        long = self.fair.starved_long(starving, self.now)
        assert long == any(self.now - t >= STARVE_S for t in self.fair.since.values())
        acts = long or work_gate
        self.fair.update(self.owned, self.queued, starving, backlog, acts, long)
        new = self.fair.held - before
        # A partition is newly held only while a gate acts, for one that starves behind a full
        # backlog (or for STARVE_S), and only with a share of it; one held before stays while
        # it holds half a share, and only then.
        assert not new or (acts and self.fair.starving and (backlog >= 1000 or long)), (new, self.fair.starving)
        assert self.fair.held & before == {tp for tp in before if tp in self.owned
                                           and self.queued.get(tp, 0) >= self.share // 2}
        assert all(self.queued.get(tp, 0) >= self.share for tp in new)
        assert all(self.queued.get(tp, 0) >= self.share // 2 for tp in self.fair.held & before)
        assert backlog + self.fair.overflow_limit(len(self.owned), backlog) <= max(backlog, OVERFLOW * 1000)

    @rule(tp=st.sampled_from([A, B, C, D]))
    def revoke(self, tp: tuple[str, int]) -> None:
        self.owned.discard(tp)
        self.fair.forget([tp])

    @rule(tp=st.sampled_from([A, B, C, D]))
    def assign(self, tp: tuple[str, int]) -> None:
        self.owned.add(tp)

    @invariant()
    def held_partitions_are_owned_and_hold_half_a_share(self) -> None:
        for tp in self.fair.held:
            assert tp in self.owned
            assert self.queued.get(tp, 0) >= self.share // 2

    @invariant()
    def a_starving_partition_is_never_held(self) -> None:
        assert not (self.fair.held & self.fair.starving)


TestFairFetchMachine = FairFetchMachine.TestCase
TestFairFetchMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
