"""Pure logic without a broker: wire format, the offset book, config validation, policies."""

from __future__ import annotations

import time

import pytest

from supervisor import config
from supervisor.child.offsets import OffsetBook
from supervisor.child.runner import HandlerRunner
from supervisor.contract import codec
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, WorkerExit, describe_returncode
from supervisor.errors import ConfigError
from supervisor.parent import policy
from supervisor.record import Record


@pytest.mark.parametrize("msg", [
    m.Configure(1, "h:p", ["t"], {"a": "b"}, {"x": 1.5}),
    m.Go(), m.Drain(3.0, "why"), m.Leave(), m.Loaded(5, "h:p", "2.16.1"), m.BootFailed(5, 3, "bad"),
    m.Report(5, "assigned", ["t[0]"], m.InFlight("t", 0, 7, 1.0), 3, 0, {"t[0]": 4}, {"t[0]": 4}, 100),
    m.ReadyToLeave(5),
    m.Exiting(5, 0, "done", [m.PartitionReceipt("t[0]", 6, 7)], m.InFlight("t", 1, 2, 3.0)),
])
def test_codec_round_trip(msg):
    assert codec.decode(codec.encode(msg).rstrip(b"\n")) == msg


@pytest.mark.parametrize("line", [b"not json", b'{"type": "Nope"}', b'{"type": "Drain", "bogus": 1}', b"[]"])
def test_codec_rejects_garbage(line):
    with pytest.raises(codec.CodecError):
        codec.decode(line)


def test_offset_book_stores_only_finished_and_fences_late_completions():
    book = OffsetBook()
    tp = ("t", 0)
    book.acquire([tp])
    e1 = book.epoch_of(tp)
    book.track(tp, 5)
    assert book.mark_done(tp, 5, e1)
    assert book.take_dirty() == {tp: 6}
    assert book.take_dirty() == {}
    book.release([tp])
    assert not book.mark_done(tp, 6, e1), "a completion after revoke must not be stored"
    book.acquire([tp])  # assigned again: a new epoch
    book.track(tp, 7)
    assert not book.mark_done(tp, 7, e1), "nor one from the earlier assignment"
    assert book.mark_done(tp, 7, book.epoch_of(tp))
    assert book.take_dirty() == {tp: 8}
    assert book.fenced == 2


def test_offset_book_runs_in_order_and_out_of_order():
    book = OffsetBook()
    tp = ("t", 0)
    book.acquire([tp])
    e = book.epoch_of(tp)
    for o in (1, 2, 3, 5, 6, 7):  # 4 is a gap (compacted away or a transaction marker)
        book.track(tp, o)
    assert book.mark_done(tp, [1, 2, 3], e) and book.take_dirty() == {tp: 4}
    assert book.mark_done(tp, [6], e) and book.take_dirty() == {}, "5 is not finished"
    assert book.mark_done(tp, [5], e) and book.take_dirty() == {tp: 7}
    assert book.mark_done(tp, [7], e) and book.take_dirty() == {tp: 8}
    assert not book.owned[tp].pending and not book.owned[tp].finished


def test_offset_book_in_order_needs_no_tracking_and_still_fences():
    book = OffsetBook(in_order=True)
    tp = ("t", 0)
    book.acquire([tp])
    e = book.epoch_of(tp)
    book.track(tp, 5)
    assert not book.owned[tp].pending, "in order: nothing tracked per message"
    assert book.mark_done(tp, [9], e) and book.take_dirty() == {tp: 10}
    book.release([tp])
    book.acquire([tp])
    assert not book.mark_done(tp, [12], e), "an earlier assignment's completion is fenced"
    assert book.take_dirty() == {}


def _rec(p: int, o: int) -> Record:
    return Record("t", p, o, None, None, (), (0, 0))


def _executor(handler, chain=("stop",), attempts=3, backoff=0.01):
    from supervisor.child.policies import Executor

    return Executor(handler, list(chain), attempts, backoff, None, set())


