"""SupervisorCore: every decision of the supervisor process, sans I/O.

Events in (``events.py``: a worker's message or exit, a signal, a tick of the clock, a control
command), each with ``now`` from an injected monotonic clock; actions out (spawn, send, kill,
notify). The core never touches a process, a socket or the real clock, so tests drive it
through any order of events (``tests/sim``). The I/O loop is ``supervisor.py``.

Each rule lives in one place:
- the membership rule (start, restart, recycle, scale): ``membership.py``;
- a worker's messages and exit, the crash-loop rule: ``worker_events.py`` + ``policy.py``;
- the rolling reload: ``rolling.py``;
- stuck and silent workers, boot deadlines: ``policy.py`` (decided here, in ``watch``);
- readiness and health of the group: ``readiness.py`` (partitions held by departed members:
  ``note_departure`` here).
"""

from __future__ import annotations

import logging
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from supervisor import config as cfgmod
from supervisor.config import Settings
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode
from supervisor.errors import HaltSupervisor
from supervisor.parent import events as ev
from supervisor.parent import membership, policy, rolling, worker_events
from supervisor.parent.receipt import Receipt
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.state import After, RollPhase, SlotState, State

log = logging.getLogger("ksup.supervisor")

STACK_DUMP_BEFORE_KILL_S = 1.0  # SIGUSR1 (the worker dumps its stacks) this long before SIGKILL
QUICK_EXTRA_S = 5.0             # a quick stop's SIGKILL comes this long after --quick-timeout


