"""The drain sequence of a worker (child side): what happens after SIGTERM or a Drain request.

1. Stop fetching: pause every assigned partition, drop queued messages (never stored).
2. Let the message in flight finish, waiting at most the drain timeout while still serving the
   consumer (so the group does not evict us and rebalances can complete).
3. Store the offsets of everything finished.
4. Commit, and wait for the broker's confirmation while serving the group.
5. Read the committed offsets back from the broker for the receipt.
6. Tell the supervisor we are ready to leave and wait for its ``Leave`` (still serving). The
   supervisor releases all draining workers together once each has committed: with the classic
   protocol, a member that leaves starts a rebalance, and a member that has re-sent JoinGroup
   cannot commit until that rebalance ends, so nobody leaves before everybody committed.
7. ``close()``: revoke, final auto-commit of anything stored, leave the group.

Every wait after step 2 comes out of the drain's budget: the supervisor's SIGKILL deadline
(``Drain.deadline_s``, or --graceful-timeout for a direct SIGTERM), less a reserve for the close,
so the exit code is the worker's own truth (5 for an unconfirmed commit) and never the
supervisor's "killed" (4). ``close()`` runs on the consumer thread like every other Consumer call;
a watchdog thread (which never touches the Consumer) ends the process with the drain's exit code
if close() outlives the budget (it can block for a session timeout when the group is stuck).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from supervisor.child.loop import ORPHANED
from supervisor.child.offsets import tp_name
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import WorkerExit

if TYPE_CHECKING:
    from supervisor.child.loop import ConsumerLoop
    from supervisor.record import Record

log = logging.getLogger("ksup.worker")

FINAL_COMMIT_TIMEOUT_S = 10.0
LEAVE_WAIT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # without word from the supervisor, leave after this long anyway
LEAVE_GROUP_S = 3.0    # a worker leaving for good waits this long at most for its revoke
JOIN_WAIT_S = 5.0      # ... and this long for the answer to a JoinGroup still pending
CLOSE_RESERVE_S = 1.5  # kept from the budget for close() and the exit itself
MIN_STEP_S = 0.3       # a step of the drain gets at least this long, whatever the budget says


def budget_left(loop: ConsumerLoop, reserve: float = CLOSE_RESERVE_S) -> float:
    """Seconds this step of the drain may take: what is left before the supervisor's SIGKILL,
    less ``reserve`` for the steps after it."""
    exit_by = loop.exit_by if loop.exit_by is not None else time.monotonic() + loop.exit_within_s
    return max(exit_by - time.monotonic() - reserve, MIN_STEP_S)


def drain(loop: ConsumerLoop) -> WorkerExit:
    """Run the whole sequence; returns the worker's exit code. Never blocks without bound."""
    if loop.exit_code in GIVE_UP_CODES:
        return give_up(loop)
    t0 = time.monotonic()
    loop.state = "draining"
    loop.released_unconfirmed.clear()  # only partitions gone during the drain count against its commit
    loop.awaiting_commit.clear()
    loop.send_report(force=True)
    abandoned = finish_in_flight(loop, t0)
    code = loop.exit_code
    if abandoned is not None:
        log.error("drain timeout: handler still running %s after %.1fs; not stored, will be redelivered",
                  abandoned.coordinates, loop.drain_timeout_s)
        if code == WorkerExit.OK:
            code = WorkerExit.DRAIN_TIMEOUT
    t_commit = time.monotonic()
    committed = final_commit(loop, min(FINAL_COMMIT_TIMEOUT_S, budget_left(loop)))
    if loop.released_unconfirmed:
        # Revoked (its commit failed) or lost (session expired) during the drain: the final commit
        # no longer covers them, and the broker never confirmed what the handler finished.
        gone = ", ".join(map(tp_name, sorted(loop.released_unconfirmed)))
        log.error("final commit: %s left this worker before the broker confirmed the offsets stored for them; "
                  "the finished messages will be redelivered", gone)
        committed = False
    if loop.exit_code in GIVE_UP_CODES or code == WorkerExit.OK:
        code = loop.exit_code  # a failure during the commit (a fatal Kafka error) is the drain's too
    if not committed:
        loop.commit_on_revoke = False  # the group is stuck: close() must not block on a commit
        if code == WorkerExit.OK:
            code = WorkerExit.COMMIT_FAILED
    refused = loop.exit_code in REFUSED_CODES
    receipt = read_receipt(loop, ask_broker=committed and not refused)
    t_wait = time.monotonic()
    if loop.leave_group and not loop.join_done:
        finish_join(loop, min(JOIN_WAIT_S, budget_left(loop)))
    wait_for_leave(loop)
    t_close = time.monotonic()
    if loop.leave_group:
        leave_group_for_good(loop, min(LEAVE_GROUP_S, budget_left(loop)))
    inflight = None
    if abandoned is not None:
        r = abandoned
        oldest = loop.runner.oldest_running()
        inflight = m.InFlight(r.topic, r.partition, r.offset, oldest[1] if oldest else 0.0)
    # Said before close(), which the watchdog may cut short: the supervisor has the receipt either way.
    loop.send_report(force=True)  # the final counts, for the supervisor's metrics
    loop.channel.send(m.Exiting(pid=os.getpid(), exit_code=int(code), reason=loop.stop_reason or "",
                                receipt=receipt, abandoned=inflight, drain_seconds=time.monotonic() - t0))
    close_within(loop, min(REFUSED_CLOSE_S if refused else CLOSE_TIMEOUT_S, budget_left(loop, reserve=0.3)), code)
    loop.state = "closed"
    log.info("drained (%s): handler %.3fs, commit %.3fs, wait for others %.3fs, close %.3fs; exit %d",
             loop.stop_reason, t_commit - t0, t_wait - t_commit, t_close - t_wait,
             time.monotonic() - t_close, int(code))
    return code


