"""The drain sequence of a worker (child side): what happens after SIGTERM or a Drain request.

1. Stop fetching: pause every assigned partition, drop queued messages (never stored).
2. Let the message in flight finish, waiting at most the drain timeout while still serving the
   consumer (so the group does not evict us and rebalances can complete).
3. Store the offsets of everything finished.
4. Commit synchronously, retrying while the group is rebalancing.
5. Read the committed offsets back from the broker for the receipt.
6. ``close()``: revoke, final auto-commit of anything stored, leave the group.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from supervisor.child.offsets import tp_name
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import WorkerExit

if TYPE_CHECKING:
    from supervisor.child.loop import ConsumerLoop

log = logging.getLogger("ksup.worker")

FINAL_COMMIT_TIMEOUT_S = 10.0


def drain(loop: ConsumerLoop) -> WorkerExit:
    started = time.monotonic()
    loop.state = "draining"
    loop.send_report(force=True)
    try:
        loop.consumer.pause(loop.consumer.assignment())
    except KafkaException as exc:
        log.warning("pause failed: %s", exc)
    loop.runner.stop()
    deadline = started + loop.drain_timeout_s
    while not loop.runner.wait_not_running(None, min(deadline, time.monotonic() + 0.1)):
        loop.collect()
        loop.serve(0.0)
        loop.check_supervisor(time.monotonic())  # a quick-stop request shortens the deadline
        deadline = min(deadline, started + loop.drain_timeout_s)
        loop.send_report()
        if time.monotonic() >= deadline:
            break
    abandoned = loop.runner.running
    loop.collect()
    code = loop.exit_code
    if abandoned is not None:
        r = abandoned.record
        log.error("drain timeout: handler still running %s after %.1fs; not stored, will be redelivered",
                  r.coordinates, loop.drain_timeout_s)
        if code == WorkerExit.OK:
            code = WorkerExit.DRAIN_TIMEOUT
    log.debug("drain: %d processed, %d late completions fenced", loop.processed, loop.book.fenced)
    t_commit = time.monotonic()
    if not final_commit(loop) and code == WorkerExit.OK:
        code = WorkerExit.COMMIT_FAILED
    receipt = read_receipt(loop)
    t_close = time.monotonic()
    loop.consumer.close()
    loop.state = "closed"
    t_end = time.monotonic()
    log.info("drained (%s): wait %.3fs, commit %.3fs, close %.3fs; exit %d",
             loop.stop_reason, t_commit - started, t_close - t_commit, t_end - t_close, int(code))
    inflight = None
    if abandoned is not None:
        r = abandoned.record
        inflight = m.InFlight(r.topic, r.partition, r.offset, loop.runner.running_since)
    loop.channel.send(m.Exiting(pid=_pid(), exit_code=int(code), reason=loop.stop_reason or "",
                                receipt=receipt, abandoned=inflight))
    return code


def final_commit(loop: ConsumerLoop, timeout_s: float = FINAL_COMMIT_TIMEOUT_S) -> bool:
    """Commit every stored offset and wait for the broker's answer. True when the broker has
    them all (or there was nothing to commit).

    Synchronous in effect but not a blocking ``commit(asynchronous=False)``: during a group
    rebalance librdkafka queues the OffsetCommit behind this member's JoinGroup, which the broker
    only answers once every member rejoined, and a member blocked in commit never rejoins (seen
    against Kafka 4.3: a 12 s hang until SIGKILL). So: commit asynchronously, keep serving the
    consumer so the rebalance can finish, and re-issue after a retriable failure."""
    deadline = time.monotonic() + timeout_s
    issued_at = -1
    while True:
        pending = loop.uncommitted()
        if not pending:
            return True
        if loop.commit_results > issued_at:  # no commit of ours in flight: (re)issue one
            issued_at = loop.commit_results
            try:
                loop.consumer.commit(asynchronous=True)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("final commit: %s", exc.args[0].str())
        if time.monotonic() >= deadline:
            log.error("final commit: broker did not confirm %s within %.0fs",
                      ", ".join(tp_name(tp) for tp in pending), timeout_s)
            return False
        loop.serve(0.02)


def read_receipt(loop: ConsumerLoop) -> list[m.PartitionReceipt]:
    tps = sorted(loop.book.history)
    committed: dict[tuple[str, int], int] = {}
    if tps:
        try:
            for tp in loop.consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=5.0):
                committed[(tp.topic, tp.partition)] = tp.offset if tp.offset >= 0 else -1
        except KafkaException as exc:
            log.warning("could not read committed offsets back: %s", exc)
    return [m.PartitionReceipt(tp_name(tp), loop.book.history[tp].last_processed,
                               committed.get(tp, loop.book.history[tp].committed))
            for tp in tps]


def _pid() -> int:
    import os

    return os.getpid()
