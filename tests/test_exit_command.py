"""--on-worker-exit against hooks that do not end (a hostile review of the supervisor side): the
real adapter runs real shell commands; the slot it is told about is a stand-in."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from supervisor.adapters.exit_command import MAX_RUNNING, WorkerExitCommand
from supervisor.contract.exitcodes import ExitReport


def _slot(index: int) -> SimpleNamespace:
    return SimpleNamespace(index=index, pid=1000 + index, exiting=None, configure=None, report=None)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("command", ["sleep 300 & echo $! >> {pids}; wait",  # the shell waits for it
                                     "sleep 300 & echo $! >> {pids}"])       # the shell ends at once
def test_hooks_that_never_end_are_bounded_and_gone_with_everything_they_started(tmp_path: Path, command: str):
    """Hooks that hang (a stdout nobody reads, a stuck script) piled up without bound, one per
    worker death; at exit each was waited for 5 s in turn, and killing the shell left what it
    started running. Now at most MAX_RUNNING run at once (the rest are skipped, with a warning),
    the exit waits 5 s for all of them together, then kills each hook's whole process group."""
    pids = tmp_path / "pids"
    hooks = WorkerExitCommand(command.format(pids=pids))
    try:
        for i in range(MAX_RUNNING + 5):
            hooks.on_worker_exit(None, _slot(i), ExitReport(code=None, signal=9))
        assert len(hooks.groups) == MAX_RUNNING
        deadline = time.monotonic() + 30
        while (len(pids.read_text().split()) if pids.exists() else 0) < MAX_RUNNING:
            assert time.monotonic() < deadline, "the hooks did not start their children"
            time.sleep(0.05)  # paces the poll; the proof is the file's content
        children = [int(p) for p in pids.read_text().split()]
        hooks.on_exit(None, 0)
        # SIGKILL is sent; the kernel takes a moment to end each process: wait for it, bounded.
        _, left = psutil.wait_procs([psutil.Process(p) for p in children if _alive(p)], timeout=10)
        assert not [p.pid for p in left if _alive(p.pid)], "a hook's child outlived ksup"
        assert len(children) == MAX_RUNNING, children
    finally:
        for group in [*hooks.groups, *(p.pid for p in hooks._shells)]:  # by pid, whatever the code did
            for kill in (os.killpg, os.kill):
                try:
                    kill(group, 9)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in hooks._shells:
            p.wait(10)
        if pids.exists():
            for pid in map(int, pids.read_text().split()):
                if _alive(pid):
                    os.kill(pid, 9)