class SupervisorCore:
    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.now = now
        self.wall = 0.0
        self.target_workers = settings.workers
        self.slots = [WorkerSlot(i) for i in range(settings.workers)]
        self.strays: list[WorkerSlot] = []  # processes outside the slot list, still to be reaped
        self.state = State.STARTING
        self.receipt = Receipt()
        self.exit_code: ExitCode | None = None  # set by a halt; otherwise computed at the end
        self.halt_reason = ""
        self.stop_reason = ""
        self.deaths: list[float] = []
        self.forced = False
        self.quick = False
        self.stop_deadline_at: float | None = None  # the stop's drain deadline (monotonic)
        self.leftovers_waiting: tuple[int, ...] = ()  # leftover members found while starting (add_leftovers)
        self.roll: rolling.Roll | None = None
        # partition -> (worker index, since, session expiry): held by a member that went without
        # leaving the group (see note_departure)
        self.departed: dict[str, tuple[int, float, float]] = {}
        self.partitions_total = 0  # of the subscribed topics, as the workers' metadata says
        self.poison_counts: Counter[tuple[str, int, int]] = Counter()
        self.poison: set[tuple[str, int, int]] = set()
        self.suspects: set[tuple[str, int, int]] = set()  # see worker_events.note_poison
        self.actions: list[ev.Action] = []
        self._dispatch: dict[type, Callable[[Any], Any]] = {
            ev.WorkerMessage: lambda e: worker_events.on_message(self, e.slot, e.msg),
            ev.WorkerExited: lambda e: worker_events.on_exit(self, e),
            ev.SignalReceived: lambda e: self.on_signal(e.signum),
            ev.Tick: lambda e: self.tick(),
            ev.Scale: lambda e: self.scale(e.workers),
            ev.Reload: lambda e: self.reload(),
            ev.Stop: lambda e: self.stop(e.reason, e.quick, e.timeout),
            ev.LeftoverMembers: lambda e: self.add_leftovers(e.slots),
        }

    # ---- the one entry point ------------------------------------------------------------------

    def handle(self, event: ev.Event, now: float, wall: float | None = None) -> tuple[Any, list[ev.Action]]:
        """Apply one event at monotonic time ``now`` (``wall``: the wall clock, which workers use
        for in-flight ages): returns (the event's answer, the actions to carry out, in order). A
        command's answer is an error message or None; other events answer None."""
        self.wall = wall if wall is not None else self.wall + max(now - self.now, 0.0)
        self.now = max(self.now, now)
        answer = None
        try:
            answer = self._dispatch[type(event)](event)
        except HaltSupervisor as halt:
            self.halt(halt.reason, halt.exit_code)
        out, self.actions = self.actions, []
        return answer, out

    def start(self, now: float) -> list[ev.Action]:
        self.now = now
        log.info("starting %d worker(s) for %s: group %s, topics %s", len(self.slots), self.settings.handler,
                 self.settings.group, ",".join(self.settings.topics))
        for slot in self.slots:
            self.spawn(slot)
        out, self.actions = self.actions, []
        return out

    def add_leftovers(self, slots: tuple[int, ...]) -> None:
        """The leftover members a previous ksup left (ev.LeftoverMembers): see
        membership.add_leftovers. While starting they wait until the configured workers were told
        Go: a best-effort cleanup must neither delay nor fail the start."""
        if self.state is State.STARTING:
            self.leftovers_waiting = slots
        elif self.state is State.RUNNING:
            membership.add_leftovers(self, slots)

    # ---- duties on every tick -----------------------------------------------------------------

    def tick(self) -> None:
        self.note_coverage()
        self.release_leavers()
        self.watch()
        if self.rolling():
            assert self.roll is not None
            rolling.step(self, self.roll)
        membership.manage(self)

    def watch(self) -> None:
        """Stop workers whose handler is stuck, whose loop went silent or whose boot is past its
        deadline; SIGKILL workers past their drain deadline (just before, ask for their stacks
        so the log shows where)."""
        now = self.now
        for slot in self.processes():
            if not slot.alive:
                continue
            if slot.drain_sent_at is None and slot.state is SlotState.BOOTING \
                    and now - slot.spawned_at > policy.boot_deadline(self.settings):
                self.boot_overdue(slot)
            if slot.drain_sent_at is None and self.state is State.RUNNING:
                problem = policy.stuck(slot, now, self.wall, self.settings)
                if problem:
                    slot.stuck_reason = problem
                    log.error("worker %d (pid %s) %s: stopping it", slot.index, slot.pid, problem)
                    self.drain_slot(slot, problem, wait_s=0.0, deadline_s=self.settings.quick_timeout + QUICK_EXTRA_S)
                    if "silent" in problem:
                        slot.kill_at = now + STACK_DUMP_BEFORE_KILL_S  # its loop cannot drain
            if slot.kill_at is None or now < slot.kill_at - STACK_DUMP_BEFORE_KILL_S:
                continue
            if not slot.stacks_asked:
                slot.stacks_asked = True
                self.kill(slot, signal.SIGUSR1)
            if now >= slot.kill_at and not slot.killed:
                inflight = slot.report.in_flight if slot.report else None
                log.error("worker %d (pid %s) did not stop in time: SIGKILL%s", slot.index, slot.pid,
                          f" (in flight: {worker_events.coords(inflight)})" if inflight else "")
                self.kill(slot, signal.SIGKILL, group=True)
                slot.killed = True
                if self.state is State.STOPPING and not slot.rejoins_to_leave:
                    self.forced = True  # (one only rejoining held no message: killing it loses nothing)

    def boot_overdue(self, slot: WorkerSlot) -> None:
        """A worker that has not loaded the handler within the boot deadline (it hangs at import,
        or cannot reach the broker and ignores its own timeout): kill it. While starting, that
        halts (exit 3); later it is a death like any other (restart, crash loop); an incoming
        worker of a rolling reload stops the roll (``rolling.py``)."""
        limit = policy.boot_deadline(self.settings)
        slot.stuck_reason = f"did not load the handler within {limit:g}s (hangs at import?)"
        log.error("worker %d (pid %s) %s: killing it", slot.index, slot.pid, slot.stuck_reason)
        self.kill(slot, signal.SIGKILL, group=True)
        slot.killed = True
        slot.drain_sent_at = self.now
        if self.state is State.STARTING and slot in self.slots:
            raise HaltSupervisor(f"worker {slot.index} {slot.stuck_reason}", ExitCode.BOOT_FAILED)

    # ---- actions ------------------------------------------------------------------------------

    def spawn(self, slot: WorkerSlot) -> None:
        slot.reset_for_spawn(self.now)
        if self.settings.max_messages:
            slot.recycle_after = policy.jittered(self.settings.max_messages, slot.index, slot.restarts)
        self.actions.append(ev.Spawn(slot, tuple(sorted(self.poison)), tuple(sorted(self.suspects - self.poison))))

    def send(self, slot: WorkerSlot, msg: m.ToWorker) -> None:
        self.actions.append(ev.Send(slot, msg))

    def kill(self, slot: WorkerSlot, sig: int, group: bool = False) -> None:
        if slot.alive:
            self.actions.append(ev.Kill(slot, sig, group))

    def kill_group_of_exited(self, slot: WorkerSlot) -> None:
        """After a worker exited: SIGTERM what it left behind in its session (its process group;
        workers run in sessions of their own), so a handler's helpers never outlive it."""
        if slot.pid is not None:
            self.actions.append(ev.Kill(slot, signal.SIGTERM, group=True))

    def notify(self, name: str, *args: Any) -> None:
        self.actions.append(ev.Notify(name, args))

    def go(self, slot: WorkerSlot) -> None:
        self.send(slot, m.Go())
        slot.joined = slot.member = True
        slot.advance(SlotState.RUNNING)

    def drain_slot(self, slot: WorkerSlot, reason: str, wait_s: float, deadline_s: float,
                   sigterm: bool = True) -> None:
        """Ask one worker to drain (Drain over the pipe plus SIGTERM, which also reaches a worker
        still booting); SIGKILL it if it has not exited ``deadline_s`` from now."""
        self.send(slot, m.Drain(wait_s, reason, deadline_s, leave_group=self.leaves_for_good(slot)))
        if sigterm:
            self.kill(slot, signal.SIGTERM)
        now = self.now
        slot.drain_sent_at = slot.drain_sent_at or now
        slot.kill_at = min(slot.kill_at or now + deadline_s, now + deadline_s)
        slot.advance(SlotState.DRAINING)

    def rejoin_and_leave(self, slot: WorkerSlot) -> None:
        """Go, then Drain with LeaveGroup at once, over the pipe only: a SIGTERM could overtake
        the Go, and a worker drained before it subscribed never joins, so never leaves. The
        worker finishes its join before it leaves (drain.finish_join) and takes no work."""
        self.go(slot)
        deadline_s = (slot.kill_at or self.now) - self.now  # set when it was started to rejoin
        self.drain_slot(slot, f"{self.stop_reason or 'stop'}: rejoined only to leave the group", 0.0,
                        deadline_s, sigterm=False)

    def leaves_for_good(self, slot: WorkerSlot) -> bool:
        """A slot scaled away for good leaves the group even as a static member; so does, at a
        stop, a slot above the configured --workers (added by scaling up): a restart will not
        bring it back, and its member would hold its partitions until the session expires."""
        return slot.then is After.REMOVE or (self.state is State.STOPPING and slot.index >= self.settings.workers)

    def release_leavers(self) -> None:
        """Let drained workers close. During a stop, only once every worker that is still in the
        group has committed; otherwise (one worker draining alone) at once."""
        in_group = [s for s in self.slots if s.alive and s.joined]
        if self.state is State.STOPPING and not all(s.ready_to_leave for s in in_group):
            return
        for slot in in_group:
            if slot.ready_to_leave and not slot.leave_sent:
                self.send(slot, m.Leave(leave_group=self.leaves_for_good(slot)))
                slot.leave_sent = True

    # ---- commands -----------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and self.state is not State.STOPPING:
            self.stop(f"{signal.Signals(signum).name} received", quick=False)
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            self.stop(f"{signal.Signals(signum).name} received: quick stop", quick=True)
        elif signum == signal.SIGHUP:
            error = self.reload()
            if error:
                log.warning("SIGHUP: %s", error)
        elif signum == signal.SIGTTIN:
            self.scale(self.target_workers + 1)
        elif signum == signal.SIGTTOU:
            self.scale(self.target_workers - 1)

    def stop(self, reason: str, quick: bool, timeout: float | None = None) -> None:
        """Ask every worker to drain. Idempotent; a quick stop, or a stop with a ``timeout`` that
        ends sooner than the stop under way (`ksup stop --timeout`), shortens the deadlines."""
        sooner = timeout is not None and self.state is State.STOPPING and \
            self.now + timeout < (self.stop_deadline_at or float("inf"))
        if self.state in (State.STOPPING, State.STOPPED) and (self.quick or not quick) and not sooner:
            return
        if self.state is State.STOPPED:
            return
        self.stop_reason = self.stop_reason or reason
        self.quick = self.quick or quick
        self.state = State.STOPPING
        s = self.settings
        graceful = timeout if timeout is not None else s.graceful_timeout
        wait, deadline = (s.quick_timeout, s.quick_timeout + QUICK_EXTRA_S) if quick else \
            (cfgmod.drain_wait(graceful), graceful)
        self.stop_deadline_at = self.now + deadline
        if self.roll is not None and self.roll.phase is not RollPhase.DONE:
            incoming = self.roll.incoming
            if incoming is not None and incoming not in self.slots:
                self.kill(incoming, signal.SIGKILL, group=True)  # booted only: it never joined
                incoming.killed = True
                self.strays.append(incoming)
            rolling.finish(self, self.roll, f"interrupted: {reason}")
        log.info("%s: draining %d worker(s) (deadline %.0fs)", reason, sum(1 for x in self.slots if x.alive), deadline)
        self.notify("on_stopping")
        for slot in self.slots:
            slot.respawn_at = None
            if slot.alive:
                # A worker that never joined (still booting) has nothing to commit: however it
                # ends (even killed by this SIGTERM before its handler is installed) is no failure.
                slot.in_final_drain = slot.in_final_drain or slot.joined
                # One that never joined has nothing to commit: it gets the quick deadline. One
                # already draining (a shorter stop) gets the new deadline over the pipe only.
                self.drain_slot(slot, reason, wait, deadline if slot.joined else min(deadline, s.quick_timeout),
                                sigterm=slot.drain_sent_at is None)
        membership.manage(self)  # nothing alive: STOPPED at once

    def reload(self) -> str | None:
        """Start a rolling reload; returns an error message when refused."""
        if self.state is not State.RUNNING:
            return f"cannot reload while {self.state.value}"
        if self.rolling():
            return "a rolling reload is already in progress"
        self.roll = rolling.start_roll(self)
        self.notify("on_reload_start")
        return None

    def scale(self, workers: int) -> str | None:
        """Set the number of workers; the membership rule gets there. Returns an error message
        when refused."""
        if workers < 1:
            return f"cannot scale to {workers}: at least 1 worker"
        if self.state not in (State.STARTING, State.RUNNING):
            return f"cannot scale while {self.state.value}"
        log.info("scaling from %d to %d workers", self.target_workers, workers)
        self.target_workers = workers
        return None

    def halt(self, reason: str, code: ExitCode) -> None:
        if self.exit_code is None:
            log.error("stopping: %s", reason)
            self.exit_code, self.halt_reason = code, reason
        self.stop(reason, quick=self.state is State.STARTING)

    # ---- queries ------------------------------------------------------------------------------

    def processes(self) -> list[WorkerSlot]:
        """Every worker process the core still answers for: the slots, a rolling reload's
        incoming process, and killed strays not reaped yet."""
        out = list(self.slots)
        if self.roll is not None and self.roll.incoming is not None and self.roll.incoming not in out:
            out.append(self.roll.incoming)
        out += [s for s in self.strays if s.alive and s not in out]
        return out

    def rolling(self) -> bool:
        return self.roll is not None and self.roll.phase is not RollPhase.DONE

    def note_departure(self, slot: WorkerSlot, clean: bool) -> None:
        """Remember the partitions a worker held when it went without leaving the group (died, or
        drained as a static member that comes back): until its session expires, the broker
        keeps them with that member and nobody consumes them, in this ksup or any other of the
        group. A member that left for good (scale-down, or a dynamic member's close) is not
        noted: the group rebalanced its partitions to the others at once."""
        report = slot.report
        if self.state is not State.RUNNING or report is None or not report.assignment:
            return
        left_group = clean and (slot.then is After.REMOVE or not self.settings.static_membership)
        if left_group:
            return
        until = self.now + policy.session_timeout_s(self.settings)
        for name in report.assignment:
            self.departed[name] = (slot.index, self.now, until)

    def note_coverage(self) -> None:
        """Forget departed members' partitions that a worker of ours owns again or whose session
        has expired (the group then gives them to a live member, perhaps of another ksup)."""
        if not self.departed:
            return
        owned = {p for s in self.slots if s.alive and s.report is not None for p in s.report.assignment}
        for name, (_, _, until) in list(self.departed.items()):
            if name in owned or self.now >= until or self.state is not State.RUNNING:
                del self.departed[name]

    def coverage_problem(self, grace_s: float) -> str | None:
        """The health rule's part about partitions: a departed member has held some for
        ``grace_s`` with nobody consuming them (fleet-safe: it never assumes this ksup owns
        every partition of the topics)."""
        held = [(index, since, until) for index, since, until in self.departed.values() if self.now - since >= grace_s]
        if not held:
            return None
        index, since, until = min(held, key=lambda h: h[1])
        return (f"{len(held)} partition(s) without a consumer for {self.now - since:.0f}s: the departed member of "
                f"worker {index} holds them until its session expires (in {until - self.now:.0f}s)")

    # ---- the end ------------------------------------------------------------------------------

    def final_code(self) -> ExitCode:
        if self.exit_code is not None:
            return self.exit_code
        # Only the workers this stop drained: one that died earlier was logged (and restarting).
        # Each is judged as a reload judges its old worker (worker_events.drain_verdict).
        verdicts = [worker_events.drain_verdict(s) for s in self.slots if s.in_final_drain]
        return policy.worst([*(v[0] for v in verdicts if v is not None), *([ExitCode.FORCED] if self.forced else [])])

    def final_reason(self, code: ExitCode) -> str:
        """One line for the operator when the exit code is not 0. When the graceful timeout
        killed workers, it names the one that was still busy (its drain never got to commit),
        not merely the first killed: the others were killed waiting for it."""
        if self.halt_reason:
            return self.halt_reason
        killed = [s for s in self.slots if s.killed and s.in_final_drain]
        if killed:
            stuck = [s for s in killed if not s.ready_to_leave] or killed
            first = stuck[0]
            inflight = first.report.in_flight if first.report else None
            text = f"worker {first.index} did not drain within --graceful-timeout and was killed" + \
                (f" (in flight: {worker_events.coords(inflight)})" if inflight else "")
            others = [s.index for s in killed if s is not first]
            if others:
                text += f"; also killed: worker(s) {', '.join(map(str, others))}" + \
                    (" (drained, waiting to leave together)" if all(s.ready_to_leave for s in killed
                                                                     if s is not first) else "")
            return text
        for slot in self.slots:
            verdict = worker_events.drain_verdict(slot) if slot.in_final_drain else None
            if verdict is not None and verdict[0] is code:
                return f"worker {slot.index}: {verdict[1]}"
        return code.name.lower()

    def receipt_body(self, code: ExitCode) -> dict[str, Any]:
        return self.receipt.as_dict(int(code), self.stop_reason or "stopped")
