"""Supervisor: the parent's main loop. Start reading at ``run`` and ``tick``.

One loop does all the work; signal handlers only record (``signals.py``). Each tick waits for
any event (a signal, a worker message, worker stderr), then performs the duties in a fixed order:
dispatch signals, read worker messages, reap exited workers, kill workers past their deadline,
start or restart workers. The supervisor decides; workers obey.

Life cycle: STARTING (spawn N workers; they import the handler and check the broker, then wait)
-> RUNNING (all loaded: tell them Go) -> STOPPING (Drain sent; SIGKILL at the deadline) ->
STOPPED. A boot failure during STARTING halts before any worker joined the group.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
import time
from enum import Enum

from supervisor import config as cfgmod
from supervisor.config import Settings
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, WorkerExit, describe_returncode
from supervisor.errors import HaltSupervisor
from supervisor.parent import policy
from supervisor.parent.receipt import Receipt
from supervisor.parent.signals import SignalQueue
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.spawn import spawn_worker

log = logging.getLogger("ksup.supervisor")

TICK_S = 0.5               # longest sleep of the loop when nothing happens
STACK_DUMP_BEFORE_KILL_S = 1.0  # SIGUSR1 (stack dump) this long before the SIGKILL


class State(Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Supervisor:
    def __init__(self, settings: Settings, log_format: str) -> None:
        self.settings = settings
        self.log_format = log_format
        self.slots = [WorkerSlot(i) for i in range(settings.workers)]
        self.state = State.STARTING
        self.signals = SignalQueue()
        self.selector = selectors.DefaultSelector()
        self.receipt = Receipt()
        self.exit_code: ExitCode | None = None  # set by a halt; otherwise computed at the end
        self.halt_reason = ""
        self.stop_reason = ""
        self.deaths: list[float] = []
        self.forced = False
        self.quick = False

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self.signals.install()
        self.selector.register(self.signals.read_fd, selectors.EVENT_READ, None)
        log.info("starting %d worker(s) for %s: group %s, topics %s",
                 len(self.slots), self.settings.handler, self.settings.group, ",".join(self.settings.topics))
        try:
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
        code = self.exit_code if self.exit_code is not None else self.final_code()
        self.finish(code)
        return int(code)

    def tick(self, now: float) -> None:
        self.wait_for_events(TICK_S)
        self.dispatch_signals()
        self.reap_workers(time.monotonic())
        self.release_leavers()
        self.murder_workers(time.monotonic())
        self.manage_workers(time.monotonic())

    def wait_for_events(self, timeout: float) -> None:
        """Sleep until a signal, a worker message or worker output; handle messages/output."""
        for key, _ in self.selector.select(timeout):
            slot = key.data
            if slot is None:
                continue
            if key.fileobj is slot.channel:
                self.read_messages(slot)
            else:
                self.read_stderr(slot)

    # ---- duties ---------------------------------------------------------------------------------

    def dispatch_signals(self) -> None:
        for signum in self.signals.take():
            if signum in (signal.SIGTERM, signal.SIGINT) and self.state is not State.STOPPING:
                self.stop(f"{signal.Signals(signum).name} received", quick=False)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.stop(f"{signal.Signals(signum).name} received: quick stop", quick=True)

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
            slot.report = msg
        elif isinstance(msg, m.Loaded):
            slot.advance("loaded")
            log.info("worker %d (pid %d) loaded %s (confluent-kafka %s)",
                     slot.index, msg.pid, msg.handler, msg.client_version)
        elif isinstance(msg, m.BootFailed):
            slot.boot_failed = msg
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
        """Collect exited workers; log each death with its cause; schedule restarts."""
        for slot in self.slots:
            if slot.proc is None or slot.state == "exited" or slot.proc.poll() is None:
                continue
            self.flush_worker(slot)
            report = describe_returncode(slot.proc.returncode)
            expected = self.state is State.STOPPING or slot.drain_sent_at is not None
            slot.state = "exited"
            if expected and report.code == 0:
                log.info("worker %d (pid %d) exited: %s", slot.index, slot.pid, slot.exiting.reason
                         if slot.exiting else report.describe())
                continue
            level = logging.WARNING if expected else logging.ERROR
            log.log(level, "worker %d (pid %d) %s%s%s", slot.index, slot.pid, report.describe(),
                    self.describe_last_moments(slot), self.describe_stderr(slot))
            if self.state is State.STOPPING or slot.boot_failed is not None and self.state is State.STARTING:
                continue
            slot.deaths.append(now)
            self.deaths.append(now)
            if policy.is_crash_loop(self.deaths, now, self.settings.crash_loop_deaths,
                                    self.settings.crash_loop_window):
                raise HaltSupervisor(f"crash loop: {self.settings.crash_loop_deaths} worker deaths within "
                                     f"{self.settings.crash_loop_window:g}s; last: {report.describe()}",
                                     ExitCode.CRASH_LOOP)
            delay = policy.restart_delay(slot.deaths, now, self.settings.restart_delay)
            slot.respawn_at = now + delay
            log.info("worker %d restarts in %.1fs", slot.index, delay)

    def murder_workers(self, now: float) -> None:
        """SIGKILL workers past their drain deadline (reported as forced); just before, ask them
        for their stacks so the log shows where they were stuck."""
        for slot in self.slots:
            if not slot.alive or slot.kill_at is None or now < slot.kill_at - STACK_DUMP_BEFORE_KILL_S:
                continue
            if not slot.stacks_asked:
                slot.stacks_asked = True
                self.kill(slot, signal.SIGUSR1)
            if now >= slot.kill_at and not slot.killed:
                inflight = slot.report.in_flight if slot.report else None
                log.error("worker %d (pid %d) did not stop in time: SIGKILL%s", slot.index, slot.pid,
                          f" (in flight: {_coords(inflight)})" if inflight else "")
                self.kill(slot, signal.SIGKILL)
                slot.killed = True
                self.forced = True

    def manage_workers(self, now: float) -> None:
        """Start workers due for a (re)start; release the boot barrier; finish when all stopped."""
        if self.state is State.STOPPING:
            if not any(s.alive for s in self.slots):
                self.state = State.STOPPED
            return
        for slot in self.slots:
            if not slot.alive and slot.respawn_at is not None and now >= slot.respawn_at:
                slot.restarts += 1
                self.spawn(slot, now)
        if self.state is State.STARTING and all(s.state == "loaded" for s in self.slots):
            self.state = State.RUNNING
            log.info("all %d workers loaded: joining group %s", len(self.slots), self.settings.group)
        if self.state is State.RUNNING:
            for slot in self.slots:
                if slot.state == "loaded" and slot.channel is not None:
                    slot.channel.send(m.Go())
                    slot.joined = True
                    slot.advance("running")

    # ---- actions --------------------------------------------------------------------------------

    def spawn(self, slot: WorkerSlot, now: float) -> None:
        s = self.settings
        configure = m.Configure(slot.index, s.handler, list(s.topics), cfgmod.kafka_config(s, slot.index),
                                cfgmod.worker_options(s, self.log_format))
        proc, channel = spawn_worker(configure)
        slot.reset_for_spawn(proc, channel, now)
        self.selector.register(channel, selectors.EVENT_READ, slot)
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        self.selector.register(proc.stderr, selectors.EVENT_READ, slot)
        log.info("worker %d started (pid %d)", slot.index, proc.pid)

    def stop(self, reason: str, quick: bool) -> None:
        """Ask every worker to drain. Idempotent; a quick stop shortens the deadlines."""
        if self.state is State.STOPPING and (self.quick or not quick):
            return
        self.stop_reason = self.stop_reason or reason
        self.quick = self.quick or quick
        self.state = State.STOPPING
        s = self.settings
        wait = s.quick_timeout if quick else s.worker_drain_timeout
        deadline = time.monotonic() + (s.quick_timeout + 5.0 if quick else s.graceful_timeout)
        log.info("%s: draining %d worker(s) (deadline %.0fs)", reason,
                 sum(1 for x in self.slots if x.alive), deadline - time.monotonic())
        for slot in self.slots:
            slot.respawn_at = None
            if not slot.alive:
                continue
            if slot.channel is not None:
                slot.channel.send(m.Drain(wait, reason))
            self.kill(slot, signal.SIGTERM)  # also wakes a worker still booting
            slot.drain_sent_at = slot.drain_sent_at or time.monotonic()
            slot.kill_at = min(slot.kill_at or deadline, deadline)
            slot.advance("draining")

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
                self.flush_worker(slot)

    # ---- worker output and descriptions -----------------------------------------------------------

    def read_stderr(self, slot: WorkerSlot) -> None:
        if slot.proc is None or slot.proc.stderr is None:
            return
        try:
            data = slot.proc.stderr.read()
        except (BlockingIOError, ValueError):
            return
        if not data:
            self.selector.unregister(slot.proc.stderr)
            return
        self.forward_stderr(slot, data)

    def forward_stderr(self, slot: WorkerSlot, data: bytes) -> None:
        *lines, slot.stderr_buf = (slot.stderr_buf + data).split(b"\n")
        for line in lines:
            slot.stderr_tail.append(line.decode(errors="replace"))
            try:
                sys.stderr.buffer.write(line + b"\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def flush_worker(self, slot: WorkerSlot) -> None:
        """Read what an exited worker left in its pipes."""
        if slot.channel is not None and not slot.channel.closed:
            self.read_messages(slot)
        if slot.proc is not None and slot.proc.stderr is not None and not slot.proc.stderr.closed:
            try:
                data = slot.proc.stderr.read() or b""
            except (BlockingIOError, ValueError):
                data = b""
            self.forward_stderr(slot, data + b"\n" if slot.stderr_buf else data)
            try:
                self.selector.unregister(slot.proc.stderr)
            except (KeyError, ValueError):
                pass
            slot.proc.stderr.close()

    def describe_last_moments(self, slot: WorkerSlot) -> str:
        if slot.exiting is not None:
            return f": {slot.exiting.reason}"
        inflight = slot.report.in_flight if slot.report else None
        if inflight is not None:
            return f"; in flight: {_coords(inflight)} for {time.time() - inflight.since:.1f}s"
        return ""

    def describe_stderr(self, slot: WorkerSlot) -> str:
        tail = [line for line in slot.stderr_tail if line.strip()][-3:]
        return f"; last output: {' | '.join(tail)[-600:]}" if tail else ""

    def final_reason(self, code: ExitCode) -> str:
        """One line for the operator when the exit code is not 0."""
        if self.halt_reason:
            return self.halt_reason
        for slot in self.slots:
            if slot.killed:
                return f"worker {slot.index} did not drain within --graceful-timeout and was killed"
            if slot.exiting is not None and slot.exiting.exit_code != 0:
                return f"worker {slot.index}: {slot.exiting.reason} (exit {slot.exiting.exit_code})"
        return code.name.lower()

    def final_code(self) -> ExitCode:
        codes: list[int | None] = []
        for slot in self.slots:
            if slot.proc is None or slot.proc.returncode is None:
                continue
            report = describe_returncode(slot.proc.returncode)
            codes.append(report.code)
        return policy.final_exit_code(codes, self.forced)

    def finish(self, code: ExitCode) -> None:
        reason = self.stop_reason or "stopped"
        body = self.receipt.as_dict(int(code), reason)
        log.info("shutdown receipt: exit %d (%s)", int(code), code.name, extra={"receipt": body})
        if self.settings.receipt:
            self.receipt.write(self.settings.receipt, int(code), reason)


def _coords(inflight: m.InFlight) -> str:
    return f"{inflight.topic}[{inflight.partition}]@{inflight.offset}"
