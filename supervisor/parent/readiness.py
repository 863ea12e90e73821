"""Readiness and health of one ksup, from the consumer group's point of view (parent side; pure
functions over what the workers report, plus one small progress tracker). READY=1 (systemd),
``/readyz`` and ``/healthz`` (metrics), ``ksup health`` (control socket) and the rolling
reload's gate all use these, so they cannot disagree.

A **worker is in the group** when it was told to join (Go), has had its assignment callback
since (an *empty* assignment counts: a fleet may have more members than partitions) and
librdkafka's own view of the group, from statistics that arrived after its last rebalance
callback, is ``cgrp.state == "up"`` and ``cgrp.join_state == "steady"`` (no rebalance under way
for this member). Nothing assumes this ksup owns every partition: other ksup instances (hosts,
pods) may be members of the same group.

**Ready**: the supervisor is running and every worker slot has a live worker in the group.

**Healthy**: the supervisor loop ticks; it is running (not starting or stopping); every slot has
a live worker that is neither stuck in a handler nor silent, nor joining for longer than
``--progress-timeout``; no worker reports a standing Kafka problem (no broker answering, commits
failing, a topic gone); no partition with lag has had its committed offset stand still for
``--progress-timeout``; and no member of this ksup that went without leaving the group (died, or
its slot was scaled away before the restart) has held partitions for ``DEPARTED_GRACE_S`` (the
broker keeps them with it until its session expires, so nobody consumes them).

**The roll's gate** for a replaced slot: with static membership, the new worker got its
partitions back (its assignment callback gave it what the old worker had); otherwise (dynamic
membership, or the group moved partitions meanwhile) every worker of this ksup is in the group
and has stayed so for ``STABLE_FOR_S``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

from supervisor.parent import policy
from supervisor.parent.state import State

if TYPE_CHECKING:
    from supervisor.contract.messages import Report
    from supervisor.parent.slots import WorkerSlot
    from supervisor.parent.supervisor import Supervisor

LOOP_STALL_S = 5.0   # the loop ticks at least every 0.5 s; this long without a tick is a stall
DEPARTED_GRACE_S = 10.0  # a restarting worker takes its partitions back well within this
STABLE_FOR_S = 2.0   # dynamic roll gate: the group looked steady to every worker this long
# (a member learns of a rebalance from its next heartbeat, 1 s apart with ksup's settings; the
# statistics that show it come every second)


class Verdict(NamedTuple):
    ok: bool
    problems: list[str]


def group_steady(report: Report) -> bool:
    """librdkafka says the group is up and this member is not rebalancing, in statistics newer
    than the member's last rebalance callback."""
    return (report.group_state == "up" and report.join_state == "steady"
            and report.group_seen_at >= report.rebalanced_at)


def not_in_group(slot: WorkerSlot) -> str | None:
    """Why the worker in ``slot`` is not (yet) a settled member of the group; None when it is."""
    if not slot.alive:
        return "is not running"
    if not slot.joined:
        return "is booting"
    if slot.drain_sent_at is not None:
        return "is draining"
    report = slot.report
    if slot.assigned_at is None or report is None:
        return "has not had its assignment yet (joining the group)"
    if not group_steady(report):
        return (f"sees the group rebalancing (librdkafka: state {report.group_state or '?'}, "
                f"join state {report.join_state or '?'})")
    return None


def ready(sup: Supervisor) -> Verdict:
    if sup.state is not State.RUNNING:
        return Verdict(False, [f"supervisor is {sup.state.value}"])
    problems = [f"worker {s.index} {why}" for s in sup.slots if (why := not_in_group(s))]
    if len(sup.slots) < sup.target_workers:
        problems.append(f"{len(sup.slots)} of {sup.target_workers} worker slots exist (scaling up)")
    return Verdict(not problems, problems)


class Progress:
    """Per partition: the committed offset and since when it has stood still while there was lag."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[int, float]] = {}

    def stuck(self, offsets: dict[str, tuple[int, int]], now: float, timeout_s: float) -> list[str]:
        out = []
        for name, (committed, high) in sorted(offsets.items()):
            prev = self.marks.get(name)
            if prev is None or prev[0] != committed or high <= committed:
                self.marks[name] = (committed, now)  # moved, or nothing to do: progress is fine
            elif now - prev[1] > timeout_s:
                out.append(f"{name}: lag {high - committed}, committed offset stuck at {committed} "
                           f"for {now - prev[1]:.0f}s")
        return out


def partition_offsets(sup: Supervisor) -> dict[str, tuple[int, int]]:
    """Partition -> (committed, high watermark) over the workers that own them now."""
    out: dict[str, tuple[int, int]] = {}
    for s in sup.slots:
        r = s.report
        if r is None or not s.alive:
            continue
        for name in r.assignment:
            out[name] = (r.committed.get(name, -1), r.high_watermarks.get(name, -1))
    return out


def health(sup: Supervisor, now: float | None = None) -> Verdict:
    now = time.monotonic() if now is None else now
    wall = time.time()
    timeout = sup.settings.progress_timeout
    problems = []
    if now - sup.last_tick > LOOP_STALL_S:
        problems.append(f"supervisor loop stalled for {now - sup.last_tick:.1f}s")
    if sup.state is not State.RUNNING:
        problems.append(f"supervisor is {sup.state.value}")
    for s in sup.slots:
        if not s.alive:
            problems.append(f"worker {s.index} is not running")
            continue
        why = policy.stuck(s, now, wall, sup.settings)
        if why:
            problems.append(f"worker {s.index} {why}")
        elif s.joined and s.assigned_at is None and now - s.spawned_at > timeout:
            problems.append(f"worker {s.index} has been joining the group for {now - s.spawned_at:.0f}s")
        if s.report is not None:
            problems += [f"worker {s.index}: {p}" for p in s.report.problems]
    problems += sup.progress.stuck(partition_offsets(sup), now, timeout)
    held = sup.core.coverage_problem(DEPARTED_GRACE_S)
    if held:
        problems.append(held)
    return Verdict(not problems, problems)


def roll_gate(slots: list[WorkerSlot], incoming: WorkerSlot, old_assignment: list[str], static: bool,
              steady_since: float | None, now: float) -> tuple[bool, float | None]:
    """Whether the roll may go on after ``incoming`` joined in place of a worker that owned
    ``old_assignment``. Returns (pass, the time since which every worker has been in the group).
    A static member that got exactly its partitions back passes once it is in the group itself:
    nothing else in the group moved, so there is nothing to wait for from the other members."""
    report = incoming.report
    if not incoming.alive or incoming.assigned_at is None or report is None:
        return False, None
    if static and set(report.assignment) == set(old_assignment):
        return not_in_group(incoming) is None, steady_since
    if any(not_in_group(s) for s in slots):
        return False, None
    steady_since = now if steady_since is None else steady_since
    return now - steady_since >= STABLE_FOR_S, steady_since
