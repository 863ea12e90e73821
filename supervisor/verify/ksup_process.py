"""The ``ksup start`` process a verification run drives (one at a time; faults replace it)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from supervisor.adapters.control import request
from supervisor.verify.plan import HANDLER_TIMEOUT_S, Cancel, CouldNotRun, Fault, Plan

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In verify's ksup, before exec: the kernel sends it SIGTERM when verify dies, whatever
    kills verify (SIGKILL included); ksup then drains, and its workers exit with it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def write_config(plan: Plan, path: Path) -> None:
    """ksup's config file: the fault plan accounts for ksup's own rules: injected deaths must
    not trip its crash-loop halt (which is for a handler that can never work), nor grow a
    slot's restart backoff (which spares a broken handler a hot loop: after a few injected
    raises a slot would wait 6-13 s, a gap of the plan's making, not ksup's). The Kafka
    properties go in its [kafka] table, not in -X: they may hold a password, and argv is
    readable by every local user; the file is the owner's only."""
    kafka = "".join(f"{json.dumps(k, ensure_ascii=False)} = {json.dumps(v, ensure_ascii=False)}\n"
                    for k, v in plan.kafka.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("crash_loop_deaths = 1000000\nrestart_delay = 0.2\nmax_restart_delay = 0.5\n"
                + (f"[kafka]\n{kafka}" if kafka else ""))


class Ksup:
    """One ``ksup start`` of the run, consuming the scratch topic with the recording handler."""

    def __init__(self, plan: Plan, topic: str, work: Path, env: dict[str, str]) -> None:
        self.socket = str(work / "ksup.sock")
        args = [sys.executable, "-m", "supervisor", "start", "supervisor.verify.recorder:process",
                "-b", plan.bootstrap, "-t", topic, "-g", topic, "-w", str(plan.workers),
                "--control-socket", self.socket, "--log-format", "json",
                "--graceful-timeout", "20", "--config", str(work / "ksup.toml")]
        if Fault.HANG in plan.faults:
            args += ["--handler-timeout", str(HANDLER_TIMEOUT_S)]
        self.log = open(work / f"ksup-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.stopping = False  # verify stopped it on purpose (a sigterm fault, the end)

    def check_alive(self) -> None:
        """Raise CouldNotRun when this ksup ended without verify asking it to."""
        code = self.proc.poll()
        if code is not None and not self.stopping:
            raise CouldNotRun(f"its ksup exited {code} unexpectedly (see {self.log.name})")

    def ask(self, body: dict[str, Any], timeout: float | None = 10.0) -> dict[str, Any]:
        return request(self.socket, body, timeout)

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.ask({"cmd": "status"})["workers"] if w["pid"]]

    def wait_ready(self, cancel: Cancel, timeout: float) -> bool:
        """Until ksup says it is ready (every slot a settled member of the group: the README's
        readiness); False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cancel.check()
            self.check_alive()
            try:
                if self.ask({"cmd": "ready"}, timeout=5.0).get("ready"):
                    return True
            except (OSError, ValueError, KeyError):
                pass  # still starting: no socket yet
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 60.0) -> int:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode
