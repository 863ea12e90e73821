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

How finished work travels back without a lock or a thread switch per message: a handler thread
takes a run of a lane's messages and publishes a ``Progress`` for it; it advances
``Progress.done`` after each message (a single writer), and the consumer thread takes the jobs
up to it (a single reader). A batch's result is one entry of a deque. Handler latency is counted
on the handler threads.

Contract with the consumer thread:
- ``submit_runs`` appends work; ``take_done`` returns finished work as segments (jobs, Outcome):
  jobs of one lane (or one batch) finished in order with that outcome;
- after an outcome with ``stop`` the runner takes no more work (``failure`` is set);
- ``drop`` forgets queued work of partitions; ``wait_not_running`` waits for their running work;
- ``backing_off`` names the partitions waiting out a retry backoff (their fetching is paused).
"""

from __future__ import annotations

import threading
import time
import traceback
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from supervisor.child.handler import check_returned
from supervisor.contract.inflight_board import BoardWriter
from supervisor.contract.messages import LATENCY_BUCKETS
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


# The outcome of every message whose handler simply returned (one object, not one per message).
STORED = Outcome(store=True)

Segment = tuple[list[Job], Outcome]


@dataclass(slots=True, eq=False)
class Progress:
    """A lane run a handler thread works on. The handler thread publishes ``special`` (outcomes
    other than STORED, by index), then ``done`` (how many jobs finished), then ``over`` (it left
    the run); the consumer thread reads ``over`` before ``done``, ``done`` before ``special``, and
    owns ``taken``. Correct by construction: every field has one writer, each write is a single
    reference assignment, and ``special`` is never changed once published (the handler thread
    publishes a new dict), so the consumer thread never iterates something being changed."""

    jobs: list[Job]
    done: int = 0
    taken: int = 0
    special: dict[int, Outcome] | None = None
    over: bool = False

    def take(self) -> list[Segment]:
        """Consumer thread: the jobs finished since the last call, split at special outcomes."""
        done, start = self.done, self.taken
        if done <= start:
            return []
        self.taken = done
        special = self.special  # a snapshot: published whole, never changed afterwards
        if not special or not any(start <= i < done for i in special):
            return [(self.jobs[start:done], STORED)]
        out: list[Segment] = []
        for i in sorted(i for i in special if start <= i < done):
            if i > start:
                out.append((self.jobs[start:i], STORED))
            out.append(([self.jobs[i]], special[i]))
            start = i + 1
        if start < done:
            out.append((self.jobs[start:done], STORED))
        return out

RUN_MAX = 500            # messages a handler thread takes from a lane at once
RUN_SLICE_S = 0.05       # ... but after this long in one lane it yields to a lane that waits (fairness)
PUBLISH_EVERY = 256      # the consumer thread is woken after this many finished messages ...
PUBLISH_AFTER_S = 0.002  # ... or after this long, whichever comes first


class Execute(Protocol):
    """Runs the handler plus the error policy (the worker gives a ``policies.Executor``)."""

    def __call__(self, jobs: list[Job]) -> Outcome:
        """A batch (or one job) through the handler and the policy."""

    def on_failure(self, jobs: list[Job], exc: BaseException) -> Outcome:
        """The policy's decision after the handler raised ``exc`` on ``jobs``."""

    @property
    def plain(self) -> Callable[[Record], object] | None:
        """The handler, when calling it is all the executor does on success; else None."""


