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

What is queued: records as fetched, in ``Chunk``s (the records of one lane fetched in a row in one
assignment of their partition, its ``epoch``), never an object per message: at hundreds of
thousands of messages a second every per-message object and bytecode shows (the plain
confluent-kafka loop ksup is measured against builds none). Retry state (attempts, backoff)
belongs to a chunk's first record, since only the head of a lane is ever retried.

How finished work travels back without a lock or a thread switch per message: a handler thread
takes a run of a lane's records and publishes a ``Progress`` for it; it advances
``Progress.done`` after each message (a single writer), and the consumer thread takes the records
up to it (a single reader). A batch's result is one entry of a deque. Handler latency is counted
on the handler threads.

Contract with the consumer thread:
- ``submit_runs`` appends work; ``take_done`` returns finished work as segments (records, epoch,
  Outcome): records of one partition (one assignment) finished in order with that outcome;
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
from supervisor.contract.inflight_board import BoardWriter, key_of
from supervisor.contract.messages import LATENCY_BUCKETS
from supervisor.record import Record

TP = tuple[str, int]
Lane = tuple[str, int] | tuple[str, int, bytes | None]


@dataclass(slots=True)
class Outcome:
    """How a message (or a batch) ended. ``store``: its offset may be stored. ``stop``: the
    worker must drain. ``retry_in``: run it again after that many seconds (it keeps its lane)."""

    store: bool
    stop: bool = False
    retry_in: float | None = None
    error: BaseException | None = None
    note: str = ""


# The outcome of every message whose handler simply returned (one object, not one per message).
STORED = Outcome(store=True)

# Records of one partition, fetched in one assignment (the epoch), finished in a row with one outcome.
Segment = tuple[list[Record], int, Outcome]


@dataclass(slots=True, eq=False)
class Chunk:
    """Queued records of one lane, in order, fetched in the partition's assignment ``epoch``.
    ``attempts`` (failed handler calls so far) and ``not_before`` (monotonic; a retry waits until
    then) are those of ``records[0]``: only a lane's head is ever retried."""

    records: list[Record]
    epoch: int
    attempts: int = 0
    not_before: float = 0.0


@dataclass(slots=True, eq=False)
class Progress:
    """What a handler thread works on: a lane's run or a batch (``tps``: their partitions).
    For a run, the handler thread publishes ``special`` (outcomes other than STORED, by index),
    then ``since`` (when the next message went in: the end of the last one), then ``done`` (how
    many finished), then ``over`` (it left the run); the consumer thread reads ``over`` before
    ``done``, ``done`` before ``special`` and ``since``, and owns ``taken``. Correct by
    construction: every field has one writer, each write is a single reference assignment, and
    ``special`` is never changed once published (the handler thread publishes a new dict), so the
    consumer thread never iterates something being changed. A batch advances none of them: its
    result goes through the runner's ``_done``."""

    records: list[Record]
    epoch: int
    tps: frozenset[TP]
    since: float = 0.0  # time.perf_counter() when records[done] went into the handler
    done: int = 0
    taken: int = 0
    special: dict[int, Outcome] | None = None
    over: bool = False

    def take(self) -> list[Segment]:
        """Consumer thread: the records finished since the last call, split at special outcomes."""
        done, start = self.done, self.taken
        if done <= start:
            return []
        self.taken = done
        special = self.special  # a snapshot: published whole, never changed afterwards
        records, epoch = self.records, self.epoch
        if not special or not any(start <= i < done for i in special):
            return [(records[start:done], epoch, STORED)]
        out: list[Segment] = []
        for i in sorted(i for i in special if start <= i < done):
            if i > start:
                out.append((records[start:i], epoch, STORED))
            out.append(([records[i]], epoch, special[i]))
            start = i + 1
        if start < done:
            out.append((records[start:done], epoch, STORED))
        return out

    def current(self) -> tuple[Record, float] | None:
        """The record in the handler and since when (perf_counter), if any. ``done`` is read
        before ``since``: ``since`` is written before ``done``, so it is at least as new."""
        done = self.done
        if self.over or done >= len(self.records):
            return None
        return self.records[done], self.since


