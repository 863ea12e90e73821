"""Run ``ksup start`` as a real process for tests: start, wait for log lines, signal, collect.

Every process started here is tracked by pid; ``kill_everything`` SIGKILLs the supervisor and
every worker it ever had (workers run in sessions of their own, so a process-group kill would
miss them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent


class KsupRun:
    def __init__(self, handler: str, bootstrap: str, topic: str, group: str, workers: int = 1,
                 extra: list[str] | None = None, env: dict[str, str] | None = None,
                 workdir: Path | None = None, cwd: Path | None = None) -> None:
        self.workdir = Path(workdir or "/tmp")
        self.log_path = self.workdir / f"ksup-{time.monotonic_ns()}.log"
        self.receipt_path = self.log_path.with_suffix(".receipt.json")
        args = [sys.executable, "-m", "supervisor", "start", handler, "-b", bootstrap, "-t", topic,
                "-g", group, "-w", str(workers), "--log-format", "json",
                "--receipt", str(self.receipt_path), *(extra or [])]
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env, cwd=cwd or REPO,
                                     start_new_session=True)
        self.seen_pids: set[int] = set()

    # ---- observing -----------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_for_log(self, needle: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.worker_pids()
            if self.log_text().count(needle) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"ksup exited {self.proc.returncode} before {needle!r}:\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {needle!r}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def worker_pids(self) -> list[int]:
        try:
            kids = [p.pid for p in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            kids = []
        self.seen_pids.update(kids)
        return kids

    def receipt(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.receipt_path.read_text())
        return data

    # ---- acting ----------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        self.worker_pids()
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ksup did not exit within {timeout}s:\n{self.tail()}") from None

    def stop(self, timeout: float = 60.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill_everything(self) -> None:
        self.worker_pids()
        for pid in [self.proc.pid, *self.seen_pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def ksup_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a ksup client command (status, scale, reload, ...) and capture its output."""
    return subprocess.run([sys.executable, "-m", "supervisor", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def read_record(path: Path) -> list[tuple[int, int, int]]:
    """Lines written by tests/handlers/recording.py: (partition, offset, pid)."""
    if not path.exists():
        return []
    out = []
    for line in whole_lines(path):
        p, o, pid = line.split()
        out.append((int(p), int(o), int(pid)))
    return out


def whole_lines(path: Path) -> list[str]:
    """The complete lines of a file a running handler appends to: a line still being written
    (seen by a read racing the write) is left for the next read. [] when there is no file."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[:text.rfind("\n") + 1].splitlines()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