class HandlerRunner:
    def __init__(self, execute: Execute, concurrency: int = 1, order_by: str = "partition",
                 batch_size: int = 1, batch_timeout_s: float = 0.0,
                 board: BoardWriter | None = None,
                 isolate: set[tuple[str, int, int]] | None = None) -> None:
        self._execute = execute
        self.concurrency = concurrency
        self._cond = threading.Condition()
        self._lanes: OrderedDict[Lane, deque[Job]] = OrderedDict()
        self._active: set[Lane] = set()
        # Finished work goes back without the lock (deque appends and pops are atomic), so a
        # message finished just before a long one is visible at once: lane runs as Progress
        # (new ones in _new_runs; the consumer thread keeps the open ones), batches in _done.
        self._new_runs: deque[Progress] = deque()
        self._open_runs: list[Progress] = []
        self._done: deque[Segment] = deque()
        # Handler latency, counted by each handler thread in its own slot: bucket counts, sum.
        self._latency = [[0] * (len(LATENCY_BUCKETS) + 1) for _ in range(concurrency)]
        self._latency_sum = [0.0] * concurrency
        self.retries = 0  # handler attempts that failed and were retried (under the lock)
        self._changes = 0  # bumped by drop/stop/fail: a handler thread then re-checks its lane
        self._queued = 0
        # thread number -> (the job it runs, since: time.perf_counter()); see oldest_running
        self.running: dict[int, tuple[Job, float]] = {}
        self.failure: tuple[Job, Outcome] | None = None
        self.crashed: tuple[str, BaseException, str] | None = None  # (thread, exception, traceback)
        self._stopping = False
        self._held = False  # see hold()
        self._order_by = order_by
        self._batch_size, self._batch_timeout_s = batch_size, batch_timeout_s
        self._batch_origin: list[tuple[Lane, deque[Job], list[Job]]] = []  # batch mode: see _batch_heads
        self._board = board  # each thread writes there what it works on, before the handler runs
        # Batch mode: messages that run alone, in a batch of one (poison and suspects of a death)
        self._isolate = isolate or set()
        self._batch_tps: set[TP] = set()  # partitions of the batch in the handler (under the lock)
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"ksup-handler-{i}", daemon=True)
                         for i in range(concurrency)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    # ---- consumer-thread API ----------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (of any partitions) in their lanes."""
        self.submit_runs([(job.tp, [job]) for job in jobs])

    def submit_runs(self, runs: list[tuple[TP, list[Job]]]) -> None:
        """Queue runs of jobs, each run fetched in a row from one partition."""
        lanes = self._lanes
        with self._cond:
            for tp, jobs in runs:
                if self._order_by == "key":
                    for job in jobs:
                        lanes.setdefault((*tp, job.record.key), deque()).append(job)
                else:
                    lanes.setdefault(tp, deque()).extend(jobs)
                self._queued += len(jobs)
            self._cond.notify_all()

    def backlog_size(self) -> int:
        """Queued, not yet taken by a handler thread (a thread's current run, RUN_MAX at most,
        is not counted)."""
        return self._queued

    def busy(self) -> bool:
        """Work queued or running. Under the lock: a handler thread moves a job from queued to
        running in two steps, both under the lock, so only a locked read sees one or the other."""
        with self._cond:
            return bool(self.running) or self._queued > 0

    def oldest_running(self) -> tuple[Job, float] | None:
        """The job in a handler for the longest, and since when (wall clock, time.time())."""
        running = list(self.running.values())
        if not running:
            return None
        job, since = min(running, key=lambda r: r[1])
        return job, time.time() - (time.perf_counter() - since)

    def take_done(self) -> list[Segment]:
        """Finished work since the last call, in order within each lane."""
        done, new_runs = self._done, self._new_runs
        out = [done.popleft() for _ in range(len(done))]
        open_runs = self._open_runs
        open_runs += [new_runs.popleft() for _ in range(len(new_runs))]
        for run in open_runs:
            out += run.take()
        # A run is closed once its thread left it and all of it was taken (over is read before
        # done: once over is set, done is final).
        self._open_runs = [run for run in open_runs if not (run.over and run.taken >= run.done)]
        return out

    def has_done(self) -> bool:
        return bool(self._done) or bool(self._new_runs) or any(r.done > r.taken for r in self._open_runs)

    def wait_progress(self, timeout: float) -> None:
        """Block up to ``timeout`` until something finished (or return at once if it has)."""
        with self._cond:
            if not self.has_done() and self.busy():
                self._cond.wait(timeout)

    def latency(self) -> tuple[list[int], float]:
        """Handler latency so far: per-bucket counts (LATENCY_BUCKETS, then +Inf) and the sum."""
        return [sum(c) for c in zip(*self._latency, strict=True)], sum(self._latency_sum)

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
            self._changes += 1
        return dropped

    def wait_not_running(self, tps: set[TP] | None, deadline: float) -> bool:
        """Wait until no message of ``tps`` (None: of any partition) is in a handler, or the
        monotonic ``deadline`` passed. True when nothing of theirs is running."""
        with self._cond:
            while True:
                if not any(tps is None or job.tp in tps for job, _ in self.running.values()) \
                        and not (self._batch_tps and (tps is None or self._batch_tps & tps)):
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
            self._changes += 1
            self._cond.notify_all()

    # ---- handler threads ----------------------------------------------------------------------

    def hold(self, on: bool) -> None:
        """Take no new work while ``on`` (the worker is over --max-memory and waits for its
        recycle): the message in a handler finishes, the rest of a thread's run goes back to the
        head of its lane, queued work stays queued (in order, not lost)."""
        with self._cond:
            if self._held != on:
                self._held = on
                self._changes += 1
                self._cond.notify_all()

    def _take(self) -> tuple[Lane, list[Job]] | None:
        """Under the lock: the next ready lane's run of queued messages (``RUN_MAX`` at most), or
        in batch mode one batch from the heads of all lanes; either way taken off the lanes."""
        if self._held:
            return None
        now = time.monotonic()
        for lane, jobs in self._lanes.items():
            if lane in self._active or not jobs or jobs[0].not_before > now:
                continue
            self._lanes.move_to_end(lane)  # round robin: every partition gets its turn
            if self._batch_size > 1:
                return lane, self._batch_heads(now)
            run = [jobs.popleft() for _ in range(min(RUN_MAX, len(jobs)))]
            self._queued -= len(run)
            return lane, run
        return None

    def _batch_heads(self, now: float) -> list[Job]:
        """Batch mode (one handler thread): up to batch_size messages in order from all lanes,
        taken off them (``_batch_origin`` remembers from where, for a retry)."""
        batch: list[Job] = []
        self._batch_origin = []
        for lane, jobs in self._lanes.items():
            room = self._batch_size - len(batch)
            if room <= 0:
                break
            if not jobs or jobs[0].not_before > now:
                continue
            part: list[Job] = []
            while jobs and len(part) < room:
                alone = self._isolate and (*jobs[0].tp, jobs[0].record.offset) in self._isolate
                if alone and (part or batch):
                    room = 0  # it runs in a batch of its own, next time
                    break
                part.append(jobs.popleft())
                if alone:
                    room = 0
                    break
            if part:
                self._batch_origin.append((lane, jobs, part))
                batch += part
        self._queued -= len(batch)
        return batch

    def _next_wait(self) -> float | None:
        waits = [jobs[0].not_before - time.monotonic() for jobs in self._lanes.values() if jobs]
        return max(min(waits), 0.001) if waits else None

    def _run(self, number: int) -> None:
        """A handler thread. The handler's own exceptions go to the policy; anything that escapes
        (a bug in policy code or here) is kept in ``crashed`` for the consumer thread, which
        fails the worker: a dead handler thread must never look like an idle one."""
        try:
            self._serve(number)
        except BaseException as exc:  # noqa: BLE001 - reported, then the worker exits
            self.crashed = (threading.current_thread().name, exc, traceback.format_exc())
            with self._cond:
                self._stopping = True
                self._changes += 1
                self._cond.notify_all()

    def threads_alive(self) -> int:
        """Handler threads that are running or ended normally (after a stop, threads return:
        that is not a death). Only a crash counts against it."""
        if self.crashed is None:
            return len(self._threads)
        return sum(t.is_alive() for t in self._threads)

    def _serve(self, number: int) -> None:
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
                queue = self._lanes[lane]
                self.running[number] = (jobs[0], time.perf_counter())  # busy from here on
            try:
                if self._batch_size > 1:
                    self._run_batch(number, jobs)
                else:
                    self._run_lane(number, lane, queue, jobs)
            finally:
                with cond:
                    self._active.discard(lane)
                    self.running.pop(number, None)
                    cond.notify_all()

    def _run_lane(self, number: int, lane: Lane, queue: deque[Job], jobs: list[Job]) -> None:
        """Run a lane's messages (taken off ``queue``) one by one, in order, without the lock,
        advancing a Progress the consumer thread reads; it is woken every ``PUBLISH_EVERY``
        messages or ``PUBLISH_AFTER_S`` (it also looks on its own every few milliseconds).
        Stops early when the runner stops or the lane was dropped (revoked): the rest of the run
        is dropped with it. A retry puts the message and the rest of the run back at the head of
        the lane."""
        execute, running = self._execute, self.running
        progress = Progress(jobs)
        self._new_runs.append(progress)
        # The handler itself when the executor says a plain call is all it takes (sync, not
        # batch, no poison): one call less per message; a raise still goes to the policy.
        plain = execute.plain
        first = jobs[0].record
        board = self._board.offset_writer(number, first.topic, first.partition, first.offset) \
            if self._board is not None else None
        latency, fastest = self._latency[number], LATENCY_BUCKETS[0]
        clock = time.perf_counter
        published, unannounced, spent = clock(), 0, 0.0
        slice_ends = published + RUN_SLICE_S
        seen = self._changes
        try:
            for i, job in enumerate(jobs):  # for every message: kept lean
                if self._changes != seen:  # a drop, stop or hold happened: does it concern this lane?
                    if self._stopping or self._lanes.get(lane) is not queue:
                        break
                    if self._held:
                        self._retry_later(lane, queue, jobs[i:], 0.0, count=False)
                        break
                    seen = self._changes
                if board is not None:
                    board(job.record.offset)  # before the handler runs: a crash names this message
                t0 = clock()
                running[number] = (job, t0)
                if plain is None:
                    outcome = execute([job])
                else:
                    try:
                        result = plain(job.record)
                        if result is not None:
                            check_returned(result)  # handler.py decides shapes, also on this path
                        outcome = STORED
                    except BaseException as exc:  # noqa: BLE001 - the policy decides
                        outcome = execute.on_failure([job], exc)
                t1 = clock()
                seconds = t1 - t0
                latency[0 if seconds <= fastest else bisect_left(LATENCY_BUCKETS, seconds)] += 1
                spent += seconds
                if outcome is not STORED:
                    if outcome.retry_in is not None and not outcome.stop:
                        self._retry_later(lane, queue, jobs[i:], outcome.retry_in)
                        break
                    # copy, then publish by one assignment (the consumer thread may be reading the old one)
                    progress.special = {**(progress.special or {}), i: outcome}
                    progress.done = i + 1
                    if outcome.stop:
                        with self._cond:
                            self._fail(job, outcome)
                        break
                    continue
                progress.done = i + 1
                unannounced += 1
                if unannounced >= PUBLISH_EVERY or t1 - published >= PUBLISH_AFTER_S:
                    with self._cond:
                        self._cond.notify_all()
                    published, unannounced = t1, 0
                    # Fair under a backlog: a slow handler does not keep one partition for a whole
                    # run while another waits; the rest of the run goes back to the head of its lane.
                    if t1 >= slice_ends and i + 1 < len(jobs):
                        if self._others_waiting(lane):
                            self._retry_later(lane, queue, jobs[i + 1:], 0.0, count=False)
                            break
                        slice_ends = t1 + RUN_SLICE_S
        finally:
            progress.over = True
            self._latency_sum[number] += spent
            if self._board is not None:
                self._board.clear(number)

    def _others_waiting(self, lane: Lane) -> bool:
        """Another lane has work ready and no thread on it."""
        now = time.monotonic()
        with self._cond:
            return any(other != lane and jobs and other not in self._active and jobs[0].not_before <= now
                       for other, jobs in self._lanes.items())

    def _retry_later(self, lane: Lane, queue: deque[Job], jobs: list[Job], delay: float,
                     count: bool = True) -> None:
        """The head job failed and is to be retried (``count``), or the run was held: it and the
        rest of the run go back to the head of the lane (if it still exists), to run again after
        ``delay``."""
        with self._cond:
            if count:
                self.retries += 1
                jobs[0].attempts += 1
            jobs[0].not_before = time.monotonic() + delay
            if self._lanes.get(lane) is queue:  # still ours: back to the head, in order
                queue.extendleft(reversed(jobs))
                self._queued += len(jobs)
            self._cond.notify_all()

    def _run_batch(self, number: int, jobs: list[Job]) -> None:
        """One batch (jobs taken from the heads of lanes) through the handler."""
        if self._board is not None:  # every record of the batch, one board record each
            for i, job in enumerate(jobs):
                self._board.set(i, job.record.topic, job.record.partition, job.record.offset)
        t0 = time.perf_counter()
        with self._cond:
            self._batch_tps = {job.tp for job in jobs}  # a revoke of any of them waits for the batch
        self.running[number] = (jobs[0], t0)
        try:
            outcome = self._execute(jobs)
        finally:
            with self._cond:
                self._batch_tps = set()
                self._cond.notify_all()
        seconds = time.perf_counter() - t0
        self._latency[number][bisect_left(LATENCY_BUCKETS, seconds)] += 1  # per handler call
        self._latency_sum[number] += seconds
        if self._board is not None:
            for i in range(len(jobs)):
                self._board.clear(i)
        with self._cond:
            if outcome.retry_in is not None and not outcome.stop:
                self.retries += 1
                not_before = time.monotonic() + outcome.retry_in
                for lane, queue, part in self._batch_origin:
                    for job in part:
                        job.attempts += 1
                        job.not_before = not_before
                    if self._lanes.get(lane) is queue:  # still ours: back to the head, in order
                        queue.extendleft(reversed(part))
                        self._queued += len(part)
                return
            self._done.append((jobs, outcome))
            if outcome.stop:
                self._fail(jobs[-1], outcome)

    def _fill_wait(self) -> None:
        """Batch mode: give a partial batch up to batch_timeout to fill (lock held, released while waiting)."""
        deadline = time.monotonic() + self._batch_timeout_s
        while not self._stopping and 0 < self._queued < self._batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _fail(self, job: Job, outcome: Outcome) -> None:
        """Under the lock: the policy said stop. Take no more work."""
        self.failure = (job, outcome)
        self._stopping = True
        self._lanes.clear()
        self._queued = 0
        self._changes += 1