RUN_MAX = 500            # records a handler thread takes from a lane at once
RUN_SLICE_S = 0.05       # ... but after this long in one lane it yields to a lane that waits (fairness)
PUBLISH_AFTER_S = 0.002  # the consumer thread is woken this often while a run goes on
LOW_WATER = 500          # a handler thread wakes the consumer thread when the backlog falls below this


class Execute(Protocol):
    """Runs the handler plus the error policy (the worker gives a ``policies.Executor``)."""

    @property
    def one(self) -> Callable[[Record], object]:
        """Calls the handler on one record; raises what the handler raised (or a marker the
        policy knows, such as a poison message's); returns what the handler returned."""

    def batch(self, records: list[Record], attempts: int) -> Outcome:
        """A batch through the handler and the policy (``attempts``: failed calls so far)."""

    def on_failure(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome:
        """The policy's decision after ``one`` raised ``exc`` on ``records`` (failed ``attempts``
        times before)."""


class HandlerRunner:
    def __init__(self, execute: Execute, concurrency: int = 1, order_by: str = "partition",
                 batch_size: int = 1, batch_timeout_s: float = 0.0,
                 board: BoardWriter | None = None,
                 isolate: set[tuple[str, int, int]] | None = None) -> None:
        self._execute = execute
        self.concurrency = concurrency
        lock = threading.Lock()
        # One lock, two conditions: handler threads wait for work, the consumer thread for progress.
        self._cond = threading.Condition(lock)
        self._progress = threading.Condition(lock)
        self._lanes: OrderedDict[Lane, deque[Chunk]] = OrderedDict()
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
        self._changes = 0  # bumped by drop/stop/fail/hold: a handler thread then re-checks its lane
        self._queued = 0
        # thread number -> what it works on (under the lock); see oldest_running
        self.running: dict[int, Progress] = {}
        self.failure: tuple[Record, Outcome] | None = None
        self.crashed: tuple[str, BaseException, str] | None = None  # (thread, exception, traceback)
        self._stopping = False
        self._held = False  # see hold()
        self._order_by = order_by
        self._batch_size, self._batch_timeout_s = batch_size, batch_timeout_s
        # Batch mode: where the running batch's records came from, for a retry (see _batch_heads)
        self._batch_origin: list[tuple[Lane, deque[Chunk], Chunk]] = []
        self._board = board  # each thread writes there what it works on, before the handler runs
        # Batch mode: messages that run alone, in a batch of one (poison and suspects of a death)
        self._isolate = isolate or set()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"ksup-handler-{i}", daemon=True)
                         for i in range(concurrency)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    # ---- consumer-thread API ----------------------------------------------------------------

    def submit(self, records: list[Record], epoch: int) -> None:
        """Queue ``records`` (of any partitions, fetched in assignment ``epoch``) in their lanes."""
        runs: dict[TP, list[Record]] = {}
        for r in records:
            runs.setdefault((r.topic, r.partition), []).append(r)
        self.submit_runs([(tp, epoch, rs) for tp, rs in runs.items()])

    def submit_runs(self, runs: list[tuple[TP, int, list[Record]]]) -> None:
        """Queue runs of records, each fetched in a row from one partition in assignment ``epoch``.
        The runner owns the lists from here on."""
        lanes = self._lanes
        with self._cond:
            for tp, epoch, records in runs:
                if self._order_by == "key":
                    by_key: dict[bytes | None, list[Record]] = {}
                    for r in records:
                        by_key.setdefault(r.key, []).append(r)
                    for key, rs in by_key.items():
                        lanes.setdefault((*tp, key), deque()).append(Chunk(rs, epoch))
                else:
                    queue = lanes.get(tp)
                    if queue is None:
                        queue = lanes[tp] = deque()
                    queue.append(Chunk(records, epoch))
                self._queued += len(records)
            self._cond.notify_all()

    def backlog_size(self) -> int:
        """Queued, not yet taken by a handler thread (a thread's current run, RUN_MAX at most,
        is not counted)."""
        return self._queued

    def busy(self) -> bool:
        """Work queued or running. Under the lock: a handler thread moves work from queued to
        running in one step under the lock, so only a locked read sees one or the other."""
        with self._cond:
            return bool(self.running) or self._queued > 0

    def oldest_running(self, tps: set[tuple[str, int]] | None = None) -> tuple[Record, float] | None:
        """The record in a handler for the longest, and since when (wall clock, time.time()),
        among the runs and batches that hold any of partitions ``tps`` (or all). A batch is in
        flight for every partition it holds, not only its first record's: a revoke of any of them
        waits for the whole batch."""
        running = []
        for p in list(self.running.values()):
            if tps is not None and p.tps.isdisjoint(tps):
                continue
            current = p.current()
            if current is None:
                continue
            record, since = current
            if tps is not None and (record.topic, record.partition) not in tps:
                # A batch: it holds those partitions too; name the first of its records of them.
                record = next(r for r in p.records if (r.topic, r.partition) in tps)
            running.append((record, since))
        if not running:
            return None
        record, since = min(running, key=lambda r: r[1])
        return record, time.time() - (time.perf_counter() - since)

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
        """Block up to ``timeout`` until something finished or a handler thread took work while
        the backlog is low (or return at once if something finished)."""
        with self._progress:
            if not self.has_done() and (self.running or self._queued):
                self._progress.wait(timeout)

    def latency(self) -> tuple[list[int], float]:
        """Handler latency so far: per-bucket counts (LATENCY_BUCKETS, then +Inf) and the sum."""
        return [sum(c) for c in zip(*self._latency, strict=True)], sum(self._latency_sum)

    def backing_off(self) -> set[TP]:
        now = time.monotonic()
        with self._cond:
            return {lane[:2] for lane, queue in self._lanes.items() if queue and queue[0].not_before > now}

    def queued_by_partition(self) -> dict[TP, int]:
        """Messages of each partition in the backlog: queued, or in a handler thread's run or
        batch and not finished yet (fair_fetch.py: a partition served by a thread is not
        starving). Only partitions with any."""
        counts: dict[TP, int] = {}
        with self._cond:
            for lane, queue in self._lanes.items():
                n = sum(len(c.records) for c in queue)
                if n:
                    tp = lane[:2]
                    counts[tp] = counts.get(tp, 0) + n
            for p in self.running.values():
                if len(p.tps) == 1:  # a lane's run (or a batch of one partition)
                    (tp,) = p.tps
                    if len(p.records) > p.done:
                        counts[tp] = counts.get(tp, 0) + len(p.records) - p.done
                    continue
                for r in p.records:  # a batch: done stays 0 until it ends
                    tp = (r.topic, r.partition)
                    counts[tp] = counts.get(tp, 0) + 1
        return counts

    def drop(self, tps: set[TP]) -> int:
        """Forget queued work of these partitions; returns how many messages were dropped."""
        with self._cond:
            dropped = 0
            for lane in [lane for lane in self._lanes if lane[:2] in tps]:
                dropped += sum(len(c.records) for c in self._lanes.pop(lane))
            self._queued -= dropped
            self._changes += 1
        return dropped

    def wait_not_running(self, tps: set[TP] | None, deadline: float) -> bool:
        """Wait until no message of ``tps`` (None: of any partition) is in a handler, or the
        monotonic ``deadline`` passed. True when nothing of theirs is running."""
        with self._progress:
            while True:
                if not any(tps is None or p.tps & tps for p in self.running.values()):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(min(left, 0.1))

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

    def _take(self) -> tuple[Lane, deque[Chunk], Chunk] | None:
        """Under the lock: the next ready lane's run of queued records (``RUN_MAX`` at most, one
        assignment), or in batch mode one batch from the heads of all lanes; either way taken off
        the lanes. The run comes as a Chunk (its head's retry state with it)."""
        if self._held:
            return None
        now = time.monotonic()
        for lane, queue in self._lanes.items():
            if lane in self._active or not queue or queue[0].not_before > now:
                continue
            self._lanes.move_to_end(lane)  # round robin: every partition gets its turn
            if self._batch_size > 1:
                batch = self._batch_heads(now)
                return lane, queue, batch
            run = self._run_from(queue)
            self._queued -= len(run.records)
            if self._queued < LOW_WATER:
                self._progress.notify_all()  # the consumer thread may fetch more
            return lane, queue, run
        return None

    @staticmethod
    def _run_from(queue: deque[Chunk]) -> Chunk:
        """Off the head of a lane: up to RUN_MAX records of one assignment, as one Chunk (whole
        chunks when they fit; records are copied only when chunks are joined or split)."""
        head = queue.popleft()
        records = head.records
        if len(records) > RUN_MAX:
            queue.appendleft(Chunk(records[RUN_MAX:], head.epoch))  # its head was never tried
            return Chunk(records[:RUN_MAX], head.epoch, head.attempts, head.not_before)
        joined = False
        while queue and len(records) < RUN_MAX and queue[0].epoch == head.epoch and not queue[0].attempts:
            nxt = queue.popleft()
            room = RUN_MAX - len(records)
            if not joined:
                records, joined = list(records), True
            if len(nxt.records) > room:
                records += nxt.records[:room]
                queue.appendleft(Chunk(nxt.records[room:], nxt.epoch))
                break
            records += nxt.records
        if joined:
            return Chunk(records, head.epoch, head.attempts, head.not_before)
        return head

    def _batch_heads(self, now: float) -> Chunk:
        """Batch mode (one handler thread): up to batch_size records in order from all lanes,
        taken off them (``_batch_origin`` remembers from where, for a retry). The returned
        Chunk's epoch is unused: each origin piece has its own."""
        batch: list[Record] = []
        self._batch_origin = []
        isolate = self._isolate
        attempts: int | None = None  # of the batch's first piece: every piece has the same
        for lane, queue in self._lanes.items():
            room = self._batch_size - len(batch)
            if room <= 0:
                break
            while queue and room > 0 and queue[0].not_before <= now:
                head = queue[0]
                # A batch is retried as a whole, with one count of failed attempts: a piece that
                # failed a different number of times waits for a batch of its own kind (else it
                # would run past --retry-attempts, or be given up before it).
                if attempts is not None and head.attempts != attempts:
                    break
                attempts = head.attempts
                records = head.records
                take = min(room, len(records))
                if isolate:  # a poison message or a suspect runs in a batch of its own
                    for i in range(take):
                        if key_of(records[i]) in isolate:
                            take = i if i or batch else 1
                            room = take  # nothing after it
                            break
                    if take == 0:
                        room = 0
                        break
                queue.popleft()
                if take < len(records):
                    # The rest keeps the head's attempts: a retried chunk failed whole, so its rest
                    # did too (0 would let it run past --retry-attempts).
                    queue.appendleft(Chunk(records[take:], head.epoch, head.attempts, head.not_before))
                    piece = Chunk(records[:take], head.epoch, head.attempts, head.not_before)
                else:
                    piece = head
                self._batch_origin.append((lane, queue, piece))
                batch += piece.records
                room -= take
            if room <= 0:
                break
        self._queued -= len(batch)
        return Chunk(batch, -1, self._batch_origin[0][2].attempts if self._batch_origin else 0)

    def _next_wait(self) -> float | None:
        """Under the lock: how long an idle handler thread sleeps. Until the earliest retry
        backoff of a lane it could take; until notified (None) when held, or when every lane with
        work runs on another thread: a release, a run's end and new work all notify."""
        if self._held:
            return None
        now = time.monotonic()
        waits = [queue[0].not_before - now for lane, queue in self._lanes.items() if queue and lane not in self._active]
        return max(min(waits), 0.001) if waits else None

    def _run(self, number: int) -> None:
        """A handler thread. The handler's own exceptions go to the policy; anything that escapes
        (a bug in policy code or here) is kept in ``crashed`` for the consumer thread, which
        fails the worker: a dead handler thread must never look like an idle one."""
        try:
            self._serve(number)
        except BaseException as exc:  # noqa: BLE001 - reported, then the worker exits
            self._note_crash(exc)

    def _note_crash(self, exc: BaseException) -> None:
        """Record a handler thread's death and stop taking work. Called before the dead thread's
        work leaves ``running``: whoever sees nothing running (a drain's wait) must also see the
        crash, or a dead thread looks like an idle one. The first crash recorded is kept."""
        if self.crashed is None:
            self.crashed = (threading.current_thread().name, exc, traceback.format_exc())
        with self._cond:
            self._stopping = True
            self._changes += 1
            self._cond.notify_all()
            self._progress.notify_all()

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
                lane, queue, run = taken
                self._active.add(lane)
                if self._batch_size > 1:
                    tps = frozenset((p.records[0].topic, p.records[0].partition) for _, _, p in self._batch_origin)
                else:
                    first = run.records[0]
                    tps = frozenset(((first.topic, first.partition),))
                progress = Progress(run.records, run.epoch, tps, time.perf_counter())
                self.running[number] = progress  # busy from here on; a revoke of tps waits for it
                # Read with the run taken, under the lock: a drop between here and the lane's
                # first check must count as a change, or the whole run of a revoked partition runs.
                seen = self._changes
            try:
                if self._batch_size > 1:
                    self._run_batch(number, progress, run.attempts)
                else:
                    self._run_lane(number, lane, queue, progress, run.attempts, seen)
            except BaseException as exc:
                self._note_crash(exc)  # before the finally below: it frees this thread's entry
                raise
            finally:
                with cond:
                    self._active.discard(lane)
                    self._forget_if_empty(lane, queue)
                    for other, other_queue, _ in self._batch_origin if self._batch_size > 1 else ():
                        self._forget_if_empty(other, other_queue)
                    self.running.pop(number, None)
                    cond.notify_all()
                    self._progress.notify_all()

    def _run_lane(self, number: int, lane: Lane, queue: deque[Chunk], progress: Progress,
                  attempts: int, seen: int) -> None:
        """Run a lane's records (taken off ``queue``) one by one, in order, without the lock,
        advancing ``progress`` for the consumer thread, which is woken every ``PUBLISH_AFTER_S``
        (it also looks on its own every few milliseconds). Stops early when the runner stops or
        the lane was dropped (revoked): the rest of the run is dropped with it. A retry puts the
        record and the rest of the run back at the head of the lane. ``attempts``: failed calls
        so far of the run's first record; ``seen``: the change count when the run was taken.

        This loop runs for every message, so it does only what it must: the board write (a
        crash names this message), the handler call, one clock read (a message's latency runs
        from the end of the one before: the loop's own overhead, well under a microsecond, is
        counted with it), the latency bucket (the fastest is counted at the end), and the two
        published fields."""
        self._new_runs.append(progress)
        one = self._execute.one
        records, epoch = progress.records, progress.epoch
        first = records[0]
        board = self._board.offset_cell(number, first.topic, first.partition, first.offset) \
            if self._board is not None else [0]
        latency, fastest = self._latency[number], LATENCY_BUCKETS[0]
        clock = time.perf_counter
        t = started = progress.since
        check_at, slice_ends = t + PUBLISH_AFTER_S, t + RUN_SLICE_S
        counted = 0  # handler calls whose latency went into a bucket already
        calls = 0    # handler calls that did not advance done (a retry)
        try:
            # ``done`` counts from 1: it is what gets published after the message (no addition).
            for done, record in enumerate(records, 1):  # for every message: kept lean
                if self._changes != seen:  # a drop, stop or hold happened: does it concern this lane?
                    if self._stopping or self._lanes.get(lane) is not queue:
                        break
                    if self._held:
                        self._put_back(lane, queue, Chunk(records[done - 1:], epoch, attempts if done == 1 else 0))
                        break
                    seen = self._changes
                # Before the handler runs, so a crash names this message. record[2] is its offset
                # (indexing a tuple is cheaper than the named field's descriptor).
                board[0] = record[2]
                try:
                    result = one(record)
                    if result is not None:
                        check_returned(result)  # handler.py decides shapes, also on this path
                except BaseException as exc:  # noqa: BLE001 - the policy decides
                    tried = attempts if done == 1 else 0
                    outcome = self._execute.on_failure([record], tried, exc)
                    t1 = clock()
                    latency[bisect_left(LATENCY_BUCKETS, t1 - t)] += 1
                    counted += 1
                    if outcome.retry_in is not None and not outcome.stop:
                        calls = 1
                        with self._cond:
                            self.retries += 1
                        self._put_back(lane, queue, Chunk(records[done - 1:], epoch, tried + 1,
                                                          time.monotonic() + outcome.retry_in))
                        t = t1
                        break
                    # copy, then publish by one assignment (the consumer thread may be reading the old one)
                    progress.special = {**(progress.special or {}), done - 1: outcome}
                    t = progress.since = t1
                    progress.done = done
                    if outcome.stop:
                        with self._cond:
                            self._fail(record, outcome)
                        break
                    continue
                t1 = clock()
                if t1 - t > fastest:
                    latency[bisect_left(LATENCY_BUCKETS, t1 - t)] += 1
                    counted += 1
                t = progress.since = t1
                progress.done = done
                if t1 >= check_at:
                    check_at = t1 + PUBLISH_AFTER_S
                    with self._cond:
                        self._progress.notify_all()
                    # Fair under a backlog: a slow handler does not keep one partition for a whole
                    # run while another waits; the rest of the run goes back to the head of its lane.
                    if t1 >= slice_ends and done < len(records):
                        if self._others_waiting(lane):
                            self._put_back(lane, queue, Chunk(records[done:], epoch))
                            break
                        slice_ends = t1 + RUN_SLICE_S
        finally:
            progress.over = True
            latency[0] += progress.done + calls - counted
            self._latency_sum[number] += t - started
            if self._board is not None:
                self._board.clear(number)

    def _forget_if_empty(self, lane: Lane, queue: deque[Chunk]) -> None:
        """Under the lock: a key's lane (``--order-by key``) that ran empty goes, or the lanes
        would grow with every key ever seen, and every scan of them with it (hostile review:
        unique keys took a worker from 2,300 to under 100 messages a second). A partition's lane
        stays: there are as many as partitions owned, and a revoke drops them."""
        if len(lane) == 3 and not queue and lane not in self._active and self._lanes.get(lane) is queue:
            del self._lanes[lane]

    def _others_waiting(self, lane: Lane) -> bool:
        """Another lane has work ready and no thread on it."""
        now = time.monotonic()
        with self._cond:
            return any(other != lane and queue and other not in self._active and queue[0].not_before <= now
                       for other, queue in self._lanes.items())

    def _put_back(self, lane: Lane, queue: deque[Chunk], chunk: Chunk) -> None:
        """Records of a run not done (a retry, a hold, a fair yield) go back to the head of their
        lane, if it still exists, in order."""
        with self._cond:
            if self._lanes.get(lane) is queue:  # still ours: back to the head, in order
                queue.appendleft(chunk)
                self._queued += len(chunk.records)
            self._cond.notify_all()

    def _run_batch(self, number: int, progress: Progress, attempts: int) -> None:
        """One batch (records taken from the heads of lanes) through the handler."""
        records = progress.records
        board = self._board
        # Every record of the batch is on the board (a run of consecutive offsets as one range).
        on_board = board.set_batch([piece.records for _, _, piece in self._batch_origin]) if board else 0
        t0 = progress.since
        try:
            outcome = self._execute.batch(records, attempts)
        finally:
            seconds = time.perf_counter() - t0
            self._latency[number][bisect_left(LATENCY_BUCKETS, seconds)] += 1  # per handler call
            self._latency_sum[number] += seconds
            if board is not None:
                board.clear_many(on_board)
        with self._cond:
            if outcome.retry_in is not None and not outcome.stop:
                self.retries += 1
                not_before = time.monotonic() + outcome.retry_in
                for lane, queue, piece in reversed(self._batch_origin):
                    if self._lanes.get(lane) is queue:  # still ours: back to the head, in order
                        queue.appendleft(Chunk(piece.records, piece.epoch, piece.attempts + 1, not_before))
                        self._queued += len(piece.records)
                return
            for _, _, piece in self._batch_origin:
                self._done.append((piece.records, piece.epoch, outcome))
            if outcome.stop:
                self._fail(records[-1], outcome)

    def _fill_wait(self) -> None:
        """Batch mode: give a partial batch up to batch_timeout to fill (lock held, released while waiting)."""
        deadline = time.monotonic() + self._batch_timeout_s
        while not self._stopping and 0 < self._queued < self._batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _fail(self, record: Record, outcome: Outcome) -> None:
        """Under the lock: the policy said stop. Take no more work."""
        self.failure = (record, outcome)
        self._stopping = True
        self._lanes.clear()
        self._queued = 0
        self._changes += 1
        self._progress.notify_all()
