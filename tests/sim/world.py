"""The world around the real parent core: simulated worker processes (boot, hang, die at any
step, drain slowly, exit) in a simulated consumer group, a simulated clock, and the checks the
tests make. ``World.apply`` carries out the core's actions as the I/O loop would, without any
process; ``World.advance`` moves the clock and delivers what the workers say and do."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from enum import Enum

from supervisor.config import Settings
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import WorkerExit
from supervisor.parent import events as ev
from supervisor.parent.core import SupervisorCore
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import After, State
from tests.sim.group import Group, GroupProtocol

TOPIC = "t"
TICK_S = 0.5          # the real loop ticks at least this often
STEP_S = 0.1          # the simulation's resolution
LEAVE_WAIT_S = 10.0   # a drained worker closes by itself after this long without Leave
REPORT_EVERY_S = 1.0


class Boot(Enum):
    OK = "ok"
    FAIL = "fail"   # BootFailed (exit 3): the handler cannot be imported
    DIE = "die"     # os._exit(1) at import: no message at all
    HANG = "hang"   # hangs at import


class Phase(Enum):
    BOOTING = 1
    LOADED = 2
    MEMBER = 3
    DRAINING = 4
    READY = 5     # drained and committed: waiting for Leave
    EXITED = 6


@dataclass
class Plan:
    boot: Boot = Boot.OK
    boot_s: float = 1.0
    drain_s: float = 0.2
    drain_hangs: bool = False
    handler_fails: bool = False


class Violation(AssertionError):
    pass


@dataclass(eq=False)
class SimWorker:
    world: World
    slot: WorkerSlot
    pid: int
    plan: Plan
    started: float
    instance: str = ""
    phase: Phase = Phase.BOOTING
    assignment: list[int] = field(default_factory=list)
    processed: dict[int, int] = field(default_factory=dict)  # partition -> last processed offset
    committed: dict[int, int] = field(default_factory=dict)  # partition -> committed (next) offset
    drain_until: float | None = None
    ready_at: float | None = None
    leave: bool = False
    last_report: float = -1e9
    exit_code: int | None = None
    killed: bool = False
    exit_after_drain: int = 0
    leave_group: bool = False
    got_assignment: bool = False  # a rebalance callback came (possibly with no partitions)
    rebalanced_at: float = 0.0    # the last rebalance callback (the simulation's clock)
    stop_reason: str = ""
    exited_at: float | None = None

    def __post_init__(self) -> None:
        self.instance = f"ksup-{self.slot.index}"

    @property
    def alive(self) -> bool:
        return self.phase is not Phase.EXITED

    # ---- the group's calls --------------------------------------------------------------------

    def assigned(self, partitions: list[int], now: float) -> None:
        if self.phase is Phase.MEMBER:
            # On revoke a worker commits what it processed of the partitions it loses.
            for p in set(self.assignment) - set(partitions):
                self._commit([p])
            for p in set(partitions) - set(self.assignment):  # resumes from the committed offset
                self.processed[p] = self.world.committed.get(p, 0) - 1
            self.assignment, self.got_assignment, self.rebalanced_at = list(partitions), True, now
            self.report(now, force=True)

    def fenced(self, now: float) -> None:
        self.exit(int(WorkerExit.FENCED), now, reason="fenced")

    # ---- life ------------------------------------------------------------------------------

    def step(self, now: float) -> None:
        w = self.world
        if self.phase is Phase.BOOTING and now - self.started >= self.plan.boot_s:
            if self.plan.boot is Boot.OK:
                self.phase = Phase.LOADED
                w.say(self, m.Loaded(self.pid, "sim:process", "sim", w.partitions))
            elif self.plan.boot is Boot.FAIL:
                w.say(self, m.BootFailed(self.pid, int(WorkerExit.BOOT_FAILED), "importing 'sim' raised"))
                self.exit(int(WorkerExit.BOOT_FAILED), now)
            elif self.plan.boot is Boot.DIE:
                self.exit(1, now)
            return
        if self.phase is Phase.MEMBER:
            if self.assignment and self.plan.handler_fails:
                self._drain_begin(now, "handler raised")
                self.drain_until = now  # it stops at once
                self.exit_after_drain = int(WorkerExit.HANDLER_FAILED)
                return
            for p in self.assignment:  # one message per step and partition
                self.processed[p] = self.processed.get(p, -1) + 1
                w.truth[p] = max(w.truth.get(p, -1), self.processed[p])
            if now - self.last_report >= REPORT_EVERY_S:
                self._commit(self.assignment)  # auto-commit of what was stored
                self.report(now)
        if self.phase is Phase.DRAINING and self.assignment and self.plan.handler_fails and not self.exit_after_drain:
            # A message in flight raises during a drain begun for another reason: the real
            # worker's drain takes that code (loop.request_drain), so it exits 10, not 0.
            self.exit_after_drain = int(WorkerExit.HANDLER_FAILED)
        if self.phase is Phase.DRAINING and self.drain_until is not None and now >= self.drain_until:
            self._commit(self.assignment)
            self.phase, self.ready_at = Phase.READY, now
            self.report(now, force=True)
            w.say(self, m.ReadyToLeave(self.pid))
        if self.phase is Phase.READY and (self.leave or now - (self.ready_at or now) >= LEAVE_WAIT_S):
            code = self.exit_after_drain
            receipt = [m.PartitionReceipt(f"{TOPIC}[{p}]", o, self.committed.get(p, -1))
                       for p, o in sorted(self.processed.items())]
            w.say(self, m.Exiting(self.pid, code, self.stop_reason, receipt))
            if self.leave_group:
                w.group.left(self, now)  # unsubscribe + close: a LeaveGroup even when static
            else:
                w.group.closed(self, now, for_good=self.slot.then is After.REMOVE)
            self.exit(code, now, closed=True)

    def receive(self, msg: m.ToWorker, now: float) -> None:
        if not self.alive:
            return
        if isinstance(msg, m.Go) and self.phase is Phase.LOADED:
            self.phase = Phase.MEMBER
            self.world.group.join(self, now)
        elif isinstance(msg, m.Drain):
            # As the real worker (loop.check_supervisor): a Drain for good leaves the group even
            # if the supervisor's Leave never comes (its wait for the others times out).
            self.leave_group = self.leave_group or msg.leave_group
            self.drain(now, msg.reason, msg.timeout_s)
        elif isinstance(msg, m.Leave):
            self.leave, self.leave_group = True, msg.leave_group

    def drain(self, now: float, reason: str, wait_s: float | None = None) -> None:
        if self.phase in (Phase.BOOTING, Phase.LOADED):
            if self.phase is Phase.LOADED or self.plan.boot is not Boot.HANG:
                self.world.say(self, m.Exiting(self.pid, 0, "stopped before joining"))
                self.exit(0, now)
            return  # hung at import: the SIGTERM handler is not even installed yet... it waits
        if self.phase is Phase.MEMBER:
            self._drain_begin(now, reason)
            wait = self.plan.drain_s if wait_s is None else min(self.plan.drain_s, wait_s)
            self.drain_until = None if self.plan.drain_hangs else now + wait

    def _drain_begin(self, now: float, reason: str) -> None:
        self.phase, self.stop_reason = Phase.DRAINING, reason
        self.report(now, force=True)

    def signal(self, sig: int, now: float) -> None:
        if not self.alive:
            return
        if sig == signal.SIGKILL:
            self.killed = True
            self.exit(-signal.SIGKILL, now)
        elif sig == signal.SIGTERM:
            self.drain(now, "SIGTERM received")

    def exit(self, code: int, now: float, reason: str = "", closed: bool = False) -> None:
        if not self.alive:
            return
        if not closed and self.phase in (Phase.MEMBER, Phase.DRAINING, Phase.READY):
            self.world.group.died(self, now)
        self.phase, self.exit_code, self.exited_at = Phase.EXITED, code, now
        self.world.exited.append(self)

    def _commit(self, partitions: list[int]) -> None:
        for p in partitions:
            if p in self.processed:
                self.committed[p] = self.processed[p] + 1
                self.world.committed[p] = max(self.world.committed.get(p, -1), self.committed[p])

    def report(self, now: float, force: bool = False) -> None:
        self.last_report = now
        state = {Phase.MEMBER: "assigned" if self.got_assignment else "joining",
                 Phase.DRAINING: "draining", Phase.READY: "draining"}.get(self.phase, "joining")
        names = [f"{TOPIC}[{p}]" for p in self.assignment]
        # librdkafka's view of the group (its statistics): up and steady for a member that got
        # its assignment while no rebalance is under way (the roll's gate reads it).
        steady = self.phase is Phase.MEMBER and self.got_assignment and not self.world.group.rebalancing
        self.world.say(self, m.Report(
            self.pid, state, names, None, sum(o + 1 for o in self.processed.values()), 0,
            {f"{TOPIC}[{p}]": o + 1 for p, o in self.processed.items()},
            {f"{TOPIC}[{p}]": c for p, c in self.committed.items()}, 30 << 20, at=self.world.wall(now),
            group_state="up" if self.phase is Phase.MEMBER else "", join_state="steady" if steady else "wait-join",
            group_seen_at=self.world.wall(now), rebalanced_at=self.world.wall(self.rebalanced_at)))


class World:
    """The core, the group, the workers and the clock; every check the simulation makes."""

    def __init__(self, protocol: GroupProtocol = GroupProtocol.CLASSIC, workers: int = 2, partitions: int = 4,
                 session_timeout: float = 60.0) -> None:
        self.settings = Settings(handler="sim:process", topics=(TOPIC,), group="g", workers=workers,
                                 broker_timeout=5.0, restart_delay=1.0, graceful_timeout=30.0, quick_timeout=5.0)
        self.partitions = partitions
        self.group = Group(protocol, partitions, session_timeout)
        self.now = 1000.0
        self.next_pid = 100
        self.workers: dict[WorkerSlot, SimWorker] = {}
        self.exited: list[SimWorker] = []
        self.all_workers: list[SimWorker] = []
        self.inbox: list[tuple[SimWorker, m.Message]] = []
        self.truth: dict[int, int] = {}       # partition -> last offset any handler finished
        self.committed: dict[int, int] = {}   # partition -> committed offset (next to read)
        self.next_plan = Plan()
        self.always_fail_since: float | None = None
        self.bad_boot_at: float | None = None  # a boot planned to fail/die/hang while starting
        self.last_fault = self.now
        self.unowned_since: dict[int, float] = {}
        self.stopping_since: float | None = None
        self.last_tick = self.now
        self.log: list[str] = []
        self.core = SupervisorCore(self.settings, self.now)
        self.apply(self.core.start(self.now))

    def wall(self, now: float) -> float:
        return now + 1_700_000_000.0

    # ---- the I/O loop's part ------------------------------------------------------------------

    def post(self, event: ev.Event) -> object:
        t0 = time.perf_counter()
        answer, actions = self.core.handle(event, self.now, self.wall(self.now))
        if time.perf_counter() - t0 > 1.0:  # generous: this machine is shared
            raise Violation(f"the core took {time.perf_counter() - t0:.2f}s on {event}: the loop blocked")
        self.apply(actions)
        return answer

    def apply(self, actions: list[ev.Action]) -> None:
        for action in actions:
            if isinstance(action, ev.Spawn):
                plan, self.next_plan = self.next_plan, Plan(handler_fails=self.always_fail_since is not None)
                if plan.boot is not Boot.OK:
                    self.last_fault = self.now  # the planned fault happens now, with this worker
                action.slot.pid = self.next_pid
                self.workers[action.slot] = SimWorker(self, action.slot, self.next_pid, plan, self.now)
                self.all_workers.append(self.workers[action.slot])
                self.next_pid += 1
            elif isinstance(action, ev.Send):
                if isinstance(action.msg, m.Go):
                    self.check_go(action.slot)
                worker = self.workers.get(action.slot)
                if worker is not None:
                    worker.receive(action.msg, self.now)
            elif isinstance(action, ev.Kill):
                worker = self.workers.get(action.slot)
                if worker is not None:
                    worker.signal(action.sig, self.now)

    def say(self, worker: SimWorker, msg: m.Message) -> None:
        self.inbox.append((worker, msg))

    def deliver(self) -> None:
        while self.inbox or self.exited:
            while self.inbox:
                worker, msg = self.inbox.pop(0)
                self.post(ev.WorkerMessage(worker.slot, msg))
            while self.exited and not self.inbox:
                worker = self.exited.pop(0)
                assert worker.exit_code is not None
                self.post(ev.WorkerExited(worker.slot, worker.exit_code))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end and self.core.state is not State.STOPPED:
            self.now = round(self.now + STEP_S, 6)
            self.group.tick(self.now)
            for worker in list(self.workers.values()):
                if worker.alive:
                    worker.step(self.now)
            self.deliver()
            if self.now - self.last_tick >= TICK_S:
                self.last_tick = self.now
                self.post(ev.Tick())
                self.deliver()
            self.check()

    # ---- faults -------------------------------------------------------------------------------

    def fault(self, what: str) -> None:
        self.log.append(f"t={self.now - 1000:.1f}: {what}")
        self.last_fault = self.now

    # ---- checks -------------------------------------------------------------------------------

    def check_go(self, slot: WorkerSlot) -> None:
        core = self.core
        if slot.then is After.REMOVE:
            raise Violation(f"worker {slot.index} told to join although it is being removed")
        ranked = sorted((s for s in core.slots if s.then is not After.REMOVE), key=lambda s: s.index)
        # A slot whose static member the group still holds (its process died) may rejoin above the
        # target: only a rejoin releases its partitions before the session expires.
        still_member = self.settings.static_membership and f"ksup-{slot.index}" in self.group.members
        if slot in ranked and ranked.index(slot) >= core.target_workers and core.state is State.RUNNING \
                and not still_member:
            raise Violation(f"worker {slot.index} told to join although the target is {core.target_workers} "
                            "workers (scale down already decided)")
        for other, worker in self.workers.items():
            if other is not slot and other.index == slot.index and worker.alive and other.joined:
                raise Violation(f"two live processes with instance id of slot {slot.index} in the group (fenced)")

    def check(self) -> None:
        core, now, s = self.core, self.now, self.settings
        if core.state is State.STOPPING and self.stopping_since is None:
            self.stopping_since = now
        if self.stopping_since is not None and core.state is not State.STOPPED:
            bound = s.graceful_timeout + s.quick_timeout + 10.0
            if now - self.stopping_since > bound:
                raise Violation(f"stop did not end within {bound:g}s")
        if self.bad_boot_at is not None and core.state is State.STARTING:
            bound = s.broker_timeout + 15.0 + 5.0
            if now - self.bad_boot_at > bound:
                raise Violation(f"a worker that cannot boot left ksup starting for {now - self.bad_boot_at:.0f}s")
        if self.always_fail_since is not None and core.state is State.RUNNING:
            bound = s.crash_loop_window + 30.0
            if now - self.always_fail_since > bound:
                raise Violation(f"an always-failing handler was not detected as a crash loop within {bound:g}s")
        # Availability: every partition has a live consumer within a bound after any change.
        bound = 8.0 + s.broker_timeout + 15.0 + 5.0  # backoff (4 deaths) + boot deadline + join
        for p in range(self.partitions):
            consumer = self.group.consumer_of(p)
            if consumer is not None or core.state is not State.RUNNING or self.always_fail_since is not None \
                    or self.group.held_by_departed_for_good(p, self.removed_instances()):
                self.unowned_since.pop(p, None)
                continue
            since = max(self.unowned_since.setdefault(p, now), self.last_fault)
            if now - since > bound:
                raise Violation(f"partition {p} without a consumer for {now - since:.0f}s (bound {bound:g}s)")
        if core.state is State.STOPPED:
            self.check_end()

    def check_no_ghosts_above_the_configured_workers(self) -> None:
        """After a graceful stop, no static member of a slot above the configured --workers is
        left in the group (nothing brings it back; it would hold its partitions from the next
        ksup until its session expires), unless a worker of that slot failed or was killed
        during the stop (then the session is all that is left). Classic only: KIP-848 refuses the
        rejoin of a dead member's instance id until its session expires (membership.must_rejoin)."""
        if not self.settings.static_membership or self.core.quick or self.stopping_since is None \
                or self.group.protocol is not GroupProtocol.CLASSIC:
            return
        since = self.stopping_since
        for instance in self.group.members:
            index = int(instance.rsplit("-", 1)[1])
            if index < self.settings.workers:
                continue
            during = [w for w in self.all_workers if w.slot.index == index
                      and (w.exited_at is None or w.exited_at >= since)]
            if any(w.killed or w.exit_code not in (0, None) for w in during):
                continue
            why = "its worker exited 0 without leaving" if during else "nobody rejoined to leave"
            raise Violation(f"{instance} (above the {self.settings.workers} configured workers) is still a member "
                            f"after the stop ({why})")

    def removed_instances(self) -> set[str]:
        kept = {f"ksup-{s.index}" for s in self.core.slots if s.then is not After.REMOVE}
        return {i for i in self.group.members if i not in kept}

    def check_end(self) -> None:
        left = [w.pid for w in self.workers.values() if w.alive]
        if left:
            raise Violation(f"processes left behind at exit: {left}")
        self.check_no_ghosts_above_the_configured_workers()
        code = self.core.final_code()
        receipt = self.core.receipt_body(code)["partitions"]
        for p, last in self.truth.items():
            entry = receipt.get(f"{TOPIC}[{p}]")
            if entry is None:
                raise Violation(f"partition {p} processed up to {last} but missing from the receipt")
            if entry["last_processed"] > last:
                raise Violation(f"receipt claims {entry} for partition {p}, processed only up to {last}")
        if self.core.exit_code is None:
            forced = any(w.killed and w.slot.in_final_drain for w in self.workers.values())
            if forced and int(code) != 4:
                raise Violation(f"workers were killed at the stop deadline, yet exit {int(code)}")
            unclean = [w for w in self.workers.values() if w.slot.in_final_drain and w.exit_code not in (0, None)]
            if unclean and int(code) == 0:
                raise Violation(f"worker {unclean[0].slot.index} ended its final drain with exit "
                                f"{unclean[0].exit_code}, yet ksup exits 0 (every worker drained cleanly)")
