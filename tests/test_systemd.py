"""systemd: the unit files verify, and sd_notify tells systemd the truth over a real socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from supervisor.adapters.systemd import check_unit, parse_timespan
from tests.harness import REPO, wait_until
from tests.kafkautil import create_topic, produce_sequence

UNITS = ["ksup.service", "ksup@.service"]


def test_unit_files_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: install Debian's systemd package (make tools does)"
    ksup_bin = str(Path(sys.executable).parent / "ksup")
    assert os.access(ksup_bin, os.X_OK)
    for unit in UNITS:
        # verify insists that ExecStart's binary exists: point it at this environment's ksup.
        text = (REPO / "systemd" / unit).read_text().replace("/opt/ksup/bin/ksup", ksup_bin)
        (tmp_path / unit.replace("@.", "@orders.")).write_text(text)
        (tmp_path / unit).write_text(text)
    out = subprocess.run([analyze, "verify", *(str(p) for p in tmp_path.glob("*.service") if "@." not in p.name)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ksup" not in out.stderr, out.stderr  # no warnings about our units either


def test_unit_checks():
    assert parse_timespan("1min 30s") == 90 and parse_timespan("45s") == 45 and parse_timespan("infinity") is None
    errors, warnings = check_unit(30, {"TimeoutStopUSec": "20s", "KillMode": "control-group"})
    assert "is not below the unit's TimeoutStopSec (20s)" in errors[0]
    assert "KillMode=control-group" in warnings[0]
    assert check_unit(30, {"TimeoutStopUSec": "45s", "KillMode": "mixed"}) == ([], [])


class NotifyListener(threading.Thread):
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.messages if line.startswith(prefix)]

    def sequence(self) -> list[str]:
        keys = ("READY=1", "RELOADING=1", "STOPPING=1")
        return [line for _, line in self.messages if line in keys]


@pytest.mark.kafka
def test_sd_notify_sequence_and_watchdog(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 3000, partitions=2)
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    record = tmp_path / "record.txt"
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000",
           "KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.01"}
    try:
        run = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2, env=env,
                   extra=["--heartbeat-timeout", "4", "--restart-delay", "0.2"])
        wait_until(lambda: listener.sequence() == ["READY=1"], 60, "READY=1")
        reload = subprocess.run([sys.executable, "-m", "supervisor", "reload", "-g", group], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert reload.returncode == 0, reload.stderr
        wait_until(lambda: listener.sequence() == ["READY=1", "RELOADING=1", "READY=1"], 30, "READY after reload")
        assert listener.lines("MONOTONIC_USEC="), "RELOADING=1 carries MONOTONIC_USEC"

        # A worker hangs (SIGSTOP): the watchdog pings stop until it is replaced, then resume.
        wait_until(lambda: len(listener.lines("WATCHDOG=1")) > 3, 10, "watchdog pings")
        victim = run.worker_pids()[0]
        os.kill(victim, signal.SIGSTOP)
        hung_at = time.monotonic()
        run.wait_for_log(f"(pid {victim}) killed by SIGKILL", 30)
        wait_until(lambda: any(t > hung_at + 4 for t, _ in listener.lines("WATCHDOG=1")), 30, "pings resume")
        pings = [t for t, _ in listener.lines("WATCHDOG=1")]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False) if a >= hung_at - 0.5]
        assert max(gaps) > 2.0, f"the watchdog kept pinging while a worker hung: gaps {gaps}"
        before = [b - a for a, b in zip(pings, pings[1:], strict=False) if b < hung_at]
        assert min(before) < 0.5, "pings every WatchdogSec/2"

        assert run.stop() == 0, run.tail()
        assert listener.sequence()[-1] == "STOPPING=1"
        statuses = [line for _, line in listener.lines("STATUS=")]
        assert any("partition(s)" in s for s in statuses) and any(s.startswith("STATUS=stopping") for s in statuses)
    finally:
        listener.stopped.set()
        listener.join(5)
