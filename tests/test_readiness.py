"""parent/readiness.py as pure logic: what counts as a settled member, and the roll's gate."""

from __future__ import annotations

from types import SimpleNamespace

from supervisor.contract import messages as m
from supervisor.parent import readiness
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import SlotState, State


def report(assignment, state="up", join="steady", seen=10.0, rebalanced=5.0) -> m.Report:
    return m.Report(pid=1, state="assigned", assignment=assignment, in_flight=None, processed=0, failed=0,
                    stored={}, committed={}, rss_bytes=0, group_state=state, join_state=join,
                    group_seen_at=seen, rebalanced_at=rebalanced)


def member(index, assignment, **kw) -> WorkerSlot:
    slot = WorkerSlot(index, proc=SimpleNamespace(pid=100 + index), state=SlotState.RUNNING, joined=True,
                      assigned_at=1.0)
    slot.report = report(assignment, **kw)
    return slot


def sup(*slots, state=State.RUNNING):
    return SimpleNamespace(state=state, slots=list(slots), target_workers=len(slots))


def test_an_empty_assignment_is_a_settled_member_and_ownership_of_all_partitions_is_not_required():
    assert readiness.ready(sup(member(0, []), member(1, ["t[3]"]))) == (True, [])  # type: ignore[arg-type]


def test_statistics_older_than_the_last_rebalance_say_nothing():
    stale = member(0, ["t[0]"], seen=4.0, rebalanced=5.0)
    ok, problems = readiness.ready(sup(stale))  # type: ignore[arg-type]
    assert not ok and "rebalancing" in problems[0]
    ok, problems = readiness.ready(sup(member(0, ["t[0]"], join="wait-join")))  # type: ignore[arg-type]
    assert not ok and "join state wait-join" in problems[0]
    assert readiness.ready(sup(member(0, []), state=State.STARTING)) == (False, ["supervisor is starting"])  # type: ignore[arg-type]


def test_roll_gate_static_needs_the_partitions_back_dynamic_needs_two_steady_seconds():
    new = member(0, ["t[0]", "t[1]"])
    s = sup(new, member(1, []))
    assert readiness.roll_gate(s.slots, new, ["t[1]", "t[0]"], True, None, 0.0)[0]  # type: ignore[arg-type]
    passed, since = readiness.roll_gate(s.slots, new, ["t[0]"], True, None, 0.0)  # type: ignore[arg-type]
    assert not passed and since == 0.0  # the group moved partitions: wait for it to be stable
    assert not readiness.roll_gate(s.slots, new, ["t[0]"], False, since, 1.9)[0]  # type: ignore[arg-type]
    assert readiness.roll_gate(s.slots, new, ["t[0]"], False, since, 2.0)[0]  # type: ignore[arg-type]
    moving = sup(new, member(1, [], join="wait-sync"))
    assert readiness.roll_gate(moving.slots, new, ["t[0]"], False, since, 5.0) == (False, None)  # type: ignore[arg-type]
