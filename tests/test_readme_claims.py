"""README claims that had no test, checked on real processes against the real broker. Several
claims share one ksup run to keep the suite fast (each step names the claim it checks):

- SIGUSR1 stack dump: before a silent worker is SIGKILLed, its thread stacks are in the log;
- ``--on-worker-exit``: the command gets KSUP_SLOT, KSUP_PID, KSUP_EXIT_CODE, KSUP_SIGNAL,
  KSUP_REASON, KSUP_IN_FLIGHT;
- secrets are absent from every ksup process's argv and environment (/proc/<pid>/cmdline, environ);
- the supervisor never imports confluent-kafka (no librdkafka in /proc/<pid>/maps; the workers
  have it, which shows the check can fail);
- restart, drain and dead-letter metrics;
- ``ksup reload`` with ``--no-static-membership``;
- ``EXTEND_TIMEOUT_USEC`` on a real AF_UNIX datagram notify socket during the drain;
- orphans: workers of a SIGKILLed supervisor drain, commit what they finished and exit;
- the start-up refusals: under systemd a graceful timeout not below TimeoutStopSec; a session
  timeout below 6 s with static membership.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.harness import REPO, ksup_cli, wait_until, whole_lines
from tests.kafkautil import committed_offsets, create_topic, end_offsets, free_port_unused, produce_sequence
from tests.test_systemd import NotifyListener

pytestmark = pytest.mark.kafka

SECRET = "s3cr3t-Pa55-in-the-config-file"

# A recording handler with one more switch: KSUP_TEST_HOG_AT holds the GIL (a long C-level loop),
# so the worker's consumer thread cannot report and the supervisor sees it silent; the stack
# dump must still work (faulthandler writes from its C signal handler).
HANDLER = '''
import os
_RECORD = os.environ["KSUP_TEST_RECORD"]
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def _once(name, where):
    if os.environ.get(name) != where:
        return False
    try:
        os.close(os.open(f"{_RECORD}.{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

def hog_the_gil():
    return sum(range(10 ** 13))

def process(record):
    where = f"{record.partition}:{record.offset}"
    if _once("KSUP_TEST_HOG_AT", where):
        hog_the_gil()
    if os.environ.get("KSUP_TEST_RAISE_ALWAYS_AT") == where:
        raise ValueError(f"cannot parse {where}")
    if os.environ.get("KSUP_TEST_SLEEP"):
        import time
        time.sleep(float(os.environ["KSUP_TEST_SLEEP"]))
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\\n".encode())
'''


def _rows(path: Path) -> list[tuple[int, int, int]]:
    if not path.exists():
        return []
    return [(int(p), int(o), int(pid)) for p, o, pid in (line.split() for line in whole_lines(path))]


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _exit_hook_runs(path: Path) -> list[dict[str, str]]:
    runs, cur = [], {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line == "---":
            runs.append(cur)
            cur = {}
        elif "=" in line:
            k, v = line.split("=", 1)
            cur[k] = v
    return runs


def _proc_text(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def test_readme_claims_in_one_run(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    create_topic(bootstrap, f"{topic}.dlq", 1)
    produce_sequence(bootstrap, topic, 100, partitions=2)
    (tmp_path / "claims_handler.py").write_text(HANDLER)
    (tmp_path / "ksup.toml").write_text(f'[kafka]\n"sasl.password" = "{SECRET}"\n')
    record, hook_out = tmp_path / "record.txt", tmp_path / "exits.txt"
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    port = free_port_unused()
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_HOG_AT": "0:5", "KSUP_TEST_RAISE_ALWAYS_AT": "1:60",
           "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        run = ksup("claims_handler:process", bootstrap, topic, group, workers=2, cwd=tmp_path, env=env,
                   extra=["--config", str(tmp_path / "ksup.toml"), "--no-static-membership",
                          # the killed worker's member must not hold the rebalance for 45 s
                          "-X", "session.timeout.ms=6000", "--on-error", "dead-letter",
                          "--heartbeat-timeout", "3", "--restart-delay", "0.2",
                          "--metrics-addr", f"127.0.0.1:{port}",
                          "--on-worker-exit", f"env | grep ^KSUP_ | sort >> {hook_out}; echo --- >> {hook_out}"])
        ends = end_offsets(bootstrap, topic, 2)
        wait_until(lambda: committed_offsets(bootstrap, group, topic, 2) == ends, 120, "all committed", 0.5)

        # SIGUSR1 stack dump: the silent worker's stacks (the hogging handler on top) are in the
        # log, before the SIGKILL line.
        text = run.log_text()
        kill_at = text.index("did not stop in time: SIGKILL")
        stacks_at = text.find("most recent call first")
        assert 0 <= stacks_at < kill_at, run.tail(60)
        assert "in hog_the_gil" in text[stacks_at:kill_at] and "claims_handler.py" in text[stacks_at:kill_at]
        killed = int(text[:kill_at].rsplit("(pid ", 1)[1].split(")")[0])

        # --on-worker-exit: its environment (the command is not waited for: wait for its output).
        wait_until(lambda: any(r.get("KSUP_PID") == str(killed) for r in _exit_hook_runs(hook_out)), 30, "exit hook")
        hook = next(r for r in _exit_hook_runs(hook_out) if r.get("KSUP_PID") == str(killed))
        assert hook["KSUP_SIGNAL"] == "SIGKILL" and hook["KSUP_EXIT_CODE"] == "", hook
        assert hook["KSUP_SLOT"] in ("0", "1") and hook["KSUP_REASON"], hook
        assert hook["KSUP_IN_FLIGHT"] == f"{topic}[0]@5", hook

        # Secrets: in no ksup process's argv or environment (they go over the pipe).
        sup_pid, workers = run.proc.pid, run.worker_pids()
        assert len(workers) == 2
        for pid in (sup_pid, *workers):
            for name in ("cmdline", "environ"):
                assert SECRET.encode() not in _proc_text(pid, name), f"the secret is in /proc/{pid}/{name}"
        assert any(b"cimpl" in _proc_text(w, "maps") for w in workers), "the check below can see confluent-kafka"
        # The supervisor never imports confluent-kafka: neither its extension nor librdkafka is mapped.
        maps = _proc_text(sup_pid, "maps")
        assert b"cimpl" not in maps and b"librdkafka" not in maps
        # Nor asyncio (with what it brings, ssl among them, about 6 MiB of the supervisor's RSS): only
        # a worker with an async handler needs it. (ssl itself comes here with --metrics-addr:
        # http.server imports http.client.)
        assert b"/_asyncio." not in maps, "the supervisor imported asyncio"

        # Metrics: a restart (cause stuck: silent).
        got = _metrics(port)
        assert got.get('ksup_worker_restarts_total{cause="stuck"}', 0) >= 1, got

        # Reload with --no-static-membership: every worker replaced, nothing lost.
        drains_before = got.get("ksup_drains_total", 0)
        out = ksup_cli("reload", "-g", group, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr + run.tail()
        assert out.stdout.count("partitions without a consumer") == 2
        produce_sequence(bootstrap, topic, 100, start=100, partitions=2)
        ends = end_offsets(bootstrap, topic, 2)
        wait_until(lambda: committed_offsets(bootstrap, group, topic, 2) == ends, 120, "all committed", 0.5)
        wait_until(lambda: _metrics(port).get("ksup_drains_total", 0) >= drains_before + 2, 30, "drains counted")
        # The dead-lettered message (partition 1, offset 60: in the second batch, so that no
        # worker dies before reporting it) is counted.
        wait_until(lambda: _metrics(port).get("ksup_dead_lettered_total") == 1, 30, "dead-letter counted")

        # EXTEND_TIMEOUT_USEC during the drain, after STOPPING=1.
        assert run.stop() == 0, run.tail()
        lines = [line for _, line in listener.messages]
        assert "STOPPING=1" in lines
        assert any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in lines[lines.index("STOPPING=1"):]), lines
    finally:
        listener.stopped.set()
        listener.join(5)
    seen = Counter((p, o) for p, o, _ in _rows(record))
    assert [(p, o) for p, end in ends.items() for o in range(end) if (p, o) not in seen] == [(1, 60)]


def test_orphaned_workers_drain_commit_and_exit(ksup, bootstrap, names, tmp_path):
    """SIGKILL of the supervisor: its workers drain, commit exactly what they finished, and exit
    (README: within about a second; the bound here is generous, the time is printed)."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 2000, partitions=2)
    (tmp_path / "claims_handler.py").write_text(HANDLER)
    record = tmp_path / "record.txt"
    run = ksup("claims_handler:process", bootstrap, topic, group, workers=2, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.01", "PYTHONDONTWRITEBYTECODE": "1"})
    wait_until(lambda: len({pid for *_, pid in _rows(record)}) == 2, 60, "both workers busy")
    workers = [psutil.Process(pid) for pid in run.worker_pids()]
    os.kill(run.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    took = time.monotonic() - t0
    print(f"orphaned workers gone {took:.2f}s after SIGKILL of the supervisor")
    assert not alive, f"orphaned workers still running after 30 s: {alive}"
    finished = _rows(record)
    assert len(finished) < 2000, "the stop came while there was work left"
    last = {p: max(o for q, o, _ in finished if q == p) for p in (0, 1)}
    assert committed_offsets(bootstrap, group, topic, 2) == {p: o + 1 for p, o in last.items()}, \
        "committed exactly what was finished"


def test_start_refusals(bootstrap, names, tmp_path):
    """Refused before any worker starts, with exit 78 and one line naming the fix: a session
    timeout below 6 s with static membership; and, under systemd, a graceful timeout not below
    the unit's TimeoutStopSec. "Under systemd" is made real enough for ksup's own detection: the
    process runs in a cgroup named like a service (cgroup v1 name=systemd hierarchy, created
    for this test), INVOCATION_ID is set, and ``systemctl show`` (a stand-in on PATH, since no
    systemd runs here) reports the unit's properties."""
    topic, group = names
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = [sys.executable, "-m", "supervisor", "start", "tests.handlers.recording:process",
             "-b", bootstrap, "-t", topic, "-g", group]
    out = subprocess.run([*start, "-X", "session.timeout.ms=3000"], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=env)
    assert out.returncode == 78, out.stderr
    assert "session.timeout.ms=3000 is too short for static membership" in out.stderr.strip().splitlines()[-1]

    cgroups = Path("/sys/fs/cgroup/systemd")
    if os.getuid() != 0 or not cgroups.is_dir():
        pytest.skip("needs root and a cgroup v1 name=systemd hierarchy to run ksup as a service")
    unit = cgroups / f"ksup-test-{os.getpid()}.service"
    unit.mkdir(exist_ok=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "systemctl").write_text("#!/bin/sh\necho KillMode=control-group\necho TimeoutStopUSec=20s\n")
    (bindir / "systemctl").chmod(0o755)
    try:
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {unit}/cgroup.procs && exec "$@"', "sh", *start, "--graceful-timeout", "30"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**env, "INVOCATION_ID": "test", "PATH": f"{bindir}:{env['PATH']}"})
    finally:
        wait_until(lambda: not (unit / "cgroup.procs").read_text().strip(), 10, "cgroup empty")
        unit.rmdir()
    assert out.returncode == 78, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "--graceful-timeout 30s is not below the unit's TimeoutStopSec (20s)" in last, out.stderr
    assert "KillMode=control-group" in out.stderr, "the KillMode warning"