def _run_until(runner, predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    done = []
    while time.monotonic() < deadline:
        runner.wait_progress(0.05)
        done += [(rec, outcome) for records, _epoch, outcome in runner.take_done() for rec in records]
        if predicate(done):
            break
    return done


def test_runner_stops_after_a_failure_and_keeps_order():
    seen: list[int] = []

    def handler(r: Record) -> None:
        if r.offset == 2:
            raise ValueError("boom")
        seen.append(r.offset)

    runner = HandlerRunner(_executor(handler))
    runner.start()
    runner.submit([_rec(0, o) for o in range(5)], 1)
    done = _run_until(runner, lambda d: runner.failure is not None)
    assert [j.offset for j, _ in done] == [0, 1, 2]
    assert done[-1][1].stop and isinstance(done[-1][1].error, ValueError)
    assert seen == [0, 1]
    assert not runner.busy()


def test_work_finished_before_a_hanging_message_is_handed_over_while_it_hangs():
    """Handler threads run a lane's messages in runs without the lock; what finished must still
    reach the consumer thread (and get stored) while a later message of the run hangs."""
    import threading

    gate = threading.Event()

    def handler(r: Record) -> None:
        if r.offset == 5:
            gate.wait(10)

    runner = HandlerRunner(_executor(handler))
    runner.start()
    runner.submit([_rec(0, o) for o in range(10)], 1)
    done = _run_until(runner, lambda d: len(d) >= 5, timeout=3)
    assert [j.offset for j, _ in done] == [0, 1, 2, 3, 4]
    assert runner.oldest_running() is not None and runner.oldest_running()[0].offset == 5
    gate.set()
    done = _run_until(runner, lambda d: len(d) >= 5, timeout=3)
    assert [j.offset for j, _ in done] == [5, 6, 7, 8, 9]


def test_a_hanging_batch_is_in_flight_for_every_partition_it_holds():
    """A batch of two partitions hangs in the handler: a revoke of either partition, also the one
    that is not the batch's first record's, must see it in flight (the revoke's --handler-timeout cut, loop.on_revoke),
    and a revoke of a partition the batch does not hold must not."""
    import threading

    gate = threading.Event()
    runner = HandlerRunner(_executor(lambda records: gate.wait(10)), batch_size=4, batch_timeout_s=0.05)
    runner.start()
    try:
        runner.submit([_rec(0, 0), _rec(0, 1), _rec(1, 0), _rec(1, 1)], 1)
        deadline = time.monotonic() + 5
        while runner.oldest_running() is None:
            assert time.monotonic() < deadline, "the batch never started"
            time.sleep(0.01)
        for p in (0, 1):  # one of them is the batch's first record's, the other is not
            held = runner.oldest_running({("t", p)})
            assert held is not None, f"partition {p}: not in flight"
            assert held[0].partition == p, f"a revoke of partition {p} would name {held[0].coordinates}"
        assert runner.oldest_running({("t", 2)}) is None
    finally:
        gate.set()
        runner.stop()


def test_a_skipped_message_inside_a_run_keeps_its_place_and_its_outcome():
    def handler(r: Record) -> None:
        if r.offset == 2:
            raise ValueError("bad")

    runner = HandlerRunner(_executor(handler, chain=("skip",)))
    runner.start()
    runner.submit([_rec(0, o) for o in range(5)], 1)
    done = _run_until(runner, lambda d: len(d) == 5)
    assert [(j.offset, o.note) for j, o in done] == [(0, ""), (1, ""), (2, "skipped"), (3, ""), (4, "")]
    counts, total = runner.latency()
    assert sum(counts) == 5 and total >= 0


def test_retry_waits_only_for_its_own_partition_then_skips():
    calls: list[tuple[int, int]] = []

    def handler(r: Record) -> None:
        calls.append((r.partition, r.offset))
        if r.partition == 0:
            raise RuntimeError("flaky")

    runner = HandlerRunner(_executor(handler, chain=("retry", "skip"), attempts=2, backoff=0.2))
    runner.start()
    runner.submit([_rec(0, 0)] + [_rec(1, o) for o in range(3)], 1)
    done = _run_until(runner, lambda d: len(d) == 4)
    assert calls[:4] == [(0, 0), (1, 0), (1, 1), (1, 2)], "partition 1 runs while partition 0 backs off"
    assert calls.count((0, 0)) == 3, "first try and two retries"
    skipped = [o for j, o in done if j.partition == 0]
    assert skipped[0].store and skipped[0].note == "skipped"


def test_concurrency_by_key_completes_out_of_order_but_stores_the_contiguous_prefix():
    import threading

    gate = threading.Event()

    def handler(r: Record) -> None:
        if r.key == b"slow":
            gate.wait(5)

    runner = HandlerRunner(_executor(handler), concurrency=2, order_by="key")
    runner.start()
    book = OffsetBook()
    tp = ("t", 0)
    book.acquire([tp])
    epoch = book.epoch_of(tp)
    records = [Record("t", 0, o, b"slow" if o == 1 else b"k%d" % o, None, (), (0, 0)) for o in range(4)]
    for r in records:
        book.track(tp, r.offset)
    runner.submit(records, epoch)
    done = _run_until(runner, lambda d: len(d) == 3)
    for j, _ in done:
        book.mark_done(tp, j.offset, epoch)
    assert sorted(j.offset for j, _ in done) == [0, 2, 3]
    assert book.take_dirty() == {tp: 1}, "offset 1 is unfinished: store 1, not 4"
    gate.set()
    done = _run_until(runner, lambda d: len(d) == 1)
    book.mark_done(tp, 1, epoch)
    assert book.take_dirty() == {tp: 4}


def test_batch_handler_gets_lists_and_async_handlers_run():
    batches: list[list[int]] = []

    def batch_handler(records: list[Record]) -> None:
        batches.append([r.offset for r in records])

    runner = HandlerRunner(_executor(batch_handler), batch_size=4, batch_timeout_s=0.2)
    runner.start()
    runner.submit([_rec(0, o) for o in range(6)], 1)
    _run_until(runner, lambda d: len(d) == 6)
    assert batches == [[0, 1, 2, 3], [4, 5]]

    seen: list[int] = []

    async def async_handler(r: Record) -> None:
        import asyncio

        await asyncio.sleep(0)
        seen.append(r.offset)

    runner = HandlerRunner(_executor(async_handler))
    runner.start()
    runner.submit([_rec(0, o) for o in range(3)], 1)
    _run_until(runner, lambda d: len(d) == 3)
    assert seen == [0, 1, 2]


def test_a_retried_batch_goes_back_in_order_and_runs_again():
    batches: list[list[tuple[int, int]]] = []

    def batch_handler(records: list[Record]) -> None:
        batches.append([(r.partition, r.offset) for r in records])
        if len(batches) == 1:
            raise RuntimeError("flaky")

    execute = _executor(batch_handler, chain=("retry",), backoff=0.05)
    calls: list[tuple[int, int]] = []  # (records, failed attempts before) of each batch call
    policy_batch = execute.batch
    execute.batch = lambda records, attempts: calls.append((len(records), attempts)) or policy_batch(records, attempts)
    runner = HandlerRunner(execute, batch_size=3, batch_timeout_s=0.05)
    runner.start()
    runner.submit([_rec(p, o) for p in (0, 1) for o in range(2)], 1)
    done = _run_until(runner, lambda d: len(d) == 4)
    assert sorted(batches[0]) == sorted(batches[1]) and len(batches[0]) == 3, "the same records again"
    for batch in batches:
        for p in (0, 1):
            offsets = [o for q, o in batch if q == p]
            assert offsets == sorted(offsets), f"partition {p} out of order in {batch}"
    assert calls == [(3, 0), (3, 1), (1, 0)], "the retried three count an attempt, the fourth none"
    offsets = {p: [j.offset for j, _ in done if j.partition == p] for p in (0, 1)}
    assert offsets == {0: [0, 1], 1: [0, 1]}, "each partition in order"


def test_no_record_of_a_failing_batch_runs_past_its_retry_attempts():
    """Batches mix partitions and get split where the batch is full. A retried piece split again
    gave its rest 0 attempts, and a batch's count was its first piece's while pieces that had
    failed more often rode along: records ran 3 times with --retry-attempts 1. Every record of an
    always-failing handler now runs exactly 1 + 1 times, then is skipped."""
    import collections

    calls: collections.Counter[tuple[int, int]] = collections.Counter()

    def batch_handler(records: list[Record]) -> None:
        calls.update((r.partition, r.offset) for r in records)
        raise RuntimeError("always")

    runner = HandlerRunner(_executor(batch_handler, chain=("retry", "skip"), attempts=1, backoff=0.02),
                           batch_size=3, batch_timeout_s=0.02)
    runner.start()
    try:
        runner.submit([_rec(p, o) for p in (0, 1) for o in range(4)], 1)
        done = _run_until(runner, lambda d: len(d) == 8)
        assert sorted((j.partition, j.offset) for j, _ in done) == [(p, o) for p in (0, 1) for o in range(4)]
        assert all(o.note == "skipped" for _, o in done)
        assert dict(calls) == {(p, o): 2 for p in (0, 1) for o in range(4)}, dict(calls)
    finally:
        runner.stop()


def test_runner_drop_removes_only_queued_work_of_those_partitions():
    runner = HandlerRunner(_executor(lambda r: None))  # not started: everything stays queued
    runner.submit([_rec(p, o) for p in (0, 1) for o in range(3)], 1)
    assert runner.drop({("t", 0)}) == 3
    assert runner.backlog_size() == 3


def test_records_from_a_fetch_keep_every_field():
    """to_records (the worker's conversion of a whole fetch) gives Records, field for field. A
    Record is an immutable value all through: its headers are a tuple of (name, value) pairs, the
    empty tuple when the message has none, so a Record can be hashed (kept in a set, a dict key)."""
    from confluent_kafka import Message

    from supervisor.child.loop import to_records

    def msg(o, headers=None):
        return Message(topic="t", partition=3, offset=o, key=b"k%d" % o, value=b"v", headers=headers,
                       timestamp=(1, 1000 + o))

    for msgs in ([msg(5), msg(6)], [msg(5, [("h", b"1"), ("n", None)]), msg(6)]):
        records = to_records(msgs, ["t", "t"], [3, 3])
        assert all(type(r) is Record for r in records)
        assert [r[:5] + (r.timestamp,) for r in records] == [("t", 3, 5, b"k5", b"v", (1, 1005)),
                                                              ("t", 3, 6, b"k6", b"v", (1, 1006))]
        assert records[1].headers == ()
        assert len({*records, *to_records(msgs, ["t", "t"], [3, 3])}) == 2  # hashable, equal by value
    assert records[0].headers == (("h", b"1"), ("n", None))


def test_the_board_names_every_record_of_a_batch(tmp_path):
    """A batch's run of consecutive offsets takes one board record (a range), offsets with gaps one
    each; the reader gives back every (topic, partition, offset), and a cleared batch none."""
    from supervisor.contract import inflight_board

    path = str(tmp_path / "board")
    inflight_board.create(path, 500)
    board = inflight_board.BoardWriter(path, 500)
    runs = [[_rec(3, o) for o in range(100, 400)], [_rec(1, 5)], [_rec(4, 7), _rec(4, 9)]]
    used = board.set_batch(runs)
    assert used == 4
    assert inflight_board.read(path) == [("t", r.partition, r.offset) for run in runs for r in run]
    board.clear_many(used)
    assert inflight_board.read(path) == []
    board.offset_cell(0, "t", 2, 10)[0] = 11  # the per-message path: the offset alone
    assert inflight_board.read(path) == [("t", 2, 11)]


def test_the_board_tells_apart_topics_whose_long_names_share_their_first_237_bytes(tmp_path):
    """Kafka allows 249-character names; a board record has room for 237 bytes. Two long names
    that differ only after that must come back as two keys, each the key_of its own records (a
    poison message of one topic must never match the other's message at the same offset)."""
    from supervisor.contract import inflight_board

    path = str(tmp_path / "board")
    inflight_board.create(path, 2)
    board = inflight_board.BoardWriter(path, 2)
    a, b = "x" * 240 + "-alpha", "x" * 240 + "-bravo"
    ra, rb = Record(a, 0, 5, None, None, (), (0, 0)), Record(b, 0, 5, None, None, (), (0, 0))
    board.set(0, a, 0, 5)
    board.set(1, b, 0, 5)
    back = inflight_board.read(path)
    assert back == [inflight_board.key_of(ra), inflight_board.key_of(rb)]
    assert back[0] != back[1]
    assert inflight_board.key_of(_rec(0, 5)) == ("t", 0, 5)  # a short name as it is


def _settings(**kw):
    base = dict(handler="h:p", topics=("t",), group="g", bootstrap_servers="127.0.0.1:1")
    return config.build({**base, **kw})


def test_config_refuses_offset_unsafe_settings():
    with pytest.raises(ConfigError, match="enable.auto.offset.store=true is refused"):
        _settings(kafka={"enable.auto.offset.store": "true"})
    with pytest.raises(ConfigError, match="enable.auto.commit=false is refused"):
        _settings(kafka={"enable.auto.commit": "false"})
    with pytest.raises(ConfigError, match="cannot be set with --group-protocol consumer"):
        _settings(group_protocol="consumer", kafka={"session.timeout.ms": "6000"})


def test_kafka_config_forces_the_offset_contract():
    s = _settings(kafka={"auto.offset.reset": "latest", "enable.auto.offset.store": "false"})
    conf = config.kafka_config(s, 2)
    assert conf["enable.auto.offset.store"] == "false" and conf["enable.auto.commit"] == "true"
    assert conf["auto.offset.reset"] == "latest"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["client.id"].endswith("-g-2")
    assert conf["fetch.queue.backoff.ms"] == "50", "librdkafka's 1 s refill backoff lifted"
    user = config.kafka_config(_settings(kafka={"fetch.queue.backoff.ms": "1000"}), 0)
    assert user["fetch.queue.backoff.ms"] == "1000", "the user's setting wins"


def test_config_file_unknown_key(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('group = "g"\nwokers = 2\n')
    with pytest.raises(ConfigError, match="unknown config key 'wokers'"):
        config.load_file(str(f))
    f.write_text('topic = "a"\n[kafka]\n"fetch.min.bytes" = 10\n"check.crcs" = true\n')
    assert config.load_file(str(f)) == {"topics": ("a",), "kafka": {"fetch.min.bytes": "10", "check.crcs": "true"}}


def test_restart_backoff_and_crash_loop():
    assert policy.restart_delay([100.0], 100.0, 1.0, 30.0) == 1.0
    assert policy.restart_delay([97.0, 98.0, 99.0, 100.0], 100.0, 1.0, 30.0) == 8.0
    assert policy.restart_delay([float(t) for t in range(20)], 20.0, 1.0, 30.0) == 30.0
    assert policy.restart_delay([97.0, 98.0, 99.0, 100.0], 100.0, 0.2, 0.5) == 0.5, "--max-restart-delay caps it"
    assert policy.restart_delay([0.0, 1.0], 500.0, 1.0, 30.0) == 1.0, "reset after a healthy period"
    assert policy.is_crash_loop([1, 2, 3, 4, 5], 6, 5, 60)
    assert not policy.is_crash_loop([1, 2, 3, 4, 5], 100, 5, 60)


def test_exit_codes():
    assert policy.final_exit_code([0, 0], forced=False) == ExitCode.OK
    assert policy.final_exit_code([0, None], forced=False) == ExitCode.FORCED
    assert policy.final_exit_code([0, WorkerExit.DRAIN_TIMEOUT], forced=False) == ExitCode.FORCED
    assert policy.final_exit_code([0, WorkerExit.COMMIT_FAILED], forced=False) == ExitCode.COMMIT_FAILED
    assert policy.halt_code_for_boot_failure(WorkerExit.CONFIG) == ExitCode.CONFIG
    assert policy.halt_code_for_boot_failure(WorkerExit.BOOT_FAILED) == ExitCode.BOOT_FAILED
    assert describe_returncode(-9).describe() == "killed by SIGKILL"
    assert describe_returncode(10).describe() == "exit 10 (HANDLER_FAILED)"


def test_an_instance_id_the_broker_still_holds_is_fenced_only_after_the_wait():
    """KIP-848's UNRELEASED_INSTANCE_ID: a slot refused for less than --instance-id-wait is retried
    (its own dead predecessor holds the id until its session expires); longer means another
    consumer uses it: exit 8 with the prefix named."""
    held = int(WorkerExit.INSTANCE_ID_HELD)
    assert policy.halt_for_worker_exit(held, 1, "", "h0-1", "g", held_for=0.0, instance_id_wait=60) is None
    assert policy.halt_for_worker_exit(held, 1, "", "h0-1", "g", held_for=59.0, instance_id_wait=60) is None
    code, reason = policy.halt_for_worker_exit(held, 1, "", "h0-1", "g", held_for=61.0, instance_id_wait=60)
    assert code == ExitCode.FENCED and "after 61s" in reason and "'h0'" in reason, reason
    fenced = policy.halt_for_worker_exit(int(WorkerExit.FENCED), 1, "", "h0-1", "g")
    assert fenced is not None and fenced[0] == ExitCode.FENCED



def test_kip848_unreleased_instance_id_is_held_not_fenced():
    from confluent_kafka import KafkaError

    from supervisor.child.kafka_problems import classify

    unreleased = KafkaError(KafkaError._FATAL, "Fatal error: Broker: The instance ID is still used by another "
                                               "member in the consumer group: ConsumerGroupHeartbeat fatal error")
    held = classify(unreleased, "h0-1", "g")
    assert held is not None and held.code == WorkerExit.INSTANCE_ID_HELD and "'h0-1'" in held.reason, held
    fenced = classify(KafkaError(KafkaError.FENCED_INSTANCE_ID), "h0-1", "g")
    assert fenced is not None and fenced.code == WorkerExit.FENCED


def test_leftover_slots_are_this_prefix_above_the_configured_workers():
    """adapters/leftovers.py: which instance ids of the broker's member list are slots a previous
    ksup scaled up and left behind (other prefixes, a prefix that only starts the same, and the
    configured slots are not)."""
    from supervisor.adapters.leftovers import leftover_slots

    ids = ["h-g-0", "h-g-1", "h-g-4", "h-g-12", "h-g-x", "h-g2-5", "other-3", "", "h-g-4"]
    assert leftover_slots(ids, "h-g", 2) == [4, 12]
    assert leftover_slots(ids, "h-g", 13) == []


def test_a_drained_workers_end_is_judged_as_a_stop_would_judge_it():
    """worker_events.drain_verdict, which `ksup reload` reports: a clean drain is None; a
    message abandoned or a kill at the deadline is 4, an unconfirmed commit or an exit 0
    without the drain's report is 5, each with what happened in words."""
    from supervisor.contract import messages as m
    from supervisor.contract.exitcodes import ExitCode
    from supervisor.parent.slots import WorkerSlot
    from supervisor.parent.worker_events import drain_verdict

    def ended(returncode: int, exiting: m.Exiting | None = None, killed: bool = False) -> WorkerSlot:
        slot = WorkerSlot(0)
        slot.returncode, slot.exiting, slot.killed = returncode, exiting, killed
        return slot

    assert drain_verdict(ended(0, m.Exiting(7, 0, "rolling reload"))) is None
    code, text = drain_verdict(ended(11, m.Exiting(7, 11, "rolling reload", abandoned=m.InFlight("t", 1, 9, 0.0))))
    assert code is ExitCode.FORCED and "did not finish t[1]@9" in text
    code, text = drain_verdict(ended(-9, killed=True))
    assert code is ExitCode.FORCED and "killed" in text
    assert drain_verdict(ended(5, m.Exiting(7, 5, "rolling reload")))[0] is ExitCode.COMMIT_FAILED
    assert drain_verdict(ended(0))[0] is ExitCode.COMMIT_FAILED, "exit 0 without the drain's report"
    assert drain_verdict(ended(-11))[0] is ExitCode.FORCED
    assert drain_verdict(ended(-11, m.Exiting(7, 0, "rolling reload")))[0] is ExitCode.FORCED, \
        "its report said 0, then a signal killed it while closing"


def test_the_last_line_says_what_a_workers_exit_code_means():
    """"worker 0: SIGTERM received (exit 5)" told why the worker stopped, not what went wrong."""
    from supervisor.contract import messages as m
    from supervisor.contract.exitcodes import ExitCode
    from supervisor.parent.core import SupervisorCore

    core = SupervisorCore(_settings(), 0.0)
    slot = core.slots[0]
    slot.in_final_drain, slot.returncode = True, 5
    slot.exiting = m.Exiting(7, 5, "SIGTERM received")
    assert core.final_reason(ExitCode.COMMIT_FAILED) == (
        "worker 0: the broker did not confirm its final commit (its finished messages will be redelivered) "
        "(exit 5; SIGTERM received)")
    slot.returncode, slot.exiting = 11, m.Exiting(7, 11, "SIGTERM received", abandoned=m.InFlight("t", 1, 9, 0.0))
    assert core.final_reason(ExitCode.FORCED).startswith("worker 0: its handler did not finish t[1]@9 within")
    slot.returncode, slot.exiting = 10, m.Exiting(7, 10, "SIGTERM received, then handler raised ValueError on t[0]@3")
    assert core.final_reason(ExitCode.FORCED) == ("worker 0: SIGTERM received, then handler raised ValueError on "
                                                  "t[0]@3: that message was not stored and will be redelivered "
                                                  "(exit 10)")


def test_a_stop_and_a_reload_judge_a_drained_workers_end_alike():
    """`ksup stop` said 0 for a worker whose final drain ended 10, 12, 14 or 70 (only 5 and 11
    counted), while `ksup reload` said 4 for the same end. One table now (policy.DRAIN_END): a
    message not stored is 4, finished work not confirmed 5, a bug in the worker 1."""
    from supervisor.contract import messages as m
    from supervisor.contract.exitcodes import ExitCode, WorkerExit
    from supervisor.parent.core import SupervisorCore
    from supervisor.parent.worker_events import drain_verdict

    expected = {WorkerExit.OK: ExitCode.OK, WorkerExit.COMMIT_FAILED: ExitCode.COMMIT_FAILED,
                WorkerExit.DRAIN_TIMEOUT: ExitCode.FORCED, WorkerExit.HANDLER_FAILED: ExitCode.FORCED,
                WorkerExit.HANDLER_CRASHED: ExitCode.FORCED, WorkerExit.KAFKA_FATAL: ExitCode.COMMIT_FAILED,
                WorkerExit.INTERNAL: ExitCode.INTERNAL, 99: ExitCode.FORCED}
    for worker_code, code in expected.items():
        for report in (True, False):
            if worker_code == WorkerExit.OK and not report:
                continue  # exit 0 without the drain's report: its own test
            core = SupervisorCore(_settings(), 0.0)
            slot = core.slots[0]
            slot.in_final_drain, slot.returncode = True, int(worker_code)
            slot.exiting = m.Exiting(7, int(worker_code), "SIGTERM received") if report else None
            verdict = drain_verdict(slot)
            assert core.final_code() is code, (worker_code, report)
            assert (verdict[0] if verdict else ExitCode.OK) is code, (worker_code, report)
            if verdict is not None:
                assert core.final_reason(code) == f"worker 0: {verdict[1]}"
    # Three workers: the worst end is ksup's (a bug before a message not stored before a commit).
    core = SupervisorCore(_settings(workers=3), 0.0)
    for slot, worker_code in zip(core.slots, (5, 10, 0), strict=True):
        slot.in_final_drain, slot.returncode = True, worker_code
        slot.exiting = m.Exiting(7, worker_code, "SIGTERM received")
    assert core.final_code() is ExitCode.FORCED
    core.slots[2].returncode, core.slots[2].exiting = 70, None
    assert core.final_code() is ExitCode.INTERNAL


def test_the_lanes_of_keys_go_once_they_ran_empty():
    """--order-by key: a lane per key; one that ran empty goes (hostile review: with unique keys
    the lanes grew with every key ever seen, and every scan of them with it: 2,300 -> under 100
    messages a second). A retried message keeps its lane until it is done."""
    import threading
    import time

    from supervisor.child.policies import ErrorPolicy, Executor
    from supervisor.child.runner import HandlerRunner
    from supervisor.record import Record

    done: list[int] = []
    failed = threading.Event()

    def one(record: Record) -> None:
        if record.offset == 7 and not failed.is_set():
            failed.set()
            raise RuntimeError("flaky")
        done.append(record.offset)

    runner = HandlerRunner(Executor(one, [ErrorPolicy.RETRY, ErrorPolicy.STOP], 2, 0.2, None, set()),
                           concurrency=2, order_by="key")
    runner.start()
    try:
        records = [Record("t", 0, o, f"k{o}".encode(), b"v", (), (1, 0)) for o in range(3000)]
        runner.submit_runs([(("t", 0), 1, records)])
        deadline = time.monotonic() + 30
        while len(done) < 3000:
            assert time.monotonic() < deadline, f"{len(done)} of 3000 handled"
            runner.take_done()
            time.sleep(0.01)
        assert sorted(done) == list(range(3000))
        while runner.running:  # the last runs' threads leave them
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(runner._lanes) == 0, f"{len(runner._lanes)} lanes left"
    finally:
        runner.stop()
