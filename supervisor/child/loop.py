"""ConsumerLoop: the worker's consumer thread (child side). Start reading at ``run``.

This thread owns every call on the Consumer. It fetches messages into the HandlerRunner's
backlog, stores the offsets of finished messages (never of unfinished ones), serves rebalance
callbacks, reports to the supervisor, and on a drain request runs the drain sequence in
``drain.py``. Poll timeouts are short, so a drain request is noticed within a fraction of a
second, and the consumer is served at least every ``SERVE_INTERVAL_S`` even while a slow
handler runs, so ``max.poll.interval.ms`` never expires because of ksup.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from itertools import groupby, repeat
from operator import itemgetter
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from supervisor.child import fair_fetch
from supervisor.child.fair_fetch import FairFetch, messages_wait, wanted_paused
from supervisor.child.kafka_problems import IDENTITY_EXITS, KafkaProblems, classify
from supervisor.child.leave_barrier import LeaveBarrier
from supervisor.child.offsets import TP, OffsetBook, tp_name
from supervisor.child.reporter import Reporter
from supervisor.child.runner import STORED, HandlerRunner, Outcome
from supervisor.contract import messages as m
from supervisor.contract.channel import Channel
from supervisor.contract.exitcodes import WorkerExit
from supervisor.record import Record

log = logging.getLogger("ksup.worker")

ORPHANED = "supervisor died (orphaned)"  # outside_stop's reason when the supervisor is gone
MEMORY_CHECK_S = 0.02   # how often the worker reads its own RSS when --max-memory is set
POLL_TIMEOUT_S = 0.1     # how long an idle worker blocks in poll(): bounds drain-notice latency
SERVE_INTERVAL_S = 0.5   # the longest the consumer goes unserved while the handler is busy
CHANNEL_CHECK_S = 0.05   # how often the supervisor's pipe is read
FETCH_BATCH = 500        # messages taken from librdkafka's queue per call
MAX_BACKLOG = 1000       # fetched, not yet handled; beyond it only callbacks are served (but
                         # see fair_fetch.py: a partition that starves may bring it to 2x)
FAIR_FETCH = os.environ.get("KSUP_FAIR_FETCH") != "0"  # off: for comparing (benchmarks), and a way out


# Message accessors as plain functions, to map over a whole fetch (the loops then run in C).
_error, _topic, _partition, _offset, _key, _value, _headers, _timestamp = (
    Message.error, Message.topic, Message.partition, Message.offset, Message.key, Message.value,
    Message.headers, Message.timestamp)
# tuple.__new__: NamedTuple's own __new__ is a Python function, a frame per record. Mapped with
# repeat(Record) rather than through a functools.partial: 0.1 us a record less (0.87 -> 0.77 us
# for the whole conversion, 500-message fetches, /tmp microbenchmark on this machine).
_new_tuple = tuple.__new__
_record_offset = itemgetter(2)


def to_records(msgs: list[Any], topics: list[str], partitions: list[int]) -> list[Record]:
    """Records from confluent-kafka Messages without an error (so no field is None but the
    headers, which become a tuple), with the messages' topics and partitions already read. Built
    field by field over the whole fetch: this runs for every message."""
    n = len(msgs)
    headers: Any = list(map(_headers, msgs))
    # No headers (None): the one empty tuple for all. A fresh empty list each (as before) cost
    # ~14% of batch mode's CPU per message: it is an allocation, and it keeps every Record
    # tracked by the garbage collector, which walks the whole backlog on each collection
    # (a Record of immutable fields only is untracked at its first collection).
    headers = repeat((), n) if headers.count(None) == n else [() if h is None else tuple(h) for h in headers]
    return list(map(_new_tuple, repeat(Record, n),
                    zip(topics, partitions, map(_offset, msgs), map(_key, msgs), map(_value, msgs), headers,
                        map(_timestamp, msgs), strict=True)))


class ConsumerLoop:
    def __init__(self, consumer: Consumer, runner: HandlerRunner, channel: Channel,
                 topics: list[str], options: dict[str, Any],
                 outside_stop: Callable[[], str | None] = lambda: None, lifecycle: Any = None) -> None:
        self.consumer = consumer
        self.runner = runner
        self.channel = channel
        self.topics = topics
        self.revoke_timeout_s = float(options.get("revoke_timeout_s", 10.0))
        # One lane per partition (not per key): messages of a partition finish in fetch order.
        self.book = OffsetBook(in_order=options.get("order_by", "partition") != "key")
        self.reporter = Reporter(channel, float(options.get("report_interval_s", 1.0)))
        self.state = "joining"
        self.stop_reason: str | None = None
        self.exit_code = WorkerExit.OK
        self.crash_logged = False  # a handler thread's death is logged (with its traceback) once
        self.drain_timeout_s = float(options.get("graceful_timeout_s", 30.0))
        self.exit_within_s = float(options.get("exit_within_s", self.drain_timeout_s + 5.0))
        self.max_memory = int(options.get("max_memory_bytes", 0) or 0)
        self.handler_timeout_s = float(options.get("handler_timeout_s", 0) or 0)
        self.slot_above_configured = False  # set by main: see there
        self.over_memory = False
        self._last_memory_check = 0.0
        # Partitions that left (revoked or lost) with a stored offset the broker had not confirmed,
        # and that offset: finished work to be redelivered, unless a later commit result confirms it.
        self.released_unconfirmed: dict[TP, int] = {}
        # Those of them revoked (not lost): librdkafka's own commit at the unassign may still
        # confirm them; until its result (or a failure) arrives, a drain's final commit waits.
        self.awaiting_commit: set[TP] = set()
        self.exit_by: float | None = None  # monotonic: the whole drain ends by then (set by request_drain)
        self.revocations = 0
        self.skipped = self.dead_lettered = self.assignments = 0
        self.counts: dict[TP, list[int]] = {}  # partition -> [processed, failed]
        self.high_watermarks: dict[str, int] = {}
        # Under read_committed a partition ends at its last stable offset (an open transaction
        # holds it below the high watermark): from librdkafka's statistics, for fairness.
        self.stable_offsets: dict[TP, int] = {}
        # Partitions this loop paused (a retry backoff, fairness: fair_fetch.py); the drain
        # pauses every partition itself.
        self.paused: set[TP] = set()
        self.fair = FairFetch(MAX_BACKLOG)
        self._last_pause_check = 0.0
        self._rate_marks: deque[tuple[float, int]] = deque()  # (when, processed) while busy: backlog_work_s
        self.lifecycle = lifecycle  # the handler's optional on_assign / on_revoke
        self.commit_results = 0  # how many commit results (callbacks) have arrived
        self.commit_on_revoke = True  # off once the final commit failed (the group is stuck)
        self.leave_now = False  # the supervisor's Leave arrived
        self.leave_group = False  # ... asking to leave the group for good (scale down)
        self.join_done = False  # the group answered this member's join (a rebalance callback)
        self.gave_up_in_flight = False  # the drain deadline passed with the handler still running
        self._last_poll = 0.0
        self._last_channel_check = 0.0
        # Asks the process level (SIGTERM flag, orphan check) whether to stop.
        self.outside_stop = outside_stop
        # Kafka's view of the group (librdkafka statistics) and this member's last rebalance
        # callback, for the supervisor's readiness rule; standing Kafka problems, for health.
        self.group_state = self.join_state = ""
        self.group_seen_at = self.rebalanced_at = 0.0
        self.empty_target_at = 0.0  # KIP-848: the broker's heartbeat said "no partitions for you"
        self.problems = KafkaProblems(float(options.get("problem_after_s", 60.0)))
        self.leave_barrier: LeaveBarrier | None = None  # orphans release each other (main sets it)
        self.instance_id = str(options.get("instance_id", ""))
        self.group = str(options.get("group", ""))
        self.kafka_conf: dict[str, str] = {}  # the worker's librdkafka properties (names a refused login)

    # ---- requests from outside ----------------------------------------------------------------

    def request_drain(self, reason: str, timeout_s: float | None = None,
                      code: WorkerExit = WorkerExit.OK, deadline_s: float | None = None) -> None:
        """Idempotent: the first reason and code win, but a failure that comes during a drain
        begun for a clean reason (a handler raised, a handler thread died, a fatal Kafka error
        after a SIGTERM) gives the drain its code and joins the reason: that drain did not end
        cleanly, and exit 0 would say it did. A later, shorter timeout or deadline wins.
        ``deadline_s``: the whole drain must be over by then (the supervisor's SIGKILL)."""
        if timeout_s is not None:
            self.drain_timeout_s = min(self.drain_timeout_s, timeout_s)
        exit_by = time.monotonic() + (deadline_s if deadline_s is not None else self.exit_within_s)
        self.exit_by = exit_by if self.exit_by is None else min(self.exit_by, exit_by)
        if self.stop_reason is None:
            self.stop_reason, self.exit_code = reason, code
            log.info("drain requested: %s", reason)
        elif code != WorkerExit.OK and self.exit_code == WorkerExit.OK:
            self.stop_reason, self.exit_code = f"{self.stop_reason}, then {reason}", code
            log.warning("while draining: %s (exit %d)", reason, int(code))

    def check_supervisor(self, now: float) -> None:
        reason = self.outside_stop()
        if reason is not None:
            self.request_drain(reason)
            if reason == ORPHANED and self.slot_above_configured:
                self.leave_group = True
        if now - self._last_channel_check < CHANNEL_CHECK_S:
            return
        self._last_channel_check = now
        for msg in self.channel.read_available():
            if isinstance(msg, m.Drain):
                self.request_drain(msg.reason, msg.timeout_s, deadline_s=msg.deadline_s)
                self.leave_group = self.leave_group or msg.leave_group
            elif isinstance(msg, m.Leave):
                self.leave_now = True
                self.leave_group = self.leave_group or msg.leave_group
        if self.channel.closed:
            self.request_drain("supervisor gone (pipe closed)")

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> WorkerExit:
        """Consume until a drain is requested, then drain. Returns the worker's exit code."""
        from supervisor.child.drain import drain  # the drain sequence has its own module

        self.consumer.subscribe(self.topics, on_assign=self.on_assign,
                                on_revoke=self.on_revoke, on_lost=self.on_lost)
        self.send_report(force=True)
        while self.stop_reason is None:
            self.step(time.monotonic())
        return drain(self)

    def step(self, now: float) -> None:
        """One round: read the supervisor, store finished offsets, fetch or serve, report."""
        self.check_supervisor(now)
        self.collect()
        if self.runner.crashed is not None:
            self.on_handler_thread_crashed()
        if self.max_memory and now - self._last_memory_check >= MEMORY_CHECK_S:
            self._last_memory_check = now
            self.check_memory()
        if self.stop_reason is not None:
            return
        busy = self.runner.busy()
        backlog = self.runner.backlog_size()
        if backlog < MAX_BACKLOG:
            self.fetch(0.0 if busy else POLL_TIMEOUT_S, FETCH_BATCH)
        elif not self.over_memory and (overflow := self.fair.overflow_limit(len(self.book.owned), backlog)):
            # A partition starves behind a full backlog and those filling it are paused: what
            # librdkafka hands over now is the starving partitions' (fair_fetch.py). Looked at
            # again next round: who starves now, who holds a share.
            self.fetch(0.0, overflow)
            self.fair.starving.clear()
            self._last_pause_check = 0.0
        elif now - self._last_poll >= SERVE_INTERVAL_S:
            # A full backlog: only serving the consumer (max.poll.interval.ms), so one message at
            # most, or every serve would add a whole fetch to what a stuck handler holds.
            self.fetch(0.0, 1)
        if busy:
            self.runner.wait_progress(0.02)
        self.send_report()

    def fetch(self, timeout: float, limit: int) -> None:
        """Take what librdkafka holds (``limit`` messages at most) into the runner. With a
        ``timeout`` (an idle worker) it first waits for one message in poll(), which returns as
        soon as one arrives and notices signals; consume() would wait its whole timeout for a
        full batch."""
        consumer = self.consumer
        if timeout > 0:
            first = consumer.poll(timeout)
            self._last_poll = time.monotonic()
            if first is None:
                return
            msgs = [first]
            if limit > 1:
                msgs += consumer.consume(num_messages=limit - 1, timeout=0)
        else:
            msgs = consumer.consume(num_messages=limit, timeout=0)
            self._last_poll = time.monotonic()
            if not msgs:
                return
        if any(map(_error, msgs)):
            msgs = self.without_errors(msgs)
            if not msgs:
                return
        # Everything below runs over the whole fetch at once (no Python loop per message).
        n = len(msgs)
        topics: list[Any] = list(map(_topic, msgs))  # never None: these messages have no error
        partitions: list[Any] = list(map(_partition, msgs))
        records = to_records(msgs, topics, partitions)
        if partitions.count(partitions[0]) == n and topics.count(topics[0]) == n:
            runs = [((topics[0], partitions[0]), records)]  # the common case: one partition
        else:
            runs, start = [], 0
            for tp, same in groupby(zip(topics, partitions, strict=True)):
                count = len(list(same))
                runs.append((tp, records[start:start + count]))
                start += count
        owned, track = self.book.owned, not self.book.in_order
        queued: list[tuple[TP, int, list[Record]]] = []
        for tp, run in runs:
            part = owned.get(tp)
            if part is None:
                continue  # not ours (any more): never handled, never stored
            if track:
                part.pending.extend(map(_record_offset, run))  # fetched, not finished: the book's "track"
            queued.append((tp, part.epoch, run))
        if queued:
            self.runner.submit_runs(queued)

    def without_errors(self, msgs: list[Any]) -> list[Any]:
        """The messages without an error; each error goes to on_consumer_error, in order."""
        good = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                good.append(msg)
            else:
                self.on_consumer_error(err)
        return good

    def serve(self, seconds: float) -> None:
        """Keep the consumer served (callbacks, heartbeats) without taking new work: during a
        drain, anything returned was never handed to the handler and is never stored."""
        end = time.monotonic() + seconds
        while True:
            msg = self.consumer.poll(min(0.1, max(0.0, end - time.monotonic())))
            if msg is not None and msg.error():
                self.on_consumer_error(msg.error())
            if time.monotonic() >= end:
                return

    def on_consumer_error(self, err: Any) -> None:
        self.problems.on_error(err)
        fatal = classify(err, self.instance_id, self.group, self.kafka_conf)
        if fatal is not None and fatal.code == self.exit_code:
            log.debug("again: %s", err.str())  # librdkafka retries: one line for the cause is enough
            return
        if fatal is not None:
            # Fenced or otherwise fatal: the consumer is unusable (every later call fails), so
            # the worker gives up at once and processes nothing more (drain.py's give_up).
            log.error("%s", fatal.reason)
            self.request_drain(fatal.reason, timeout_s=0.0, code=fatal.code)
            if fatal.code in IDENTITY_EXITS and self.exit_code not in IDENTITY_EXITS:
                # Fenced while already draining: the drain's commit can never succeed now.
                self.stop_reason, self.exit_code = fatal.reason, fatal.code
        elif err.code() == KafkaError._MAX_POLL_EXCEEDED:
            log.warning("max.poll.interval.ms exceeded; partitions will be lost and re-read")
        else:
            log.warning("consumer error: %s", err.str())

    # ---- offsets --------------------------------------------------------------------------------

    def collect(self) -> None:
        """Move finished work into the OffsetBook and store what may be stored."""
        in_order = self.book.in_order
        for records, epoch, outcome in self.runner.take_done():  # segments: one partition each
            if outcome is not STORED:
                if not outcome.store:
                    for rec in records:
                        self.tally((rec.topic, rec.partition))[1] += 1
                        self.on_handler_failed(rec, outcome)
                    continue
                self.skipped += len(records) * (outcome.note == "skipped")
                self.dead_lettered += len(records) * (outcome.note == "dead-lettered")
            first = records[0]
            # In order, the book only needs the last offset.
            offsets = [records[-1].offset] if in_order else list(map(_record_offset, records))
            self.mark_done((first.topic, first.partition, epoch), offsets, len(records))
        self.store_dirty()
        self.update_pauses()

    @property
    def processed(self) -> int:
        return sum(c[0] for c in self.counts.values())

    @property
    def failed(self) -> int:
        return sum(c[1] for c in self.counts.values())

    def tally(self, tp: TP) -> list[int]:
        """The partition's [processed, failed] counts, for the supervisor's metrics."""
        counts = self.counts.get(tp)
        if counts is None:
            counts = self.counts[tp] = [0, 0]
        return counts

    def mark_done(self, key: tuple[str, int, int] | None, offsets: list[int], count: int | None = None) -> None:
        """Offsets of one partition finished in a row, fetched in assignment ``key[2]``
        (``count`` messages: more than ``offsets`` when the book is in order and only the last
        offset is given)."""
        if key is None or not offsets:
            return
        topic, partition, epoch = key
        count = len(offsets) if count is None else count
        self.tally((topic, partition))[0] += count
        if not self.book.mark_done((topic, partition), offsets, epoch):
            log.info("finished %s[%d]@%s after its partition was revoked: not stored (the new owner "
                     "handles them again)", topic, partition, ",".join(map(str, offsets[:5])))

    def check_memory(self) -> None:
        """Above --max-memory the worker takes no new messages (a leaking handler stops growing)
        and says so at once; the supervisor recycles it. Reading /proc/self/statm costs a few
        microseconds, so this runs every MEMORY_CHECK_S instead of once per report."""
        over = rss_bytes() > self.max_memory
        if over != self.over_memory:
            self.over_memory = over
            self.runner.hold(over)
            if over:
                log.warning("RSS over --max-memory (%d MiB): taking no new messages until the recycle",
                            self.max_memory >> 20)
            self.send_report(force=True)

    def on_handler_thread_crashed(self) -> None:
        """A handler thread died of an exception outside the handler: finished work is still
        stored and committed by the drain; what that thread held is not (redelivered)."""
        assert self.runner.crashed is not None
        thread, exc, text = self.runner.crashed
        if not self.crash_logged:  # once: the loop and the drain look again each round
            self.crash_logged = True
            log.error("handler thread %s died of %s outside the handler (a bug in the error policy or "
                      "in ksup); the worker stops:\n%s", thread, type(exc).__name__, text.rstrip())
        self.request_drain(f"handler thread {thread} died of {type(exc).__name__}: {exc!r}",
                           code=WorkerExit.HANDLER_CRASHED)

    def on_handler_failed(self, rec: Record, outcome: Outcome) -> None:
        error = outcome.error
        log.error("handler raised %s on %s: %s; offset not stored, worker stops",
                  type(error).__name__, rec.coordinates, error,
                  exc_info=(type(error), error, error.__traceback__) if error else None,
                  extra={"topic": rec.topic, "partition": rec.partition, "offset": rec.offset})
        self.request_drain(f"handler raised {type(error).__name__} on {rec.coordinates}",
                           code=WorkerExit.HANDLER_FAILED)

    def on_error(self, err: Any) -> None:
        """librdkafka's error_cb (served on this thread): mostly transient connection trouble,
        which librdkafka retries by itself; noted for health, fatal ones end the worker."""
        log.debug("Kafka error: %s", err.str())
        self.on_consumer_error(err)

    def on_empty_target(self) -> None:
        """KIP-848: the broker's heartbeat gave this member no partitions. No callback comes for
        that, so this counts as the (empty) assignment, for readiness."""
        if self.book.owned:
            return
        self.join_done = True
        self.empty_target_at = time.time()
        if self.state == "joining":
            self.state = "assigned"
            log.info("assigned nothing (the group has no partition for this member)")
            self.send_report(force=True)

    def on_stats(self, stats_json: str) -> None:
        """librdkafka's statistics (every statistics.interval.ms): keep each owned partition's high
        watermark, so the supervisor can show lag without asking the broker itself; the group's
        state as this member sees it (readiness); whether any broker answers (health)."""
        try:
            stats = json.loads(stats_json)
            cgrp = stats.get("cgrp") or {}
            self.group_state, self.join_state = str(cgrp.get("state", "")), str(cgrp.get("join_state", ""))
            if self.join_state == "init" and not cgrp.get("assignment_size") and not self.book.owned \
                    and self.empty_target_at > self.rebalanced_at:
                # KIP-848 keeps a member without partitions in "init"; its heartbeat confirmed
                # the empty assignment after the last callback, so it is as settled as it gets.
                self.join_state = "steady"
            self.group_seen_at = time.time()
            self.problems.on_stats(stats)
            for topic, t in stats.get("topics", {}).items():
                for pid, p in t.get("partitions", {}).items():
                    tp = (topic, int(pid))
                    if pid == "-1" or tp not in self.book.owned:
                        continue
                    if p.get("hi_offset", -1) >= 0:
                        self.high_watermarks[f"{topic}[{pid}]"] = int(p["hi_offset"])
                    if p.get("ls_offset", -1) >= 0:
                        self.stable_offsets[tp] = int(p["ls_offset"])
                    # What the group had committed when we got the partition (we may commit
                    # nothing new for it): the statistics know it, our commit results do not.
                    if p.get("committed_offset", -1) > self.book.owned[tp].committed:
                        self.book.note_committed(tp, int(p["committed_offset"]))
        except (ValueError, TypeError, AttributeError):
            pass

    def update_pauses(self) -> None:
        """Pause fetching for the partitions whose message waits out a retry backoff and for
        those held for fairness (fair_fetch.py); resume the others this loop had paused. At
        most every CHECK_S; never during a drain, which has paused every partition itself."""
        now = time.monotonic()
        if self.stop_reason is not None or now - self._last_pause_check < fair_fetch.CHECK_S:
            return
        self._last_pause_check = now
        owned, fair = self.book.owned, self.fair
        backlog = self.runner.backlog_size()
        # Counted with what handler threads took (a run is up to 500 messages each): the fetch
        # limit's count leaves those out, and with several threads it dips below half at the
        # checks while a partition still waits behind another's fetch (hostile review).
        queued = self.runner.queued_by_partition() if len(owned) > 1 and FAIR_FETCH else {}
        if queued and fair.watching(max(backlog, sum(queued.values()))):
            work_s = self.backlog_work_s(now) if fair.held or backlog >= MAX_BACKLOG else 0.0
            starving, unsure = self.starving(queued)
            starved_long = fair.starved_long(starving, now, unsure)
            acts = starved_long or fair.worth_it(work_s)
            if acts or fair.held:
                fair.update(owned, queued, starving, backlog, acts, starved_long)
            else:
                fair.clear(keep_since=True)
        else:
            fair.clear()
        wanted = wanted_paused(fair.held, self.runner.backing_off(), owned)
        start, end = wanted - self.paused, self.paused - wanted
        if start & fair.held:
            log.debug("fairness: pausing %s (each holds a backlog share) while %s wait",
                      ", ".join(map(tp_name, sorted(start & fair.held))),
                      ", ".join(map(tp_name, sorted(fair.starving))))
        # Separately: a pause that failed must not keep the others from being resumed.
        if start:
            try:
                self.consumer.pause([TopicPartition(t, p) for t, p in start])
            except KafkaException as exc:
                log.warning("pause failed: %s", exc)
        if end:
            try:
                self.consumer.resume([TopicPartition(t, p) for t, p in end if (t, p) in owned])
            except KafkaException as exc:
                log.warning("resume failed (tried again at the next check): %s", exc)
                wanted |= end  # still paused as far as anyone knows: a stall otherwise
        self.paused = wanted

    def backlog_work_s(self, now: float) -> float:
        """Seconds the handler needs for the backlog, at the rate it finished messages over the
        last RATE_WINDOW_S of calls (every CHECK_S) with a backlog: infinite when it finished none
        (a slow or stuck handler); 0 before two such calls (an idle spell says nothing about the
        handler's speed, so it starts the window again). Over a window, not one interval: a
        batch handler finishes messages a batch at a time."""
        processed, backlog, marks = self.processed, self.runner.backlog_size(), self._rate_marks
        if not backlog:
            marks.clear()
            return 0.0
        marks.append((now, processed))
        while len(marks) > 2 and now - marks[1][0] >= fair_fetch.RATE_WINDOW_S:
            marks.popleft()
        then, done_then = marks[0]
        if processed == done_then:
            # Nothing finished: a slow handler once a whole window passed so; before that,
            # unknown (a batch, or a first message warming up, finishes later all at once).
            return float("inf") if now - then >= fair_fetch.RATE_WINDOW_S else 0.0
        return backlog * (now - then) / (processed - done_then)

    def starving(self, queued: dict[TP, int]) -> tuple[set[TP], set[TP]]:
        """Owned partitions, not paused, with nothing in the backlog, whose messages wait
        (fair_fetch.messages_wait); and those of them that may not: under read_committed before
        the statistics gave their last stable offset (the work gate counts them, the starve gate
        does not: an open transaction would keep one "starving" for as long as it stays open).
        Local librdkafka calls only: the position of the next message to take, and the
        watermarks of its last fetch answer."""
        owned = self.book.owned
        candidates = [TopicPartition(t, p) for t, p in owned if (t, p) not in queued and (t, p) not in self.paused]
        if not candidates:
            return set(), set()
        out, unsure = set(), set()
        from_latest = self.kafka_conf.get("auto.offset.reset", "earliest") in ("latest", "largest", "end")
        read_committed = self.kafka_conf.get("isolation.level", "read_committed") == "read_committed"
        try:
            for tp in self.consumer.position(candidates):
                watermarks = self.consumer.get_watermark_offsets(tp, cached=True)
                key = (tp.topic, tp.partition)
                book = owned.get(key)
                if watermarks is None or book is None:
                    continue
                low, high = watermarks
                stable = self.stable_offsets.get(key) if read_committed else None
                if messages_wait(tp.offset, book.committed, low, high if stable is None else min(high, stable),
                                 from_latest):
                    out.add(key)
                    if read_committed and stable is None:
                        unsure.add(key)
        except KafkaException as exc:
            log.debug("fairness check: %s", exc)
        return out, unsure

    def resume_before_release(self, tps: list[TP]) -> None:
        """Resume the partitions this loop paused before they leave the assignment: librdkafka
        keeps an application's pause across an unassign, so a partition revoked during its
        retry backoff and assigned back later would never be fetched again."""
        again = [TopicPartition(t, p) for t, p in tps if (t, p) in self.paused]
        self.paused.difference_update(tps)
        self.fair.forget(tps)
        for tp in tps:
            self.stable_offsets.pop(tp, None)
        if not again or self.stop_reason is not None:  # draining: the worker exits paused
            return
        try:
            self.consumer.resume(again)
        except KafkaException as exc:
            log.warning("resume of %s before its release failed: %s", ", ".join(map(tp_name, tps)), exc)

    def store_dirty(self) -> None:
        dirty = self.book.take_dirty()
        if not dirty:
            return
        offsets = [TopicPartition(t, p, off) for (t, p), off in dirty.items()]
        try:
            self.consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # _STATE: librdkafka already dropped the partition; the book fences the rest.
            log.warning("store_offsets refused: %s", exc)

    def uncommitted(self) -> list[TP]:
        """Owned partitions whose stored offset the broker has not confirmed yet."""
        return [tp for tp, b in self.book.owned.items() if b.stored >= 0 and b.committed < b.stored]

    def commit_partitions(self, tps: list[TP]) -> None:
        """Synchronously commit what was stored and not yet committed for ``tps`` (on revoke).
        Skipping what is already committed keeps close() from blocking on an empty commit."""
        todo = set(self.uncommitted())
        offsets = [TopicPartition(t, p, self.book.owned[(t, p)].stored) for t, p in tps if (t, p) in todo]
        if not offsets:
            return
        try:
            result = self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("commit on revoke failed: %s (the next owner re-reads from the last commit)", exc)
            return
        self.note_commit_result(result)

    def note_commit_result(self, result: list[TopicPartition] | None) -> None:
        for tp in result or []:
            key = (tp.topic, tp.partition)
            if tp.error is None and tp.offset >= 0:
                self.book.note_committed(key, tp.offset)
                # librdkafka's own commit at an unassign may still confirm what a revoke's failed.
                if self.released_unconfirmed.get(key, tp.offset + 1) <= tp.offset:
                    del self.released_unconfirmed[key]
                    self.awaiting_commit.discard(key)
            elif tp.error is not None:
                self.awaiting_commit.discard(key)  # that commit failed: nothing more to wait for

    def note_released_unconfirmed(self, tps: list[TP], revoked: bool = False) -> None:
        """Before ``tps`` leave the book: keep those whose stored offset the broker has not
        confirmed (a drain's exit code must not say committed for them). ``revoked``: not lost,
        so librdkafka commits their stored offsets at the unassign (auto-commit), whose result
        a drain waits for."""
        for tp in tps:
            book = self.book.owned.get(tp)
            if book is not None and book.stored >= 0 and book.committed < book.stored:
                self.released_unconfirmed[tp] = book.stored
                if revoked:
                    self.awaiting_commit.add(tp)

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (auto-commits and close()); runs on this thread."""
        self.commit_results += 1
        self.problems.on_commit(err, partitions)
        fatal = classify(err, self.instance_id, self.group, self.kafka_conf) if err is not None else None
        if fatal is not None and fatal.code in IDENTITY_EXITS:
            self.on_consumer_error(err)
            return
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", err.str())
            self.awaiting_commit.difference_update((p.topic, p.partition) for p in partitions)
            return
        self.note_commit_result(partitions)

    # ---- rebalance callbacks (run inside poll/consume/close on this thread; must never raise:
    # an exception here makes confluent-kafka drop the messages that call fetched) ----------

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            tps = [(p.topic, p.partition) for p in partitions]
            self.rebalanced_at = time.time()
            self.problems.on_assign()
            self.book.acquire(tps)
            self.assignments += bool(tps)
            self.state = "assigned"
            self.join_done = True
            self.call_lifecycle("on_assign", tps)
            log.info("assigned %s", ", ".join(map(tp_name, tps)) or "nothing new")
            self.send_report(force=True)
        except Exception:
            log.exception("on_assign failed")

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish the message in flight of the revoked partitions (bounded), store, commit
        them synchronously; only then let the revocation complete."""
        try:
            tps = [(p.topic, p.partition) for p in partitions]
            self.rebalanced_at = time.time()
            if not tps:
                return
            self.revocations += 1
            gone = set(tps)
            dropped = self.runner.drop(gone)
            # After the drain gave up on the message in flight, close() must not wait for it again.
            wait_s = 0.0 if self.gave_up_in_flight else self.revoke_timeout_s
            stuck = self.handler_deadline(gone)
            if stuck is not None:
                # A handler past --handler-timeout is stuck (the supervisor stops this worker for
                # it): the whole group's rebalance must not wait --revoke-timeout on top of that
                # (ksup verify: a hang during a scale-flap held two partitions 14 s).
                wait_s = min(wait_s, max(0.0, stuck[1] - time.time()))
            if not self.runner.wait_not_running(gone, time.monotonic() + wait_s):
                oldest = self.runner.oldest_running(gone)
                log.warning("revoke: handler still busy with %s after %.1fs; its offset will not be "
                            "stored (the next owner handles it again)",
                            oldest[0].coordinates if oldest else "?", wait_s)
            self.collect()
            if self.commit_on_revoke:
                self.commit_partitions(tps)
            self.note_released_unconfirmed(tps, revoked=True)  # the commit failed (or was skipped)
            self.resume_before_release(tps)
            self.book.release(tps)
            self.call_lifecycle("on_revoke", tps)
            log.info("revoked %s (%d queued messages released)", ", ".join(map(tp_name, tps)), dropped)
            self.send_report(force=True)
        except Exception:
            log.exception("on_revoke failed")

    def handler_deadline(self, tps: set[TP] | None = None) -> tuple[Record, float] | None:
        """The record in a handler for the longest (of partitions ``tps``, or any) and when
        (wall clock) it is past --handler-timeout; None without a timeout or a record in flight.
        The revoke and the drain do not wait for a handler past it."""
        oldest = self.runner.oldest_running(tps) if self.handler_timeout_s else None
        return None if oldest is None else (oldest[0], oldest[1] + self.handler_timeout_s)

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Lost partitions may already belong to another member: commit nothing for them."""
        try:
            tps = [(p.topic, p.partition) for p in partitions]
            self.rebalanced_at = time.time()
            self.runner.drop(set(tps))
            self.collect()  # stores only for partitions still owned
            # Finished work of theirs that the broker never confirmed: redelivered to the next owner.
            self.note_released_unconfirmed(tps)
            self.resume_before_release(tps)
            self.book.release(tps)
            self.call_lifecycle("on_revoke", tps)
            log.warning("lost %s (nothing committed for them)", ", ".join(map(tp_name, tps)))
            self.send_report(force=True)
        except Exception:
            log.exception("on_lost failed")

    def call_lifecycle(self, name: str, tps: list[TP]) -> None:
        """The handler class's on_assign/on_revoke, on this (the consumer) thread: keep them short."""
        hook = getattr(self.lifecycle, name, None)
        if hook is None or not tps:
            return
        try:
            hook(list(tps))
        except Exception:
            log.exception("handler %s raised (ignored)", name)

    # ---- reports --------------------------------------------------------------------------------

    def send_report(self, force: bool = False) -> None:
        self.reporter.maybe_send(self, force)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/statm (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0
