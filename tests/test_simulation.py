"""The real parent core (``supervisor.parent.core``) driven through thousands of event orders
against a simulated consumer group and simulated workers (``tests/sim``), with Hypothesis
stateful testing. No broker, no process: the simulation's clock is the core's injected clock.

Invariants checked after every step (``tests/sim/world.py``): a worker being removed, or above
the target, is never told to join; never two live processes with one instance id in the group;
every partition has a consumer within (restart backoff + boot deadline + a bound) after any
change unless ksup is stopping; an always-failing handler is a crash loop within its window; a
worker that cannot boot halts ksup at start; a stop ends within the graceful plus quick timeouts;
no process is left behind; the exit code and receipt match what happened; the core never takes
long over an event. A failure prints the seed and the shrunk story (the list of steps).

``test_simulation_finds_the_old_rules`` points the same machine at the rules as they were before
issue 13 (``tests/sim/old_rules.py``) and requires that it finds a violation."""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from supervisor.parent import events as ev
from supervisor.parent.state import State
from tests.sim import old_rules
from tests.sim.group import GroupProtocol, Member
from tests.sim.world import Boot, Plan, World

EXAMPLES = int(os.environ.get("KSUP_SIM_EXAMPLES", "3000"))
# Stops end a story, so they are drawn less often than the signals that change the group.
SIGNALS = [signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP] * 3 + [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT]


