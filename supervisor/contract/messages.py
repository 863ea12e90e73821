"""Typed messages exchanged over the supervisor <-> worker socket pair.

Direction is part of the name of each union: ``ToWorker`` is sent by the supervisor,
``FromWorker`` by a worker. Every message is a frozen dataclass of JSON-friendly fields;
``codec`` turns them into bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1


# ---- supervisor -> worker -------------------------------------------------------------------

@dataclass(frozen=True)
class Configure:
    """First message to a new worker: everything it needs to boot. Sent over the pipe rather than
    argv or the environment so that secrets in ``kafka`` never show in ``ps`` or /proc."""

    slot: int
    handler: str
    topics: list[str]
    kafka: dict[str, str]
    options: dict[str, Any]
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Go:
    """Join the group and start consuming. Sent once the worker reported ``Loaded``; holding it
    back is how the supervisor keeps bad code from ever joining the group."""


@dataclass(frozen=True)
class Drain:
    """Stop fetching, finish the message in flight (waiting at most ``timeout_s``), store,
    commit synchronously, close, exit. Idempotent; a later Drain may only shorten the wait."""

    timeout_s: float
    reason: str = "requested"
    # Seconds until the supervisor's SIGKILL: the whole drain (commit, wait, close) fits in it.
    deadline_s: float | None = None
    # The slot goes for good (as Leave.leave_group says later): a worker still joining
    # finishes its join first, since a member whose JoinGroup is pending cannot leave.
    leave_group: bool = False


@dataclass(frozen=True)
class Leave:
    """Close the consumer now (leave the group). Sent after ``ReadyToLeave``; during a stop the
    supervisor waits until every draining worker has committed, so that no member's leaving
    starts a rebalance that blocks another member's final commit. ``leave_group``: the slot is
    going away for good (scale down): leave the group even as a static member (unsubscribe
    before close), so its partitions do not wait for the session timeout."""

    leave_group: bool = False


ToWorker = Configure | Go | Drain | Leave


# ---- worker -> supervisor -------------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    """The handler imported, the consumer config was accepted and the broker answered.
    The worker now waits for ``Go`` and has not joined the group."""

    pid: int
    handler: str
    client_version: str
    partitions: int = 0  # partitions of the subscribed topics, from the broker's metadata
    handler_version: str = ""  # the version of the package the handler comes from, when known


@dataclass(frozen=True)
class BootFailed:
    """The worker cannot start: ``exit_code`` says which kind (see ExitCode); ``reason`` is one
    line naming the problem and the fix. Sent just before the worker exits."""

    pid: int
    exit_code: int
    reason: str


@dataclass(frozen=True)
class InFlight:
    """The message a handler is working on, and since when (wall clock, seconds)."""

    topic: str
    partition: int
    offset: int
    since: float


@dataclass(frozen=True)
class Report:
    """The worker's state, sent on every change and at a steady interval."""

    pid: int
    state: str
    assignment: list[str]
    in_flight: InFlight | None
    processed: int
    failed: int
    stored: dict[str, int]
    committed: dict[str, int]
    rss_bytes: int
    revocations: int = 0
    at: float = 0.0
    skipped: int = 0         # failed messages stored anyway (--on-error skip)
    dead_lettered: int = 0   # failed messages sent to the dead-letter topic
    retries: int = 0         # handler attempts that failed and were retried
    assignments: int = 0     # rebalance callbacks that gave this worker partitions
    # Per partition (name -> [processed, failed]) since the worker started.
    counts: dict[str, list[int]] = field(default_factory=dict)
    # Per partition high watermark, from librdkafka statistics (statistics.interval.ms).
    high_watermarks: dict[str, int] = field(default_factory=dict)
    # Handler latency: cumulative counts per bucket of LATENCY_BUCKETS (+Inf last), and the sum.
    latency_counts: list[int] = field(default_factory=list)
    latency_sum: float = 0.0
    # Persistent Kafka-side problems the worker sees now, one line each, empty when fine (for
    # example the topic was deleted, commits keep failing, no broker answers). Status, health
    # and the log show them.
    problems: list[str] = field(default_factory=list)
    # The consumer group as librdkafka sees it (its statistics' ``cgrp``): ``group_state`` is
    # cgrp.state ("up" once the coordinator is known), ``join_state`` cgrp.join_state ("steady"
    # when no rebalance is under way for this member); ``group_seen_at`` when those statistics
    # arrived and ``rebalanced_at`` the last rebalance callback (wall clock, seconds). Statistics
    # older than the last callback say nothing about the group after it (readiness.py).
    group_state: str = ""
    join_state: str = ""
    group_seen_at: float = 0.0
    rebalanced_at: float = 0.0
    # Handler threads alive out of how many were started: fewer means a dead one (the worker
    # exits HANDLER_CRASHED on its own; the supervisor can tell "idle" from "dead" meanwhile).
    handler_threads: int = 0
    handler_threads_alive: int = 0


# Upper bounds (seconds) of the handler latency histogram buckets; +Inf is implied.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)


@dataclass(frozen=True)
class PartitionReceipt:
    """What happened to one partition in this worker: the last offset a handler finished and
    the committed offset as read back from the broker (-1 when unknown or none)."""

    partition: str
    last_processed: int
    committed: int


@dataclass(frozen=True)
class Exiting:
    """Sent as the last message: why the worker stops, the exit code it is about to use, and its
    receipt. ``abandoned`` names a message whose handler did not finish in time (never stored)."""

    pid: int
    exit_code: int
    reason: str
    receipt: list[PartitionReceipt] = field(default_factory=list)
    abandoned: InFlight | None = None
    drain_seconds: float = 0.0  # from the drain request to the consumer closed


@dataclass(frozen=True)
class ReadyToLeave:
    """Drained and committed (or given up committing); waiting for ``Leave``."""

    pid: int


FromWorker = Loaded | BootFailed | Report | ReadyToLeave | Exiting
Message = ToWorker | FromWorker
