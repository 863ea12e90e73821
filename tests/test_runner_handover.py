"""The lock-free hand-over of finished work from handler threads to the consumer thread (issue
12), under a tiny switch interval so that threads interleave at almost every bytecode: no
exception on either side, every job handed over exactly once, in order per partition, with its
outcome. Pure threads, no broker."""

from __future__ import annotations

import sys
import threading
import time

from supervisor.child.runner import STORED, HandlerRunner, Outcome
from supervisor.record import Record

SKIPPED = "skipped"


class Execute:
    """Every third message raises; the policy then answers a special (non-STORED) outcome."""

    def batch(self, records: list[Record], attempts: int) -> Outcome:
        raise AssertionError("not a batch handler")

    def on_failure(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome:
        return Outcome(store=True, error=exc, note=SKIPPED)

    @staticmethod
    def _plain(record: Record) -> None:
        for _ in range(30):  # a little work: more switches inside a lane's run
            pass
        if record.offset % 3 == 0:
            raise ValueError(record.offset)

    @property
    def one(self):  # type: ignore[no-untyped-def]
        return self._plain


ROUNDS_FOR_S = 8.0  # one round lost the race about 4 times in 10 on the old hand-over


def test_hand_over_under_a_tiny_switch_interval():
    end = time.monotonic() + ROUNDS_FOR_S
    while time.monotonic() < end:
        one_round()


def one_round() -> None:
    partitions, per_partition = 4, 20000
    runner = HandlerRunner(Execute(), concurrency=4)  # type: ignore[arg-type]
    runner.start()
    got: dict[int, list[tuple[int, bool]]] = {p: [] for p in range(partitions)}
    errors: list[BaseException] = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def feed() -> None:
            for start in range(0, per_partition, 50):
                runner.submit([Record("t", p, o, None, None, (), (0, 0))
                               for p in range(partitions) for o in range(start, start + 50)], epoch=0)
                time.sleep(0.0005)

        feeder = threading.Thread(target=feed)
        feeder.start()
        deadline = time.monotonic() + 120
        total = partitions * per_partition
        while sum(len(v) for v in got.values()) < total and time.monotonic() < deadline:
            try:
                for records, _epoch, outcome in runner.take_done():
                    for r in records:
                        got[r.partition].append((r.offset, outcome is not STORED))
                runner.busy()
                runner.oldest_running()
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)
                break
        feeder.join()
    finally:
        sys.setswitchinterval(old)
        runner.stop()
    assert not errors, errors
    for p, done in got.items():
        assert [o for o, _ in done] == list(range(per_partition)), f"partition {p}: lost, repeated or reordered"
        assert all(special == (o % 3 == 0) for o, special in done), f"partition {p}: an outcome went astray"


def test_a_slow_lane_yields_to_a_waiting_one():
    """Fairness (issue 16): one handler thread, two partitions with 20 queued messages each, a
    10 ms handler: the second partition starts long before the first is done (the thread yields
    a lane after RUN_SLICE_S when another waits), and each partition stays in order."""
    order: list[tuple[int, int]] = []

    class Slow(Execute):
        @staticmethod
        def _plain(record: Record) -> None:
            order.append((record.partition, record.offset))
            time.sleep(0.01)

    runner = HandlerRunner(Slow(), concurrency=1)  # type: ignore[arg-type]
    runner.submit([Record("t", p, o, None, None, (), (0, 0)) for p in (0, 1) for o in range(20)], epoch=0)
    runner.start()
    deadline = time.monotonic() + 10
    done = 0
    while done < 40 and time.monotonic() < deadline:
        done += sum(len(records) for records, _, _ in runner.take_done())
        time.sleep(0.01)
    runner.stop()
    assert done == 40
    first_of_1 = order.index((1, 0))
    assert first_of_1 < 15, f"partition 1 waited for {first_of_1} messages of partition 0"
    for p in (0, 1):
        assert [o for q, o in order if q == p] == list(range(20))


class _PolicyBug(Execute):
    """The handler raises on offset 2 once ``go`` is set; the error policy itself then raises (a
    bug in policy code). ``at2`` is set when the handler is on offset 2."""

    at2 = threading.Event()
    go = threading.Event()

    def on_failure(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome:
        raise RuntimeError("bug in the policy path")

    @staticmethod
    def _plain(record: Record) -> None:
        if record.offset == 2:
            _PolicyBug.at2.set()
            _PolicyBug.go.wait(10)
            raise ValueError(record.offset)


def test_a_crashed_handler_thread_is_known_before_it_looks_idle(monkeypatch):
    """The drain waits until nothing runs, then asks whether a thread crashed. The thread left
    ``running`` (its ``finally``) before the crash was recorded (formatting the traceback, in its
    caller), so a drain that looked in between took the dead thread for an idle one and exited 0
    (CI, test_an_exception_in_the_error_policy_during_a_drain_is_not_a_clean_stop). A slow
    traceback (a deep stack) widens that window here to 0.3 s."""
    from supervisor.child import runner as runner_mod

    real_format = runner_mod.traceback.format_exc

    def slow_format() -> str:
        time.sleep(0.3)  # a deep stack formats slowly: the window, made wide
        return real_format()

    monkeypatch.setattr(runner_mod.traceback, "format_exc", slow_format)
    runner = HandlerRunner(_PolicyBug())  # type: ignore[arg-type]
    runner.start()
    try:
        runner.submit([Record("t", 0, o, None, None, (), (0, 0)) for o in range(5)], epoch=0)
        assert _PolicyBug.at2.wait(10), "the handler never reached offset 2"
        assert runner.running, "offset 2 is in the handler"
        _PolicyBug.go.set()
        assert runner.wait_not_running(None, time.monotonic() + 10), "the thread never left the run"
        assert runner.crashed is not None, "nothing runs, and no crash known: a dead thread looks idle"
        assert "bug in the policy path" in runner.crashed[2]
    finally:
        runner.stop()


def test_idle_handler_threads_sleep_while_the_only_lane_with_work_runs_on_another():
    """Hostile review: with --concurrency above 1 and one partition with work (or a runner held
    over --max-memory), the idle handler threads woke every millisecond: their wait was the
    lanes' earliest backoff, which for a lane already running was "now", floored at 1 ms. Each
    wait of theirs is counted while one thread is on a long message of the only lane."""
    release = threading.Event()
    started = threading.Event()

    class Blocking(Execute):
        @staticmethod
        def _plain(record: Record) -> None:
            started.set()
            release.wait(10)

    waits: list[float | None] = []

    class Counting(HandlerRunner):
        def _next_wait(self) -> float | None:
            wait = super()._next_wait()
            waits.append(wait)
            return wait

    runner = Counting(Blocking(), concurrency=4)  # type: ignore[arg-type]
    runner.submit([Record("t", 0, o, None, None, (), (0, 0)) for o in range(3)], epoch=0)
    # Queued behind the run in the handler (another assignment: never joined to it).
    runner.submit([Record("t", 0, o, None, None, (), (0, 0)) for o in range(3, 6)], epoch=1)
    runner.start()
    try:
        assert started.wait(10)
        time.sleep(0.3)  # paces the window in which the idle threads' waits are counted
        during = len(waits)
        runner.hold(True)  # held (over --max-memory): no thread may take work, none needs to wake
        time.sleep(0.3)  # the same window, the runner held
        held = len(waits) - during
    finally:
        release.set()
        runner.hold(False)
        runner.stop()
    assert during < 30, f"idle threads woke {during} times in 0.3 s while the only lane ran elsewhere"
    assert held < 30, f"idle threads woke {held} times in 0.3 s while the runner was held"
