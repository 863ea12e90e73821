"""HandlerRunner: runs the user's handler on handler threads (child side).

Why threads: the consumer thread must keep serving the consumer (rebalance callbacks,
``max.poll.interval.ms``, drain requests) while handlers run. Handler threads never touch the
Consumer (confluent-kafka 2.16 serialises calls across threads, and a handler thread calling it
while ``on_revoke`` waits for that thread would deadlock); they only move work from the backlog
to ``done``.

Ordering: work is queued in *lanes*, one per partition (or per partition and key with
``order_by="key"``). A lane runs one message at a time, in order; different lanes run in
parallel on ``concurrency`` threads. A message whose handler failed and is to be retried stays
at the head of its lane until its backoff passed, so only that lane waits.

Contract with the consumer thread:
- ``submit`` appends work; ``take_done`` returns finished work as (job, Outcome);
- after an outcome with ``stop`` the runner takes no more work (``failure`` is set);
- ``drop`` forgets queued work of partitions; ``wait_not_running`` waits for their running work;
- ``backing_off`` names the partitions waiting out a retry backoff (their fetching is paused).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from supervisor.record import Record

TP = tuple[str, int]
Lane = tuple[str, int] | tuple[str, int, bytes | None]


@dataclass(slots=True)
class Job:
    record: Record
    epoch: int  # OffsetBook epoch of the partition when the message was fetched
    attempts: int = 0
    not_before: float = 0.0  # monotonic; a retry waits until then

    @property
    def tp(self) -> TP:
        return (self.record.topic, self.record.partition)


@dataclass(slots=True)
class Outcome:
    """How a job ended. ``store``: its offset may be stored. ``stop``: the worker must drain.
    ``retry_in``: run it again after that many seconds (the job keeps its lane)."""

    store: bool
    stop: bool = False
    retry_in: float | None = None
    error: BaseException | None = None
    note: str = ""
    seconds: float = 0.0  # how long the handler (and policy) took


# Runs one job (the handler plus the error policy), returns its Outcome. Given by the worker.
Execute = Callable[[list[Job]], Outcome]


class HandlerRunner:
    def __init__(self, execute: Execute, concurrency: int = 1, order_by: str = "partition",
                 batch_size: int = 1, batch_timeout_s: float = 0.0,
                 on_start: Callable[[int, Job | None], None] | None = None) -> None:
        self._execute = execute
        self._cond = threading.Condition()
        self._lanes: OrderedDict[Lane, deque[Job]] = OrderedDict()
        self._active: set[Lane] = set()
        self._done: list[tuple[Job, Outcome]] = []
        self._queued = 0
        self.running: dict[int, tuple[Job, float]] = {}  # thread number -> (first job, since)
        self.failure: tuple[Job, Outcome] | None = None
        self._stopping = False
        self._order_by = order_by
        self._batch_size, self._batch_timeout_s = batch_size, batch_timeout_s
        self._on_start = on_start  # tells the in-flight board what each thread works on
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"ksup-handler-{i}", daemon=True)
                         for i in range(concurrency)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    # ---- consumer-thread API ----------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        with self._cond:
            for job in jobs:
                lane = self._lane_of(job)
                self._lanes.setdefault(lane, deque()).append(job)
            self._queued += len(jobs)
            self._cond.notify_all()

    def backlog_size(self) -> int:
        return self._queued

    def busy(self) -> bool:
        return bool(self.running) or self._queued > 0

    def oldest_running(self) -> tuple[Job, float] | None:
        running = list(self.running.values())
        return min(running, key=lambda r: r[1]) if running else None

    def take_done(self) -> list[tuple[Job, Outcome]]:
        with self._cond:
            done, self._done = self._done, []
        return done

    def wait_progress(self, timeout: float) -> None:
        """Block up to ``timeout`` until something finished (or return at once if it has)."""
        with self._cond:
            if not self._done and self.busy():
                self._cond.wait(timeout)

    def backing_off(self) -> set[TP]:
        now = time.monotonic()
        with self._cond:
            return {lane_jobs[0].tp for lane_jobs in self._lanes.values()
                    if lane_jobs and lane_jobs[0].not_before > now}

    def drop(self, tps: set[TP]) -> int:
        """Forget queued work of these partitions; returns how many messages were dropped."""
        with self._cond:
            dropped = 0
            for lane in [lane for lane in self._lanes if lane[:2] in tps]:
                dropped += len(self._lanes.pop(lane))
            self._queued -= dropped
        return dropped

    def wait_not_running(self, tps: set[TP] | None, deadline: float) -> bool:
        """Wait until no message of ``tps`` (None: of any partition) is in a handler, or the
        monotonic ``deadline`` passed. True when nothing of theirs is running."""
        with self._cond:
            while True:
                if not any(tps is None or job.tp in tps for job, _ in self.running.values()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))

    def stop(self) -> None:
        """Take no more work: clear the backlog; messages in flight still finish."""
        with self._cond:
            self._stopping = True
            self._lanes.clear()
            self._queued = 0
            self._cond.notify_all()

    # ---- handler threads ----------------------------------------------------------------------

    def _lane_of(self, job: Job) -> Lane:
        if self._order_by == "key":
            return (job.record.topic, job.record.partition, job.record.key)
        return job.tp

    def _take(self) -> tuple[Lane, list[Job]] | None:
        """Under the lock: the next ready lane's head (a batch of heads in batch mode)."""
        now = time.monotonic()
        for lane, jobs in self._lanes.items():
            if lane in self._active or not jobs or jobs[0].not_before > now:
                continue
            self._lanes.move_to_end(lane)  # round robin: every partition gets its turn
            if self._batch_size <= 1:
                return lane, [jobs[0]]
            return lane, self._batch_heads(now)
        return None

    def _batch_heads(self, now: float) -> list[Job]:
        """Batch mode (one handler thread): up to batch_size messages in order from all lanes."""
        batch: list[Job] = []
        for jobs in self._lanes.values():
            for job in jobs:
                if len(batch) >= self._batch_size or job.not_before > now:
                    break
                batch.append(job)
        return batch

    def _next_wait(self) -> float | None:
        waits = [jobs[0].not_before - time.monotonic() for jobs in self._lanes.values() if jobs]
        return max(min(waits), 0.001) if waits else None

    def _run(self, number: int) -> None:
        cond = self._cond
        while True:
            with cond:
                taken = None
                while not self._stopping:
                    if self._batch_size > 1 and 0 < self._queued < self._batch_size:
                        self._fill_wait()
                    taken = self._take()
                    if taken is not None:
                        break
                    cond.wait(self._next_wait())
                if taken is None:
                    return
                lane, jobs = taken
                self._active.add(lane)
                self.running[number] = (jobs[0], time.time())
            if self._on_start is not None:
                self._on_start(number, jobs[0])
            t0 = time.perf_counter()
            outcome = self._execute(jobs)
            outcome.seconds = time.perf_counter() - t0
            if self._on_start is not None:
                self._on_start(number, None)
            with cond:
                self._finish(lane, jobs, outcome)
                self._active.discard(lane)
                del self.running[number]
                cond.notify_all()

    def _fill_wait(self) -> None:
        """Batch mode: give a partial batch up to batch_timeout to fill (lock held, released while waiting)."""
        deadline = time.monotonic() + self._batch_timeout_s
        while not self._stopping and 0 < self._queued < self._batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _finish(self, lane: Lane, jobs: list[Job], outcome: Outcome) -> None:
        if outcome.retry_in is not None and not outcome.stop:
            for job in jobs:
                job.attempts += 1
                job.not_before = time.monotonic() + outcome.retry_in
            return  # they stay at the head of their lanes
        for job in jobs:
            queue = self._lanes.get(self._lane_of(job))
            if queue and queue[0] is job:
                queue.popleft()
                self._queued -= 1
            self._done.append((job, outcome))
        if outcome.stop:
            self.failure = (jobs[-1], outcome)
            self._stopping = True
            self._lanes.clear()
            self._queued = 0
