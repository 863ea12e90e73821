"""`ksup verify` against the local broker (the short run CI does): every fault kind injected,
nothing lost, the report and exit code say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.kafka


def test_ksup_verify_short_run_with_every_fault(bootstrap):
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "verify", "-b", bootstrap, "--messages", "24000", "--rate", "2000",
         # The default --max-gap (10 s) holds too: no partition waited longer for a consumer.
         "--partitions", "4", "--workers", "2", "--fault-interval", "0.5", "--seed", "7", "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["lost"] == 0 and result["committed_ok"]
    assert result["produced"] == 24000 and result["processed"] == 24000
    kinds = {kind for kind, row in result["by_fault"].items() if row["count"]}
    assert kinds >= {"sigterm", "kill", "supervisor-kill", "reload", "scale", "scale-flap", "exception", "hang",
                     "poison"}, \
        result["by_fault"]
    assert sum(row["duplicates"] for row in result["by_fault"].values()) == result["duplicates"]


def test_ksup_verify_survives_broker_restarts(tmp_path):
    """The broker-restart fault against a broker of its own (restarting the session's broker
    would disturb nothing, but this one can be thrown away): the user's command restarts it,
    ksup keeps consuming, nothing is lost."""
    from tests.localkafka import LocalKafka

    broker = LocalKafka(tmp_path / "kafka")
    try:
        broker.start()
        restart = f"{sys.executable} {REPO / 'tests' / 'localkafka.py'} restart {broker.workdir}"
        out = subprocess.run(
            [sys.executable, "-m", "supervisor", "verify", "-b", broker.bootstrap, "--messages", "4000",
             "--rate", "500", "--partitions", "4", "--workers", "2", "--fault-interval", "2",
             "--faults", "broker-restart,kill", "--broker-restart-command", restart, "--seed", "3", "--json"],
            capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stdout + out.stderr
        result = json.loads(out.stdout)
        assert result["ok"] and result["lost"] == 0 and result["processed"] == 4000
        assert "broker-restart" in result["faults"], result["faults"]
        assert len(list(broker.workdir.glob("broker-*.log"))) >= 1, "the broker was restarted"
    finally:
        broker.cleanup()


def test_ksup_verify_survives_a_broker_pause(tmp_path):
    """The broker-pause fault against a broker of its own: SIGSTOP for 5 s, then SIGCONT, while
    ksup consumes; nothing is lost, and the gap stays under --max-gap."""
    from tests.localkafka import LocalKafka

    broker = LocalKafka(tmp_path / "kafka")
    try:
        broker.start()
        assert broker.proc is not None
        out = subprocess.run(
            [sys.executable, "-m", "supervisor", "verify", "-b", broker.bootstrap, "--messages", "4000",
             "--rate", "500", "--partitions", "4", "--workers", "2", "--fault-interval", "2",
             "--faults", "broker-pause", "--broker-pause-command", f"kill -STOP {broker.proc.pid}",
             "--broker-resume-command", f"kill -CONT {broker.proc.pid}", "--max-gap", "30", "--seed", "3", "--json"],
            capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stdout + out.stderr
        result = json.loads(out.stdout)
        assert result["ok"] and result["lost"] == 0 and "broker-pause" in result["faults"], result
    finally:
        if broker.proc is not None:
            os.kill(broker.proc.pid, 18)  # SIGCONT, whatever happened
        broker.cleanup()


def test_ksup_verify_broker_restart_needs_a_command():
    out = subprocess.run([sys.executable, "-m", "supervisor", "verify", "-b", "127.0.0.1:1", "--faults",
                          "broker-restart"], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and "needs --broker-restart-command" in out.stderr


def test_ksup_verify_rejects_unknown_faults():
    out = subprocess.run([sys.executable, "-m", "supervisor", "verify", "-b", "127.0.0.1:1", "--faults", "meteor"],
                         capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and "unknown fault(s) meteor" in out.stderr


# ---- verify's own failure paths (issue 14) --------------------------------------------------------

def _start_verify(bootstrap: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", "verify", "-b", bootstrap, "--messages", "200000", "--rate", "500",
         "--partitions", "2", "--workers", "1", "--faults", "kill", "--fault-interval", "30", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)


def _ksup_of(verify: subprocess.Popen[str]):  # type: ignore[no-untyped-def]
    import psutil

    from tests.harness import wait_until

    holder = []

    def found() -> bool:
        for child in psutil.Process(verify.pid).children():
            if "start" in child.cmdline() and child.children():
                holder.append(child)
                return True
        return False

    wait_until(found, 60, "verify's ksup and its worker")
    return holder[0]


def _topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return {t for t in AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
            if t.startswith("ksup-verify-")}


def test_verify_killed_leaves_no_process_behind(bootstrap):
    import psutil

    from tests.harness import wait_until

    verify = _start_verify(bootstrap)
    try:
        ksup = _ksup_of(verify)
        tree = [ksup, *ksup.children(recursive=True)]
        os.kill(verify.pid, 9)
        verify.wait(10)
        wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 60,
                   "verify's ksup and workers gone after SIGKILL of verify")
    finally:
        if verify.poll() is None:
            os.killpg(verify.pid, 9)
        for p in psutil.process_iter():
            try:
                if "supervisor.verify.recorder:process" in " ".join(p.cmdline()):
                    p.kill()
            except psutil.Error:
                pass


def test_verify_sigterm_deletes_its_topic_and_reports(bootstrap):
    earlier = _topics(bootstrap)
    verify = _start_verify(bootstrap)
    try:
        _ksup_of(verify)
        before = _topics(bootstrap) - earlier
        assert before, "the scratch topic exists while verify runs"
        verify.send_signal(15)
        out, err = verify.communicate(timeout=90)
        assert verify.returncode == 20, (verify.returncode, err[-2000:])
        assert json.loads(out)["interrupted"], out
        assert not (before & _topics(bootstrap)), "the scratch topic was deleted"
    finally:
        if verify.poll() is None:
            os.killpg(verify.pid, 9)


def test_verify_notices_that_its_ksup_died(bootstrap):
    import time

    verify = _start_verify(bootstrap)
    try:
        ksup = _ksup_of(verify)
        ksup.kill()
        t0 = time.monotonic()
        out, err = verify.communicate(timeout=60)
        assert verify.returncode == 20 and time.monotonic() - t0 < 20, (verify.returncode, err[-2000:])
        assert "its ksup exited" in err, err[-2000:]
    finally:
        if verify.poll() is None:
            os.killpg(verify.pid, 9)


def _verify(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "verify", "-b", bootstrap, "--partitions", "4",
                           "--workers", "2", "--json", *args], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_verify_soak_mode_prints_progress(bootstrap):
    """--duration produces at --rate until the time is up, with a progress line every 10 s."""
    out = _verify(bootstrap, "--duration", "12", "--rate", "300", "--faults", "kill", "--fault-interval", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["produced"] == 3600 and result["lost"] == 0, result
    assert "ksup verify: 1" in out.stderr and "lost so far 0" in out.stderr, out.stderr


def test_verify_supervisor_kill_fault_and_gap_verdict(bootstrap):
    """SIGKILL of verify's ksup supervisor: its workers exit by themselves, a new ksup starts,
    nothing is lost; the report gives the longest gap per fault kind, and a gap above --max-gap
    fails the verdict (exit 1) even with nothing lost."""
    out = _verify(bootstrap, "--messages", "3000", "--rate", "1000", "--faults", "supervisor-kill",
                  "--fault-interval", "1", "--seed", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert "supervisor-kill" in result["faults"] and result["lost"] == 0 and result["ok"], result
    assert "supervisor-kill" in result["gap_by_fault"], result
    strict = _verify(bootstrap, "--messages", "1000", "--rate", "1000", "--faults", "kill", "--fault-interval", "0.5",
                     "--max-gap", "0.000001")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    result = json.loads(strict.stdout)
    assert result["lost"] == 0 and not result["ok"] and result["longest_gap_s"] > result["max_gap_s"], result
