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
        [sys.executable, "-m", "supervisor", "verify", "-b", bootstrap, "--messages", "6000", "--rate", "1500",
         "--partitions", "4", "--workers", "2", "--fault-interval", "0.8", "--seed", "7", "--json"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] and result["lost"] == 0 and result["committed_ok"]
    assert result["produced"] == 6000 and result["processed"] == 6000
    assert len(result["faults"]) >= 3, result["faults"]
    assert any(f.startswith("exception") for f in result["faults"])
    assert sum(result["duplicates_by_fault"].values()) == result["duplicates"]


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