class Supervision(RuleBasedStateMachine):
    world: World

    @initialize(protocol=st.sampled_from(list(GroupProtocol)), workers=st.integers(1, 3),
                partitions=st.integers(1, 6), first_boot=st.sampled_from(list(Boot)),
                bad_first=st.booleans())
    def start(self, protocol: GroupProtocol, workers: int, partitions: int, first_boot: Boot, bad_first: bool) -> None:
        self.world = World(protocol, workers, partitions)
        if bad_first and first_boot is not Boot.OK:
            w = next(iter(self.world.workers.values()))
            w.plan = Plan(boot=first_boot)
            self.world.bad_boot_at = self.world.now
            self.world.fault(f"worker 0 boot: {first_boot.value}")
        self.world.advance(3.0)

    @rule(seconds=st.sampled_from([0.3, 1.0, 2.0, 5.0, 15.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self.world.advance(seconds)

    @rule(n=st.integers(0, 5))
    def kill_a_worker(self, n: int) -> None:
        live = [w for w in self.world.workers.values() if w.alive]
        if live:
            w = live[n % len(live)]
            self.world.fault(f"SIGKILL worker {w.slot.index} (pid {w.pid}, {w.phase.name})")
            w.signal(signal.SIGKILL, self.world.now)
            self.world.deliver()

    @rule(boot=st.sampled_from(list(Boot)), boot_s=st.sampled_from([0.2, 1.0, 3.0]),
          drain_s=st.sampled_from([0.1, 2.0, 20.0]), drain_hangs=st.booleans())
    def next_worker_behaves(self, boot: Boot, boot_s: float, drain_s: float, drain_hangs: bool) -> None:
        self.world.next_plan = Plan(boot=boot, boot_s=boot_s, drain_s=drain_s, drain_hangs=drain_hangs,
                                    handler_fails=self.world.always_fail_since is not None)
        self.world.fault(f"next worker: boot {boot.value} in {boot_s}s, drain {drain_s}s"
                         f"{' (hangs)' if drain_hangs else ''}")

    @rule()
    def handler_always_fails(self) -> None:
        w = self.world
        if w.always_fail_since is None and w.core.state is State.RUNNING:
            w.fault("the handler fails on every message from now on")
            w.always_fail_since = w.now
            w.next_plan.handler_fails = True
            for worker in w.workers.values():
                worker.plan.handler_fails = True

    @rule(sig=st.sampled_from(SIGNALS))
    def a_signal(self, sig: int) -> None:
        self.world.fault(f"signal {signal.Signals(sig).name}")
        self.world.post(ev.SignalReceived(sig))
        self.world.deliver()

    @rule(n=st.integers(1, 5))
    def scale(self, n: int) -> None:
        self.world.fault(f"ksup scale {n}")
        self.world.post(ev.Scale(n))
        self.world.deliver()

    @rule()
    def reload(self) -> None:
        self.world.fault("ksup reload")
        self.world.post(ev.Reload())
        self.world.deliver()

    @rule(timeout=st.sampled_from([None, 5.0]))
    def stop(self, timeout: float | None) -> None:
        self.world.fault(f"ksup stop (timeout {timeout})")
        self.world.post(ev.Stop("stop requested over the control socket", False, timeout))
        self.world.deliver()

    @invariant()
    def checked(self) -> None:
        if hasattr(self, "world"):
            self.world.check()

    def teardown(self) -> None:
        if not hasattr(self, "world"):
            return
        # Every run ends with a stop; it must end in time, leave nothing behind, tell the truth.
        self.world.post(ev.Stop("end of the story", False, None))
        self.world.deliver()
        self.world.advance(self.world.settings.graceful_timeout + self.world.settings.quick_timeout + 15.0)
        assert self.world.core.state is State.STOPPED, f"not stopped: {self.world.core.state}"


SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), derandomize=False, print_blob=True)


def test_simulation_of_the_parent_core() -> None:
    run_state_machine_as_test(Supervision, settings=SETTINGS)


def test_simulation_finds_the_old_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    old_rules.install(monkeypatch)
    with pytest.raises(Exception) as found:  # noqa: B017 (one failure, or a group of distinct ones)
        run_state_machine_as_test(Supervision, settings=settings(
            SETTINGS, max_examples=400, phases=[Phase.generate], print_blob=False, derandomize=True))
    print(f"the simulation found on the old rules: {found.value}")


# ---- the findings of issue 13 as fixed stories: each passes on the new rules and fails on the old --

def _kill(world: World, index: int) -> None:
    worker = next(w for w in world.workers.values() if w.alive and w.slot.index == index)
    world.fault(f"SIGKILL worker {index}")
    worker.signal(signal.SIGKILL, world.now)
    world.deliver()


def _always_fail(world: World) -> None:
    world.always_fail_since = world.now
    world.next_plan.handler_fails = True
    for worker in world.workers.values():
        worker.plan.handler_fails = True


def story_restart_behind_a_join(world: World) -> None:
    """Finding 1: a worker dies while a new member joins (classic: the join waits for every
    member, the dead one included)."""
    world.post(ev.SignalReceived(signal.SIGTTIN))
    world.advance(0.6)  # the new slot is booting: a membership change is in progress
    _kill(world, 0)
    world.advance(45.0)


def story_crash_loop_during_a_reload(world: World) -> None:
    """Finding 1/3: an always-failing handler while a rolling reload runs: deaths must still
    restart and count (exit 6), not wait behind the roll."""
    _always_fail(world)
    world.post(ev.Reload())
    world.advance(100.0)
    assert world.core.exit_code is not None and int(world.core.exit_code) == 6, world.core.exit_code


def story_quick_scale_up_and_down(world: World) -> None:
    """Finding 2: SIGTTIN x5 then SIGTTOU x5: no slot joins after the scale-down was decided."""
    for _ in range(5):
        world.post(ev.SignalReceived(signal.SIGTTIN))
    world.advance(0.6)
    for _ in range(5):
        world.post(ev.SignalReceived(signal.SIGTTOU))
    world.advance(20.0)


def story_worker_dies_at_import(world: World) -> None:
    """Finding 3: the first worker dies at import (no message): halt with exit 3."""
    world.advance(30.0)
    assert world.core.exit_code is not None and int(world.core.exit_code) == 3, world.core.exit_code


def story_worker_hangs_at_import(world: World) -> None:
    """Finding 3: the first worker hangs at import: the boot deadline halts with exit 3."""
    world.advance(30.0)
    assert world.core.exit_code is not None and int(world.core.exit_code) == 3, world.core.exit_code


def story_kill_during_a_reload(world: World) -> None:
    """Finding 3: a worker dies while a rolling reload boots its successor: it is restarted."""
    world.next_plan = Plan(boot_s=3.0)
    world.post(ev.Reload())
    world.advance(0.6)
    _kill(world, 0)
    world.advance(45.0)


STORIES = {
    "restart_behind_a_join": (story_restart_behind_a_join, None, 4),
    "crash_loop_during_a_reload": (story_crash_loop_during_a_reload, None, 1),
    "quick_scale_up_and_down": (story_quick_scale_up_and_down, None, 4),
    "worker_dies_at_import": (story_worker_dies_at_import, Boot.DIE, 4),
    "worker_hangs_at_import": (story_worker_hangs_at_import, Boot.HANG, 4),
    "kill_during_a_reload": (story_kill_during_a_reload, None, 4),
}


def _run_story(name: str) -> None:
    story, first_boot, partitions = STORIES[name]
    world = World(GroupProtocol.CLASSIC, 2, partitions)
    if first_boot is not None:
        first = next(iter(world.workers.values()))
        first.plan = Plan(boot=first_boot)
        world.bad_boot_at = world.now
    else:
        world.advance(3.0)
    story(world)
    world.post(ev.Stop("end of the story"))
    world.advance(50.0)
    assert world.core.state is State.STOPPED


@pytest.mark.parametrize("name", list(STORIES))
def test_story_on_the_new_rules(name: str) -> None:
    _run_story(name)


@pytest.mark.parametrize("name", list(STORIES))
def test_story_fails_on_the_old_rules(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    old_rules.install(monkeypatch)
    with pytest.raises(AssertionError) as failed:
        _run_story(name)
    print(f"old rules, {name}: {str(failed.value).splitlines()[0]}")


def test_story_scale_down_while_a_static_member_is_dead() -> None:
    """Found by the simulation (seed blob AXicY3BkcGQGQgYGIIPRkcmRGcRgArJhJDOYZGNwZAUAakcEcw==):
    3 workers, scale to 1, worker 1 killed. Removing slot 1 without a rejoin left its dead static
    member in the group: slot 2's LeaveGroup started a rebalance that waited for it, and partition
    2 had no consumer for 33 s. Now slot 1 restarts, rejoins, then leaves for good."""
    world = World(GroupProtocol.CLASSIC, 3, 3)
    world.advance(3.0)
    world.post(ev.SignalReceived(signal.SIGTTOU))
    world.post(ev.SignalReceived(signal.SIGTTOU))
    world.deliver()
    _kill(world, 1)
    world.advance(40.0)
    assert len(world.core.slots) == 1
    world.post(ev.Stop("end of the story"))
    world.advance(50.0)
    assert world.core.state is State.STOPPED


def test_leftover_members_found_while_starting_wait_for_the_start() -> None:
    """The start-time answer of adapters/leftovers.py usually comes while ksup is still starting.
    A leftover slot must not join the start barrier (the configured workers' Go waited for its
    boot, and a failed boot of it halted ksup with exit 3): it starts once they were told Go,
    rejoins and leaves."""
    world = World(GroupProtocol.CLASSIC, 2, 4)
    assert world.core.state is State.STARTING
    # The previous ksup's slot 2: dead without leaving, its session still running.
    world.group.members["ksup-2"] = Member("ksup-2", None, expires_at=world.now + 60.0)
    world.post(ev.LeftoverMembers((2,)))
    assert [s.index for s in world.core.slots] == [0, 1], "a leftover slot was added while starting"
    world.advance(3.0)
    assert world.core.state is State.RUNNING
    assert any(w.slot.index == 2 for w in world.all_workers), "the leftover slot was never started"
    world.advance(30.0)
    assert [s.index for s in world.core.slots] == [0, 1]
    assert "ksup-2" not in world.group.members
    world.post(ev.Stop("end of the story"))
    world.advance(50.0)
    assert world.core.state is State.STOPPED


def test_a_slot_scaled_away_while_the_roll_drains_it_rejoins_to_leave() -> None:
    """Classic static members, 2 workers. A rolling reload drains slot 1's old worker (a static
    member that sends no LeaveGroup: its successor takes its instance id) and a scale-down to 1
    comes meanwhile. The slot was removed as the old worker exited, so its member kept its
    partitions from everyone until its session expired. It must rejoin, then leave for good."""
    from supervisor.parent.state import RollPhase

    world = World(GroupProtocol.CLASSIC, 2, 4)
    world.advance(3.0)
    world.post(ev.Reload())
    deadline = world.now + 60
    while not (world.core.roll is not None and world.core.roll.current == 1
               and world.core.roll.phase is RollPhase.DRAIN):
        assert world.now < deadline, "the roll never drained slot 1"
        world.advance(0.1)
    world.post(ev.SignalReceived(signal.SIGTTOU))
    world.advance(20.0)
    assert [s.index for s in world.core.slots] == [0]
    assert "ksup-1" not in world.group.members, "slot 1's static member was left in the group"
    world.post(ev.Stop("end of the story"))
    world.advance(50.0)
    assert world.core.state is State.STOPPED


def test_a_slot_killed_while_it_drains_for_a_scale_down_rejoins_to_leave() -> None:
    """Found by the simulation in CI (seed blob AXicY3BkcGQEQgYGMIPJkRnEYGIACUBINgaQGAtQFsxmBHMZ
    GRGrIQV8): classic static members, 1 worker scaled up to 3 and back to 1; slot 1's worker is
    killed while it drains for the scale-down, before its LeaveGroup. The slot was removed at its
    exit, so its dead member stayed in the group: it held up every rebalance until its session
    expired, and the stop left it there. The slot must come back once, rejoin, then leave."""
    world = World(GroupProtocol.CLASSIC, 1, 1)
    world.advance(3.0)
    world.post(ev.SignalReceived(signal.SIGTTIN))
    world.post(ev.SignalReceived(signal.SIGTTIN))
    world.deliver()
    world.advance(5.0)
    world.post(ev.Scale(1))
    world.deliver()
    deadline = world.now + 30
    while not any(s.index == 1 and s.drain_sent_at is not None and s.alive for s in world.core.slots):
        assert world.now < deadline, "slot 1 was never drained for the scale-down"
        world.advance(0.1)
    assert "ksup-1" in world.group.members, "the story needs slot 1 killed before it left"
    _kill(world, 1)
    world.advance(30.0)
    assert "ksup-1" not in world.group.members, "slot 1's dead static member was left in the group"
    assert [s.index for s in world.core.slots] == [0]
    world.post(ev.Stop("end of the story"))
    world.advance(50.0)
    assert world.core.state is State.STOPPED
