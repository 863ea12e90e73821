"""Supervisor: the parent's I/O loop around the sans-I/O core (``core.py``). Start reading at
``run`` and ``tick``.

One loop does all the work; signal handlers only record (``signals.py``). Each tick waits for
any event (a signal, a worker message, worker output, a control-socket request, a child's
exit), turns what it saw into events for the core, and carries out the actions the core
returns: spawn a worker, send it a message, signal it (or its process group), call the adapters'
hooks. The loop decides nothing itself; the supervisor decides, workers obey.

Life cycle (``state.py``): STARTING (spawn N workers; they import the handler and check the
broker, then wait) -> RUNNING (all loaded: tell them Go) -> STOPPING (Drain sent; SIGKILL at the
deadline) -> STOPPED. A boot failure during STARTING halts before any worker joined the group.

Children: the supervisor reaps with ``waitpid(-1)`` and is a child subreaper, so whatever a
worker's handler leaves behind is re-parented to it and reaped (no zombies, also as PID 1 in a
container); a worker's process group is signalled when it is killed and when it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import signal
import time
from typing import Any

from supervisor import config as cfgmod
from supervisor.config import Settings
from supervisor.contract import inflight_board
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, WorkerExit
from supervisor.errors import StartupError
from supervisor.parent import board_folder, readiness, rolling, sink, worker_output
from supervisor.parent import events as ev
from supervisor.parent.core import SupervisorCore
from supervisor.parent.hooks import Hooks, NullHooks
from supervisor.parent.receipt import Receipt
from supervisor.parent.signals import SignalQueue
from supervisor.parent.slots import WorkerSlot
from supervisor.parent.spawn import spawn_worker
from supervisor.parent.state import State
from supervisor.parent.worker_output import read_stderr

log = logging.getLogger("ksup.supervisor")

TICK_S = 0.5                 # longest sleep of the loop when nothing happens
OUTPUT_RETRY_S = 0.05        # ... while output waits for a slow reader of our stderr
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


class Supervisor:
    def __init__(self, settings: Settings, log_format: str, hooks: Hooks | None = None) -> None:
        self.settings = settings
        self.log_format = log_format
        self.hooks = hooks or NullHooks()
        self.core = SupervisorCore(settings, time.monotonic())
        self.started_at = time.time()
        self.signals = SignalQueue()
        self.selector = selectors.DefaultSelector()
        self.last_tick = time.monotonic()
        board_folder.remove_abandoned()  # those of ksups killed before they could
        self.board_folder = board_folder.BoardFolder()
        self.procs: dict[int, WorkerSlot] = {}  # pid -> slot, until reaped and reported
        self.unstarted: list[WorkerSlot] = []   # spawns that failed, told to the core as deaths
        self.progress = readiness.Progress()  # committed offsets standing still (health)

    # ---- the core's view, for the adapters (status, health, metrics, systemd) -------------------

    @property
    def slots(self) -> list[WorkerSlot]:
        return self.core.slots

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def target_workers(self) -> int:
        return self.core.target_workers

    @property
    def stop_reason(self) -> str:
        return self.core.stop_reason

    @property
    def roll(self) -> rolling.Roll | None:
        return self.core.roll

    @property
    def partitions_total(self) -> int:
        return self.core.partitions_total

    @property
    def receipt(self) -> Receipt:
        return self.core.receipt

    def rolling(self) -> bool:
        return self.core.rolling()

    # ---- commands (control socket, signals): events for the core ----------------------------------

    def scale(self, workers: int) -> str | None:
        return self.post(ev.Scale(workers))  # type: ignore[no-any-return]

    def reload(self) -> str | None:
        return self.post(ev.Reload())  # type: ignore[no-any-return]

    def stop(self, reason: str, quick: bool, timeout: float | None = None) -> None:
        self.post(ev.Stop(reason, quick, timeout))

    def post(self, event: ev.Event) -> Any:
        answer, actions = self.core.handle(event, time.monotonic(), time.time())
        self.apply(actions)
        return answer

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        self.signals.install()
        self.selector.register(self.signals.read_fd, selectors.EVENT_READ, None)
        become_subreaper()
        try:
            try:
                self.hooks.on_start(self)
            except OSError as exc:  # a socket, pidfile or port the settings name
                raise StartupError(str(exc)) from exc
            self.apply(self.core.start(time.monotonic()))
            while self.core.state is not State.STOPPED:
                self.tick()
        finally:
            self.kill_all_now()
            self.board_folder.remove()
        code = self.core.final_code()
        # Signals stay recorded-only until the receipt is written and ksup has exited with its
        # own code: a late SIGTERM must neither kill us (143) nor lose the receipt.
        self.finish(code)
        self.signals.uninstall(ignore=True)
        return int(code)

    def tick(self) -> None:
        self.last_tick = time.monotonic()
        # Queued output is written as the loop comes round: wake up soon while some is left.
        self.wait_for_events(OUTPUT_RETRY_S if sink.stderr is not None and sink.stderr.pending() else TICK_S)
        if sink.stderr is not None:
            sink.stderr.flush()
        for signum in self.signals.take():
            if signum != signal.SIGCHLD:
                self.post(ev.SignalReceived(signum))
        self.reap()
        unstarted, self.unstarted = self.unstarted, []
        for slot in unstarted:
            self.post(ev.WorkerExited(slot, int(WorkerExit.NOT_STARTED), [], worker_output.stderr_tail(slot)))
        self.post(ev.Tick())
        self.hooks.on_tick(self)

    def wait_for_events(self, timeout: float) -> None:
        """Sleep until a signal, a worker message or output, or a control request; handle it."""
        for key, _ in self.selector.select(timeout):
            data = key.data
            if data is None:
                continue  # the signal pipe: tick reads it
            if callable(data):
                data()  # an adapter's handler (control socket)
            elif key.fileobj is data.channel:
                self.read_messages(data)
            else:
                read_stderr(data, self.selector)

    def read_messages(self, slot: WorkerSlot) -> None:
        channel = slot.channel
        if channel is None:
            return
        for msg in channel.read_available():
            self.post(ev.WorkerMessage(slot, msg))
        if channel.closed:
            self._unregister(channel)
            channel.close()

    def reap(self) -> None:
        """Collect every exited child (``waitpid(-1)``: workers, and whatever was re-parented to
        us); report the workers' exits to the core."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.procs.get(pid)
            if slot is not None and slot.proc is not None and slot.proc.returncode is None:
                slot.proc.returncode = os.waitstatus_to_exitcode(status)
        for pid, slot in list(self.procs.items()):
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            del self.procs[pid]
            if slot.channel is not None and not slot.channel.closed:
                self.read_messages(slot)
            read_stderr(slot, self.selector, final=True)
            if slot.channel is not None:
                self._unregister(slot.channel)
                slot.channel.close()
            board = slot.configure.options.get("board") if slot.configure else None
            inflight = inflight_board.read(str(board)) if board else []
            self.post(ev.WorkerExited(slot, proc.returncode, inflight, worker_output.stderr_tail(slot)))
            if board:  # read (by the hooks too): one kept per death would grow without bound
                with contextlib.suppress(OSError):
                    os.unlink(str(board))

    # ---- carrying out the core's actions ------------------------------------------------------------

    def apply(self, actions: list[ev.Action]) -> None:
        for action in actions:
            if isinstance(action, ev.Send):
                if action.slot.channel is not None:
                    action.slot.channel.send(action.msg)
            elif isinstance(action, ev.Kill):
                self.kill(action.slot, action.sig, action.group)
            elif isinstance(action, ev.Spawn):
                self.spawn(action.slot, action.poison, action.suspects)
            else:
                getattr(self.hooks, action.name)(self, *action.args)

    def configure_for(self, index: int, poison: tuple[tuple[str, int, int], ...],
                      suspects: tuple[tuple[str, int, int], ...] = ()) -> m.Configure:
        """What a new worker in slot ``index`` is told: settings, its in-flight board (a record
        per handler thread, or per message of a batch), poison and suspect messages."""
        s = self.settings
        self.board_folder = self.board_folder.ensure()
        board = os.path.join(self.board_folder.path, f"slot-{index}-{time.monotonic_ns()}")
        inflight_board.create(board, max(s.concurrency, s.batch_size))
        options = {**cfgmod.worker_options(s, self.log_format), "board": board,
                   "poison": [list(p) for p in poison], "suspects": [list(p) for p in suspects]}
        return m.Configure(index, s.handler, list(s.topics), cfgmod.kafka_config(s, index), options)

    def spawn(self, slot: WorkerSlot, poison: tuple[tuple[str, int, int], ...],
              suspects: tuple[tuple[str, int, int], ...] = ()) -> None:
        configure = None
        try:
            configure = self.configure_for(slot.index, poison, suspects)
            proc, channel = spawn_worker(configure, self.board_folder.hold_fd)
        except OSError as exc:
            if configure is not None:  # its board, made for a worker that never ran
                with contextlib.suppress(OSError):
                    os.unlink(str(configure.options["board"]))
            # Out of file descriptors, processes or memory: a start that failed is a death of this
            # slot (restarted after its backoff, a crash loop if it goes on), told to the core at
            # the next tick; not a crash of the supervisor, which SIGKILLs every worker undrained.
            log.error("worker %d could not be started: %s", slot.index, exc)
            slot.stderr_tail.append(f"ksup could not start it: {exc}")
            self.unstarted.append(slot)
            return
        slot.configure, slot.proc, slot.channel, slot.pid = configure, proc, channel, proc.pid
        self.procs[proc.pid] = slot
        self.selector.register(channel, selectors.EVENT_READ, slot)
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), False)
        self.selector.register(proc.stderr, selectors.EVENT_READ, slot)
        log.info("worker %d started (pid %d)", slot.index, proc.pid)

    def kill(self, slot: WorkerSlot, sig: int, group: bool = False) -> None:
        """Signal a worker (its process group: workers lead sessions of their own). The group of
        a reaped worker is signalled only while its pid has not been handed to anyone else."""
        pid = slot.pid
        if pid is None:
            return
        try:
            if group:
                if slot.proc is not None and slot.proc.returncode is not None and _pid_reused(pid):
                    return
                os.killpg(pid, sig)
            elif slot.proc is not None and slot.proc.returncode is None:
                slot.proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_all_now(self) -> None:
        """Last resort on the way out (also after a bug in the loop): no worker, nor anything a
        worker started, outlives us."""
        for slot in list(self.procs.values()):
            if slot.proc is not None and slot.proc.poll() is None:
                self.kill(slot, signal.SIGKILL, group=True)
                slot.proc.wait(10)
            if slot.proc is not None:
                read_stderr(slot, self.selector, final=True)
        for slot in self.core.slots + self.core.strays:
            if slot.pid is not None:
                self.kill(slot, signal.SIGKILL, group=True)
        self.reap_strangers()

    def reap_strangers(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _unregister(self, obj: Any) -> None:
        try:
            self.selector.unregister(obj)
        except (KeyError, ValueError):
            pass

    # ---- the end ----------------------------------------------------------------------------------

    def final_reason(self, code: ExitCode) -> str:
        return self.core.final_reason(code)

    def final_code(self) -> ExitCode:
        return self.core.final_code()

    def finish(self, code: ExitCode) -> None:
        body = self.core.receipt_body(code)
        log.info("shutdown receipt: exit %d (%s)", int(code), code.name, extra={"receipt": body})
        if self.settings.receipt:
            try:
                self.core.receipt.write(self.settings.receipt, int(code), body["reason"])
            except OSError as exc:
                log.error("could not write the receipt to %s: %s", self.settings.receipt, exc)
        self.hooks.on_exit(self, int(code))


def become_subreaper() -> None:
    """Have orphaned descendants (a handler's helpers whose worker died) re-parented to us
    rather than to init, so that we reap them. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _pid_reused(pid: int) -> bool:
    """After our worker ``pid`` was reaped, is there a new process with that pid leading its
    own group (then the group is not ours to signal)?"""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