def finish_join(loop: ConsumerLoop, timeout_s: float) -> None:
    """A worker leaving for good whose JoinGroup is still pending waits (serving, bounded) for
    the group's answer before it tells the supervisor it is ready to leave: a member whose join
    never completed has no member id to send LeaveGroup with, so its static member would stay
    in the group and keep a partition from everyone until its session expired (seen: a 47.6 s
    gap in ksup verify after a scale-up and a SIGTERM). The others are still in the group
    (waiting for the supervisor's Leave), so the rebalance can complete."""
    deadline = time.monotonic() + timeout_s
    while not loop.join_done and time.monotonic() < deadline:
        loop.serve(0.05)
        loop.check_supervisor(time.monotonic())


def leave_group_for_good(loop: ConsumerLoop, timeout_s: float = LEAVE_GROUP_S) -> None:
    """A static member sends no LeaveGroup on close() (classic protocol), so a slot removed for
    good would keep its partitions until its session expires. ``unsubscribe()`` first does send
    it (measured on Kafka 4.3.1: the other member owned every partition 2.9 s later instead of
    45 s); serve the consumer until the revoke is done (bounded), then close."""
    try:
        loop.consumer.unsubscribe()
    except KafkaException as exc:
        log.warning("unsubscribe before leaving for good: %s", exc)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not loop.consumer.assignment():
                return
        except KafkaException:
            return
        loop.serve(0.05)
# The broker refused our login (a re-authentication failed: the credential was deleted or changed):
# each connection is closed when its session ends, so the finished work's commit is still tried
# (bounded, as always), but reading offsets back and a full close() would only wait out timeouts.
REFUSED_CODES = (WorkerExit.AUTH_FAILED,)
REFUSED_CLOSE_S = 2.0
# The consumer is unusable (fenced: every later call fails) or can never join (the broker lacks
# the group protocol): nothing may be stored or committed any more, so nothing is waited for.
GIVE_UP_CODES = (WorkerExit.FENCED, WorkerExit.INSTANCE_ID_HELD, WorkerExit.BROKER_UNSUPPORTED)


def give_up(loop: ConsumerLoop) -> WorkerExit:
    """End at once without processing anything more: the handler threads take no more work
    (a message in flight dies with the process, unstored; another member reprocesses it), no
    store, no commit; the consumer is closed with a short bound."""
    t0 = time.monotonic()
    loop.state = "draining"
    loop.runner.stop()
    loop.send_report(force=True)
    log.error("giving up without a drain: %s; exit %d", loop.stop_reason, int(loop.exit_code))
    loop.channel.send(m.Exiting(pid=os.getpid(), exit_code=int(loop.exit_code), reason=loop.stop_reason or "",
                                drain_seconds=time.monotonic() - t0))
    close_within(loop, 2.0, loop.exit_code)
    loop.state = "closed"
    return loop.exit_code


def close_within(loop: ConsumerLoop, timeout_s: float, code: WorkerExit) -> None:
    """``close()`` on the consumer thread, bounded by a watchdog. close() can block for a whole
    session timeout when the group is stuck in a rebalance (a static member that died still
    counts as a member) or the broker froze. By then everything that could be committed was, so
    a worker that gives up waiting loses nothing: the watchdog (a thread that never touches the
    Consumer) ends the process with ``code``, and the broker drops the member when its session
    expires."""
    def expire() -> None:
        log.error("close() did not return within %.1fs (the group is stuck rebalancing or the broker "
                  "does not answer); exiting without it, exit %d", timeout_s, int(code))
        for stream in (sys.stderr, sys.stdout):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(int(code))

    watchdog = threading.Timer(timeout_s, expire)
    watchdog.name, watchdog.daemon = "ksup-close-watchdog", True
    watchdog.start()
    try:
        loop.consumer.close()
    finally:
        watchdog.cancel()


