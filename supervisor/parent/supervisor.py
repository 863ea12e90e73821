"""Supervisor: the parent's main loop. Start reading at ``run`` and ``tick``.

One loop does all the work; signal handlers only record (``signals.py``). Each tick waits for
any event (a signal, a worker message, worker output, a control-socket request), then performs
the duties in a fixed order: dispatch signals, reap exited workers (``worker_events.py``),
release drained workers, stop stuck workers, step a rolling reload (``rolling.py``), then
start/restart/recycle/scale workers one membership change at a time (``membership.py``). The
supervisor decides; workers obey.

Life cycle (``state.py``): STARTING (spawn N workers; they import the handler and check the
broker, then wait) -> RUNNING (all loaded: tell them Go) -> STOPPING (Drain sent; SIGKILL at the
deadline) -> STOPPED. A boot failure during STARTING halts before any worker joined the group.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import tempfile
import time
from collections import Counter

from supervisor import config as cfgmod
from supervisor.config import Settings
from supervisor.contract import inflight_board
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, describe_returncode
from supervisor.errors import HaltSupervisor
from supervisor.parent import membership, policy, readiness, rolling, worker_events, worker_output
from supervisor.parent.hooks import Hooks, NullHooks
from supervisor.parent.receipt import Receipt
from supervisor.parent.signals import SignalQueue
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.spawn import spawn_worker
from supervisor.parent.state import State

log = logging.getLogger("ksup.supervisor")

TICK_S = 0.5                    # longest sleep of the loop when nothing happens
STACK_DUMP_BEFORE_KILL_S = 1.0  # SIGUSR1 (the worker dumps its stacks) this long before SIGKILL


class Supervisor:
    def __init__(self, settings: Settings, log_format: str, hooks: Hooks | None = None) -> None:
        self.settings = settings
        self.log_format = log_format
        self.hooks = hooks or NullHooks()
        self.target_workers = settings.workers
        self.slots = [WorkerSlot(i) for i in range(settings.workers)]
        self.state = State.STARTING
        self.started_at = time.time()
        self.signals = SignalQueue()
        self.selector = selectors.DefaultSelector()
        self.receipt = Receipt()
        self.exit_code: ExitCode | None = None  # set by a halt; otherwise computed at the end
        self.halt_reason = ""
        self.stop_reason = ""
        self.deaths: list[float] = []
        self.forced = False
        self.quick = False
        self.last_tick = time.monotonic()
        self.roll: rolling.Roll | None = None
        self.partitions_total = 0  # of the subscribed topics, as the workers' metadata says
        self.board_dir = tempfile.mkdtemp(prefix="ksup-inflight-")
        self.poison_counts: Counter[tuple[str, int, int]] = Counter()
        self.poison: set[tuple[str, int, int]] = set()
        self.progress = readiness.Progress()  # committed offsets standing still (health)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self.signals.install()
        self.selector.register(self.signals.read_fd, selectors.EVENT_READ, None)
        log.info("starting %d worker(s) for %s: group %s, topics %s",
                 len(self.slots), self.settings.handler, self.settings.group, ",".join(self.settings.topics))
        try:
            self.hooks.on_start(self)
            for slot in self.slots:
                self.spawn(slot, time.monotonic())
            while self.state is not State.STOPPED:
                try:
                    self.tick(time.monotonic())
                except HaltSupervisor as halt:
                    self.halt(halt.reason, halt.exit_code)
        finally:
            self.kill_all_now()
            self.signals.uninstall()
            shutil.rmtree(self.board_dir, ignore_errors=True)
        code = self.exit_code if self.exit_code is not None else self.final_code()
        self.finish(code)
        return int(code)

    def tick(self, now: float) -> None:
        self.last_tick = now
        self.wait_for_events(TICK_S)
        self.dispatch_signals()
        now = time.monotonic()
        worker_events.reap_workers(self, now)
        self.release_leavers()
        self.murder_workers(now)
        if self.rolling():
            rolling.step(self, self.roll, now)  # type: ignore[arg-type]
        membership.manage(self, now)
        self.hooks.on_tick(self)

    def wait_for_events(self, timeout: float) -> None:
        """Sleep until a signal, a worker message or output, or a control request; handle it."""
        for key, _ in self.selector.select(timeout):
            data = key.data
            if data is None:
                continue  # the signal pipe: dispatch_signals reads it
            if callable(data):
                data()  # an adapter's handler (control socket)
            elif key.fileobj is data.channel:
                worker_events.read_messages(self, data)
            else:
                worker_output.read_stderr(data, self.selector)

    # ---- duties ---------------------------------------------------------------------------------

    def dispatch_signals(self) -> None:
        for signum in self.signals.take():
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

    def murder_workers(self, now: float) -> None:
        """Stop workers whose handler is stuck or whose loop went silent; SIGKILL workers past
        their drain deadline (just before, ask for their stacks so the log shows where)."""
        for slot in self.slots:
            if not slot.alive:
                continue
            if slot.drain_sent_at is None and self.state is State.RUNNING:
                problem = policy.stuck(slot, now, time.time(), self.settings)
                if problem:
                    slot.stuck_reason = problem
                    log.error("worker %d (pid %d) %s: stopping it", slot.index, slot.pid, problem)
                    self.drain_slot(slot, problem, wait_s=0.0, deadline_s=self.settings.quick_timeout + 5.0)
                    if "silent" in problem:
                        slot.kill_at = now + STACK_DUMP_BEFORE_KILL_S  # its loop cannot drain
            if slot.kill_at is None or now < slot.kill_at - STACK_DUMP_BEFORE_KILL_S:
                continue
            if not slot.stacks_asked:
                slot.stacks_asked = True
                self.kill(slot, signal.SIGUSR1)
            if now >= slot.kill_at and not slot.killed:
                inflight = slot.report.in_flight if slot.report else None
                log.error("worker %d (pid %d) did not stop in time: SIGKILL%s", slot.index, slot.pid,
                          f" (in flight: {worker_output.coords(inflight)})" if inflight else "")
                self.kill(slot, signal.SIGKILL)
                slot.killed = True
                if self.state is State.STOPPING:
                    self.forced = True

    # ---- actions --------------------------------------------------------------------------------

    def configure_for(self, index: int) -> m.Configure:
        """What a new worker in slot ``index`` is told: settings, its in-flight board, poison."""
        s = self.settings
        board = os.path.join(self.board_dir, f"slot-{index}-{time.monotonic_ns()}")
        inflight_board.create(board, s.concurrency)
        options = {**cfgmod.worker_options(s, self.log_format), "board": board,
                   "poison": [list(p) for p in sorted(self.poison)]}
        return m.Configure(index, s.handler, list(s.topics), cfgmod.kafka_config(s, index), options)

    def spawn(self, slot: WorkerSlot, now: float) -> None:
        configure = self.configure_for(slot.index)
        proc, channel = spawn_worker(configure)
        slot.configure = configure
        slot.reset_for_spawn(proc, channel, now)
        if self.settings.max_messages:
            slot.recycle_after = policy.jittered(self.settings.max_messages, slot.index, slot.restarts)
        self.selector.register(channel, selectors.EVENT_READ, slot)
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        self.selector.register(proc.stderr, selectors.EVENT_READ, slot)
        log.info("worker %d started (pid %d)", slot.index, proc.pid)

    def go(self, slot: WorkerSlot) -> None:
        if slot.channel is not None:
            slot.channel.send(m.Go())
        slot.joined = True
        slot.advance("running")

    def drain_slot(self, slot: WorkerSlot, reason: str, wait_s: float, deadline_s: float) -> None:
        """Ask one worker to drain (Drain over the pipe plus SIGTERM, which also reaches a worker
        still booting); SIGKILL it if it has not exited ``deadline_s`` from now."""
        if slot.channel is not None:
            slot.channel.send(m.Drain(wait_s, reason))
        self.kill(slot, signal.SIGTERM)
        now = time.monotonic()
        slot.drain_sent_at = slot.drain_sent_at or now
        slot.kill_at = min(slot.kill_at or now + deadline_s, now + deadline_s)
        slot.advance("draining")

    def stop(self, reason: str, quick: bool, timeout: float | None = None) -> None:
        """Ask every worker to drain. Idempotent; a quick stop shortens the deadlines."""
        if self.state is State.STOPPING and (self.quick or not quick):
            return
        self.stop_reason = self.stop_reason or reason
        self.quick = self.quick or quick
        self.state = State.STOPPING
        s = self.settings
        graceful = timeout if timeout is not None else s.graceful_timeout
        wait, deadline = (s.quick_timeout, s.quick_timeout + 5.0) if quick else \
            (cfgmod.drain_wait(graceful), graceful)
        if self.roll is not None and not self.roll.done:
            if self.roll.incoming is not None and self.roll.incoming not in self.slots:
                self.kill(self.roll.incoming, signal.SIGKILL)  # booted only: it never joined
                rolling.forget(self, self.roll.incoming)
            rolling.finish(self, self.roll, f"interrupted: {reason}")
        log.info("%s: draining %d worker(s) (deadline %.0fs)", reason,
                 sum(1 for x in self.slots if x.alive), deadline)
        self.hooks.on_stopping(self)
        for slot in self.slots:
            slot.respawn_at = None
            if slot.alive:
                # A worker that never joined (still booting) has nothing to commit: however it
                # ends (even killed by this SIGTERM before its handler is installed) is no failure.
                slot.in_final_drain = slot.joined
                self.drain_slot(slot, reason, wait, deadline)

    def rolling(self) -> bool:
        return self.roll is not None and not self.roll.done

    def reload(self) -> str | None:
        """Start a rolling reload; returns an error message when refused."""
        if self.state is not State.RUNNING:
            return f"cannot reload while {self.state.value}"
        if self.rolling():
            return "a rolling reload is already in progress"
        self.roll = rolling.start_roll(self)
        self.hooks.on_reload_start(self)
        return None

    def scale(self, workers: int) -> str | None:
        """Set the number of workers; manage_workers gets there one change at a time. Returns an
        error message when refused."""
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

    def release_leavers(self) -> None:
        """Let drained workers close. During a stop, only once every worker that is still in the
        group has committed; otherwise (one worker draining alone) at once."""
        in_group = [s for s in self.slots if s.alive and s.joined]
        if self.state is State.STOPPING and not all(s.ready_to_leave for s in in_group):
            return
        for slot in in_group:
            if slot.ready_to_leave and not slot.leave_sent and slot.channel is not None:
                slot.channel.send(m.Leave())
                slot.leave_sent = True

    def kill(self, slot: WorkerSlot, sig: int) -> None:
        if slot.proc is not None and slot.proc.poll() is None:
            try:
                slot.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill_all_now(self) -> None:
        """Last resort on the way out (also after a bug in the loop): no worker outlives us."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                self.kill(slot, signal.SIGKILL)
                slot.proc.wait(10)
            if slot.proc is not None:
                worker_output.read_stderr(slot, self.selector, final=True)

    # ---- the end ----------------------------------------------------------------------------------

    def final_reason(self, code: ExitCode) -> str:
        """One line for the operator when the exit code is not 0."""
        if self.halt_reason:
            return self.halt_reason
        for slot in self.slots:
            if slot.killed and slot.in_final_drain:
                return f"worker {slot.index} did not drain within --graceful-timeout and was killed"
            if slot.exiting is not None and slot.exiting.exit_code != 0:
                return f"worker {slot.index}: {slot.exiting.reason} (exit {slot.exiting.exit_code})"
        return code.name.lower()

    def final_code(self) -> ExitCode:
        # Only the workers this stop drained: one that died earlier was logged (and restarting).
        codes = [describe_returncode(s.proc.returncode).code for s in self.slots
                 if s.proc is not None and s.proc.returncode is not None and s.in_final_drain]
        return policy.final_exit_code(codes, self.forced)

    def finish(self, code: ExitCode) -> None:
        reason = self.stop_reason or "stopped"
        body = self.receipt.as_dict(int(code), reason)
        log.info("shutdown receipt: exit %d (%s)", int(code), code.name, extra={"receipt": body})
        if self.settings.receipt:
            self.receipt.write(self.settings.receipt, int(code), reason)
        self.hooks.on_exit(self, int(code))
