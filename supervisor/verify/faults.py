"""The scheduled faults of a ``ksup verify`` run: one function each, in one table.

Each function injects its fault and returns once the fault itself is over (a stopped ksup
replaced by a new one, a killed worker gone, a reload answered); the run then waits until
ksup is ready again before the next fault. An outcome a fault is expected to have (a SIGTERM
that abandons a message: exit 4 or 5) is not a failure; anything else raises.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.procfs import alive
from supervisor.verify.ksup_process import Ksup
from supervisor.verify.plan import (
    BROKER_PAUSE_S,
    COMMAND_TIMEOUT_S,
    MESSAGE_FAULT_KINDS,
    Cancel,
    CouldNotRun,
    Fault,
    Plan,
)

ORPHANS_EXIT_S = 60.0  # a killed supervisor's workers must be gone within this


@dataclass
class FaultContext:
    plan: Plan
    topic: str
    work: Path
    env: dict[str, str]
    rng: random.Random
    cancel: Cancel
    ksup: Ksup
    scaled: bool = False  # the scale fault added a worker; the next one takes it away

    def new_ksup(self) -> None:
        self.ksup = Ksup(self.plan, self.topic, self.work, self.env)


def _sigterm(ctx: FaultContext) -> None:
    code = ctx.ksup.stop()
    if code not in (0, 4, 5):  # 4/5: a message abandoned or a commit unconfirmed: duplicates, not loss
        raise RuntimeError(f"ksup exited {code} on SIGTERM (see {ctx.ksup.log.name})")
    ctx.new_ksup()


def _supervisor_kill(ctx: FaultContext) -> None:
    # The supervisor dies at once; its workers notice (their pipe closes) and drain on their own.
    workers = ctx.ksup.worker_pids()
    ctx.ksup.stopping = True
    ctx.ksup.proc.kill()
    ctx.ksup.stop()
    _wait_gone(workers, ORPHANS_EXIT_S, ctx.cancel, "outlived their killed supervisor (orphans)")
    ctx.new_ksup()


def _kill(ctx: FaultContext) -> None:
    pids = ctx.ksup.worker_pids()
    if pids:
        victim = ctx.rng.choice(pids)
        os.kill(victim, signal.SIGKILL)
        _wait_gone([victim], 10.0, ctx.cancel, "survived SIGKILL")
        # Until ksup has seen the death, its readiness still counts the dead worker.
        _wait_for(lambda: victim not in ctx.ksup.worker_pids(), ctx.cancel, "ksup to notice a killed worker")


def _reload(ctx: FaultContext) -> None:
    began = time.time()
    result = _call(lambda: ctx.ksup.ask({"cmd": "reload", "wait": True}, timeout=300), ctx.cancel)
    # A message fault (a raise, a hang, a poison) that a freshly rolled worker met is that fault's
    # expected outcome, not a failed release; anything else is a real reload failure.
    if not result.get("ok") and not message_fault_since(ctx.work, began):
        raise RuntimeError(f"rolling reload failed: {result.get('error')}")


def _scale(ctx: FaultContext) -> None:
    target = ctx.plan.workers if ctx.scaled else ctx.plan.workers + 1
    ctx.ksup.ask({"cmd": "scale", "workers": target})
    ctx.scaled = not ctx.scaled
    _wait_slots(ctx, target)


def _scale_flap(ctx: FaultContext) -> None:
    # Up by two and straight back down: the scale-down is decided while the new slots boot.
    target = ctx.plan.workers + 1 if ctx.scaled else ctx.plan.workers
    ctx.ksup.ask({"cmd": "scale", "workers": ctx.plan.workers + 2})
    ctx.ksup.ask({"cmd": "scale", "workers": target})
    _wait_slots(ctx, target)


def _wait_slots(ctx: FaultContext, target: int) -> None:
    """Until ksup has exactly ``target`` worker slots (its readiness counts the slots it has)."""
    _wait_for(lambda: len(ctx.ksup.ask({"cmd": "status"})["workers"]) == target, ctx.cancel,
              f"ksup to have {target} workers")


def _broker_restart(ctx: FaultContext) -> None:
    assert ctx.plan.broker_restart_command
    shell(ctx.plan.broker_restart_command, "--broker-restart-command", ctx.cancel)


def _broker_pause(ctx: FaultContext) -> None:
    assert ctx.plan.broker_pause_command and ctx.plan.broker_resume_command
    shell(ctx.plan.broker_pause_command, "--broker-pause-command", ctx.cancel)
    try:
        ctx.cancel.sleep(BROKER_PAUSE_S)  # the fault itself: the broker stays frozen this long
    finally:
        shell(ctx.plan.broker_resume_command, "--broker-resume-command", Cancel())  # thaw it whatever happens


INJECT: dict[Fault, Callable[[FaultContext], None]] = {
    Fault.SIGTERM: _sigterm,
    Fault.SUPERVISOR_KILL: _supervisor_kill,
    Fault.KILL: _kill,
    Fault.RELOAD: _reload,
    Fault.SCALE: _scale,
    Fault.SCALE_FLAP: _scale_flap,
    Fault.BROKER_RESTART: _broker_restart,
    Fault.BROKER_PAUSE: _broker_pause,
}


def message_fault_since(work: Path, since: float) -> bool:
    """Whether a handler met an injected failure or hang since ``since`` (the recording
    handler leaves a marker file for each, see recorder.py)."""
    for marker in [m for pattern in MARKERS.values() for m in work.glob(pattern)]:
        try:
            if marker.stat().st_mtime >= since - 1.0:
                return True
        except OSError:
            pass
    return False


MARKERS = {kind: f"record.txt.{how.marker}-*" for kind, how in MESSAGE_FAULT_KINDS.items()}


def message_faults_seen(work: Path) -> dict[Fault, int]:
    """How many injected message faults a handler actually met (one marker file each)."""
    return {kind: len(list(work.glob(pattern))) for kind, pattern in MARKERS.items()}


def new_message_faults(work: Path, known: set[str]) -> list[tuple[int, Fault]]:
    """Message faults met since the last call (``known``: the marker names seen so far), with
    when they happened (the marker's mtime, wall-clock ns)."""
    out = []
    for kind, pattern in MARKERS.items():
        for marker in work.glob(pattern):
            if marker.name not in known:
                try:
                    out.append((marker.stat().st_mtime_ns, kind))
                except OSError:
                    continue
                known.add(marker.name)
    return out


def _call(fn: Callable[[], dict[str, Any]], cancel: Cancel) -> dict[str, Any]:
    """Run a blocking control-socket request on a thread, so that SIGTERM/SIGINT (recorded by
    Cancel) still end the run while it waits."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on the run's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="ksup-verify-request", daemon=True)
    thread.start()
    while thread.is_alive():
        cancel.check()
        thread.join(0.1)
    if "error" in box:
        raise box["error"]
    result: dict[str, Any] = box["result"]
    return result


def shell(command: str, option: str, cancel: Cancel) -> None:
    proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    try:
        while proc.poll() is None:
            cancel.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{option} did not return within {COMMAND_TIMEOUT_S:.0f}s")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (proc.stdout.read() if proc.stdout else "").strip()
    if proc.returncode != 0:
        raise RuntimeError(f"{option} exited {proc.returncode}: {output[-300:]}")


def _wait_for(predicate: Callable[[], bool], cancel: Cancel, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        cancel.check()
        if time.monotonic() > deadline:
            raise CouldNotRun(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _wait_gone(pids: list[int], timeout: float, cancel: Cancel, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cancel.check()
        if not any(alive(pid) for pid in pids):
            return
        time.sleep(0.05)
    raise CouldNotRun(f"workers {pids} {what} by {timeout:.0f}s")