def finish_in_flight(loop: ConsumerLoop, t0: float) -> Record | None:
    """Steps 1-3. Returns the record still in the handler at the deadline (abandoned), if any."""
    try:
        loop.consumer.pause(loop.consumer.assignment())
    except KafkaException as exc:
        log.warning("pause failed: %s", exc)
    loop.runner.stop()
    # The deadline is re-read each round: a quick-stop request can shorten it. A handler already
    # past --handler-timeout is not waited for: it is stuck, and the rest must still be committed.
    while not loop.runner.wait_not_running(None, min(t0 + loop.drain_timeout_s, time.monotonic() + 0.1)):
        loop.collect()
        if loop.runner.crashed is not None:
            loop.on_handler_thread_crashed()
        loop.serve(0.0)
        loop.check_supervisor(time.monotonic())
        loop.send_report()
        if time.monotonic() >= t0 + loop.drain_timeout_s:
            break
        stuck = loop.handler_deadline()
        if stuck is not None and time.time() > stuck[1]:
            log.error("drain: the handler on %s ran past --handler-timeout (%.0fs); not waiting for it",
                      stuck[0].coordinates, loop.handler_timeout_s)
            break
    loop.collect()
    if loop.runner.crashed is not None:
        loop.on_handler_thread_crashed()
    oldest = loop.runner.oldest_running()
    loop.gave_up_in_flight = oldest is not None
    return oldest[0] if oldest else None


def wait_for_leave(loop: ConsumerLoop) -> None:
    """Step 6: keep serving the group until the supervisor says everyone may leave. Orphans
    (no supervisor left to say it) keep the same rule among themselves: leave_barrier.py."""
    loop.channel.send(m.ReadyToLeave(os.getpid()))
    deadline = time.monotonic() + min(LEAVE_WAIT_S, budget_left(loop))
    while not loop.leave_now and not loop.channel.closed and time.monotonic() < deadline:
        loop.serve(0.02)
        loop.check_supervisor(time.monotonic())
        if loop.outside_stop() == ORPHANED:
            break
    if loop.leave_barrier is not None and (loop.outside_stop() == ORPHANED or loop.channel.closed):
        wait_for_siblings(loop, min(LEAVE_WAIT_S, budget_left(loop)))


def wait_for_siblings(loop: ConsumerLoop, timeout_s: float) -> None:
    """An orphan closes only once every live sibling finished its final commit (bounded),
    serving the group meanwhile. One that closed first (a static member sends no LeaveGroup)
    could leave a rebalance round waiting for it until its session expired, with a sibling's
    final commit stuck behind that round: finished work uncommitted (seen in ksup verify: 96
    duplicates and a 17 s gap after SIGKILL of the supervisor during a rebalance)."""
    assert loop.leave_barrier is not None
    loop.leave_barrier.committed()
    deadline = time.monotonic() + timeout_s
    while loop.leave_barrier.waiting_for() and time.monotonic() < deadline:
        loop.serve(0.05)


def final_commit(loop: ConsumerLoop, timeout_s: float = FINAL_COMMIT_TIMEOUT_S) -> bool:
    """Commit every stored offset and wait for the broker's answer. True when the broker has
    them all (or there was nothing to commit).

    Synchronous in effect but not a blocking ``commit(asynchronous=False)``: during a group
    rebalance librdkafka queues the OffsetCommit behind this member's JoinGroup, which the broker
    only answers once every member rejoined, and a member blocked in commit never rejoins (seen
    against Kafka 4.3: a 12 s hang until SIGKILL). So: commit asynchronously, keep serving the
    consumer so the rebalance can finish, and re-issue after a retriable failure."""
    started = time.monotonic()
    deadline = started + timeout_s
    issued_at = -1
    while True:
        # A quick stop (a second SIGINT, SIGQUIT) shortens the whole drain: the wait for the
        # broker's answer ends within the shorter budget, so the worker still exits with the truth
        # (5) before the supervisor's SIGKILL (which says 4 and names a message long finished).
        loop.check_supervisor(time.monotonic())
        deadline = min(deadline, time.monotonic() + budget_left(loop))
        if loop.exit_code in GIVE_UP_CODES:
            return False  # fenced meanwhile: no commit can succeed any more
        pending = loop.uncommitted()
        # Revoked during the drain with their commit failed: librdkafka's own commit at the
        # unassign may still confirm them (then the drain is whole); waited for, not re-issued.
        if not pending and not loop.awaiting_commit:
            return True
        if pending and loop.commit_results > issued_at:  # no commit of ours in flight: (re)issue one
            issued_at = loop.commit_results
            try:
                loop.consumer.commit(asynchronous=True)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("final commit: %s", exc.args[0].str())
        if time.monotonic() >= deadline:
            log.error("final commit: broker did not confirm %s within %.1fs",
                      ", ".join(tp_name(tp) for tp in [*pending, *sorted(loop.awaiting_commit)]),
                      time.monotonic() - started)
            return False
        loop.serve(0.02)


def read_receipt(loop: ConsumerLoop, ask_broker: bool) -> list[m.PartitionReceipt]:
    tps = sorted(loop.book.history)
    committed: dict[tuple[str, int], int] = {}
    if tps and ask_broker:
        try:
            for tp in loop.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=3.0):
                committed[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else -1
        except KafkaException as exc:
            log.warning("could not read committed offsets back: %s", exc)
    return [m.PartitionReceipt(tp_name(tp), loop.book.history[tp].last_processed,
                               committed.get(tp, loop.book.history[tp].committed))
            for tp in tps]
