"""Supervisor: the parent's main loop. Start reading at ``run`` and ``tick``.

One loop does all the work; signal handlers only record (``signals.py``). Each tick waits for
any event (a signal, a worker message, worker output, a control-socket request), then performs
the duties in a fixed order: dispatch signals, reap exited workers, release drained workers,
stop stuck workers, start/restart/recycle/scale workers. The supervisor decides; workers obey.

Life cycle: STARTING (spawn N workers; they import the handler and check the broker, then wait)
-> RUNNING (all loaded: tell them Go) -> STOPPING (Drain sent; SIGKILL at the deadline) ->
STOPPED. A boot failure during STARTING halts before any worker joined the group.
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
from enum import Enum

from supervisor import config as cfgmod
from supervisor.config import Settings
from supervisor.contract import inflight_board
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, WorkerExit, describe_returncode
from supervisor.errors import HaltSupervisor
from supervisor.parent import policy, rolling, worker_output
from supervisor.parent.hooks import Hooks, NullHooks
from supervisor.parent.receipt import Receipt
from supervisor.parent.signals import SignalQueue
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.spawn import spawn_worker

log = logging.getLogger("ksup.supervisor")

TICK_S = 0.5                    # longest sleep of the loop when nothing happens
STACK_DUMP_BEFORE_KILL_S = 1.0  # SIGUSR1 (the worker dumps its stacks) this long before SIGKILL
CHANGE_SETTLE_MAX_S = 60.0      # a membership change counts as done after this long regardless


class State(Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


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
        self.reap_workers(now)
        self.release_leavers()
        self.murder_workers(now)
        if self.rolling():
            rolling.step(self, self.roll, now)  # type: ignore[arg-type]
        self.manage_workers(now)
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
                self.read_messages(data)
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

    def read_messages(self, slot: WorkerSlot) -> None:
        assert slot.channel is not None
        for msg in slot.channel.read_available():
            self.on_message(slot, msg)
        if slot.channel.closed:
            try:
                self.selector.unregister(slot.channel)
            except (KeyError, ValueError):
                pass
            slot.channel.close()

    def on_message(self, slot: WorkerSlot, msg: m.Message) -> None:
        if isinstance(msg, m.Report):
            slot.report, slot.report_at = msg, time.monotonic()
            if msg.state in ("assigned", "draining") and slot.assigned_at is None:
                slot.assigned_at = time.monotonic()
        elif isinstance(msg, m.Loaded):
            slot.advance("loaded")
            self.partitions_total = msg.partitions
            slot.handler_version = msg.handler_version
            slot.report_at = time.monotonic()
            log.info("worker %d (pid %d) loaded %s (confluent-kafka %s)",
                     slot.index, msg.pid, msg.handler, msg.client_version)
        elif isinstance(msg, m.BootFailed):
            slot.boot_failed = msg
            if slot not in self.slots:
                return  # an incoming worker of a rolling reload: the roll stops, the old one stays
            # A worker that cannot even import the handler will not do better on a restart.
            if self.state is State.STARTING or msg.exit_code != WorkerExit.BROKER_UNREACHABLE:
                raise HaltSupervisor(msg.reason, policy.halt_code_for_boot_failure(msg.exit_code))
        elif isinstance(msg, m.ReadyToLeave):
            slot.ready_to_leave = True
            self.release_leavers()
        elif isinstance(msg, m.Exiting):
            slot.exiting = msg
            self.receipt.add(slot.index, msg)

    def reap_workers(self, now: float) -> None:
        """Collect exited workers; log each death with its cause; decide what follows."""
        for slot in list(self.slots):
            if slot.proc is None or slot.state == "exited" or slot.proc.poll() is None:
                continue
            if slot.channel is not None and not slot.channel.closed:
                self.read_messages(slot)
            worker_output.read_stderr(slot, self.selector, final=True)
            report = describe_returncode(slot.proc.returncode)
            slot.state = "exited"
            self.hooks.on_worker_exit(self, slot, report)
            clean = report.code == 0 and slot.drain_sent_at is not None
            if clean:
                log.info("worker %d (pid %d) exited: %s", slot.index, slot.pid,
                         slot.exiting.reason if slot.exiting else report.describe())
            else:
                inflight = self.note_poison(slot) if self.state is State.RUNNING else ""
                log.log(logging.WARNING if self.state is State.STOPPING else logging.ERROR,
                        "worker %d (pid %d) %s%s%s%s", slot.index, slot.pid, report.describe(),
                        worker_output.last_moments(slot), f"; in flight at death: {inflight}" if inflight else "",
                        worker_output.stderr_tail(slot))
            self.after_exit(slot, now, clean, report.describe())

    def after_exit(self, slot: WorkerSlot, now: float, clean: bool, how: str) -> None:
        if self.state is not State.RUNNING or slot.then == "replaced":
            return  # a replaced slot's successor is put in place by the rolling reload
        if slot.then == "remove":
            self.slots.remove(slot)
            log.info("worker slot %d removed (%d workers)", slot.index, len(self.slots))
            return
        if slot.then == "recycle" and clean:
            slot.respawn_at = now
            return
        slot.deaths.append(now)
        self.deaths.append(now)
        if policy.is_crash_loop(self.deaths, now, self.settings.crash_loop_deaths, self.settings.crash_loop_window):
            raise HaltSupervisor(f"crash loop: {self.settings.crash_loop_deaths} worker deaths within "
                                 f"{self.settings.crash_loop_window:g}s; last: {how}", ExitCode.CRASH_LOOP)
        delay = policy.restart_delay(slot.deaths, now, self.settings.restart_delay)
        slot.respawn_at = now + delay
        log.info("worker %d restarts in %.1fs", slot.index, delay)

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

    def manage_workers(self, now: float) -> None:
        """Start, restart, recycle and scale workers: at most one group-membership change at a
        time, so the group rebalances once per change instead of in a storm."""
        if self.state is State.STOPPING:
            if not any(s.alive for s in self.slots):
                self.state = State.STOPPED
            return
        if self.state is State.STARTING:
            if all(s.state == "loaded" for s in self.slots):
                self.state = State.RUNNING
                log.info("all %d workers loaded: joining group %s", len(self.slots), self.settings.group)
                for slot in self.slots:
                    self.go(slot)
            return
        for slot in self.slots:
            if slot.state == "loaded" and not slot.joined:
                self.go(slot)
        if self.rolling() or self.change_in_progress(now):
            return
        for slot in self.slots:
            if not slot.alive and slot.respawn_at is not None and now >= slot.respawn_at:
                slot.restarts += 1
                self.spawn(slot, now)
                return
        if any(not s.alive and s.respawn_at is not None for s in self.slots):
            # A dead worker's (static) membership holds up every rebalance until it is back or its
            # session expires: bring it back before anything else changes the group.
            return
        if len(self.slots) < self.target_workers:
            used = {s.index for s in self.slots}
            slot = WorkerSlot(min(i for i in range(len(self.slots) + 1) if i not in used))
            self.slots.append(slot)
            self.slots.sort(key=lambda s: s.index)
            self.spawn(slot, now)
            return
        live = [s for s in self.slots if s.then != "remove"]
        if len(live) > self.target_workers:
            victim = max(live, key=lambda s: s.index)
            victim.then = "remove"
            if victim.alive:
                self.drain_slot(victim, "scale down", self.settings.worker_drain_timeout,
                                self.settings.graceful_timeout)
            else:
                self.slots.remove(victim)
            return
        for slot in self.slots:
            why = policy.recycle_reason(slot, self.settings)
            if slot.alive and slot.joined and why:
                slot.then = "recycle"
                log.info("worker %d (pid %d) recycles: %s", slot.index, slot.pid, why)
                self.drain_slot(slot, f"recycle: {why}", self.settings.worker_drain_timeout,
                                self.settings.graceful_timeout)
                return

    def change_in_progress(self, now: float) -> bool:
        """A worker is booting, joining (no assignment yet) or draining out of the group."""
        for s in self.slots:
            if s.alive and (s.drain_sent_at is not None or s.assigned_at is None) \
                    and now - s.spawned_at < CHANGE_SETTLE_MAX_S:
                return True
        return False

    # ---- actions --------------------------------------------------------------------------------

    def configure_for(self, index: int) -> m.Configure:
        """What a new worker in slot ``index`` is told: settings, its in-flight board, poison."""
        s = self.settings
        board = os.path.join(self.board_dir, f"slot-{index}-{time.monotonic_ns()}")
        inflight_board.create(board, s.concurrency)
        options = {**cfgmod.worker_options(s, self.log_format), "board": board,
                   "poison": [list(p) for p in sorted(self.poison)]}
        return m.Configure(index, s.handler, list(s.topics), cfgmod.kafka_config(s, index), options)

    def note_poison(self, slot: WorkerSlot) -> str:
        """After a worker died: count a death against each message it had in flight (read from
        its in-flight board); a message at --poison-after deaths goes to dead-letter/skip next
        time. Returns the in-flight messages, for the log."""
        board = slot.configure.options.get("board") if slot.configure else None
        inflight = inflight_board.read(str(board)) if board else []
        for key in inflight:
            self.poison_counts[key] += 1
            fallback = [p for p in self.settings.on_error if p in ("dead-letter", "skip")]
            if self.poison_counts[key] >= self.settings.poison_after and fallback and key not in self.poison:
                self.poison.add(key)
                log.error("%s[%d]@%d killed %d worker processes: the next worker will %s it without "
                          "running the handler", *key, self.poison_counts[key], fallback[0])
        return ", ".join(f"{t}[{p}]@{o}" for t, p, o in inflight)

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

    def settled(self) -> bool:
        """Every worker has joined and reported an assignment, and together they own every
        partition: the group is not in the middle of a rebalance."""
        alive = [s for s in self.slots if s.alive]
        if not alive or any(s.assigned_at is None or s.report is None for s in alive):
            return False
        owned = {p for s in alive if s.report is not None for p in s.report.assignment}
        return len(owned) >= self.partitions_total

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
