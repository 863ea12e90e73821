"""Rolling reload under continuous production: no message lost, none processed twice, the new
workers run the new code, and with static membership the other workers are never revoked."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import REPO, ksup_cli, wait_until, whole_lines
from tests.kafkautil import committed_offsets, create_topic, end_offsets, produce_sequence
from tests.wheels import write_wheel

pytestmark = pytest.mark.kafka

PARTITIONS = 8
HANDLER_CODE = '''
import os, time
VERSION = "{version}"
_fd = os.open(os.environ["KSUP_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def process(record):
    time.sleep(0.002)
    os.write(_fd, f"{{record.partition}} {{record.offset}} {{os.getpid()}} {{VERSION}}\\n".encode())
'''


def rows(path: Path) -> list[tuple[int, int, int, str]]:
    out = []
    for line in whole_lines(path):
        p, o, pid, version = line.split()
        out.append((int(p), int(o), int(pid), version))
    return out



class SteadyProducer(threading.Thread):
    """Produces ``rate`` messages a second in small bursts until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: int) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.stopped = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            burst = self.rate // 10
            produce_sequence(self.bootstrap, self.topic, burst, start=100_000 + self.sent, partitions=PARTITIONS)
            self.sent += burst
            self.stopped.wait(0.1)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_rolling_reload_under_load_static_membership(ksup, bootstrap, names, tmp_path, protocol):
    topic, group = names
    create_topic(bootstrap, topic, PARTITIONS)
    produce_sequence(bootstrap, topic, 2000, partitions=PARTITIONS)
    (tmp_path / "versioned.py").write_text(HANDLER_CODE.format(version="v1"))
    record = tmp_path / "record.txt"
    run = ksup("versioned:process", bootstrap, topic, group, workers=4, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "PYTHONDONTWRITEBYTECODE": "1"},
               extra=["--group-protocol", protocol])
    producer = SteadyProducer(bootstrap, topic, 400)
    producer.start()
    try:
        wait_until(lambda: len({pid for *_, pid, _ in rows(record)}) == 4, 90, "all 4 workers busy")
        time.sleep(1)  # pacing only: a second of steady load before the roll
        (tmp_path / "versioned.py").write_text(HANDLER_CODE.format(version="version-two"))
        out = ksup_cli("reload", "-g", group, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr + run.tail()
        time.sleep(1)  # pacing only: a second of steady load after the roll (the checks below wait)
    finally:
        producer.stopped.set()
        producer.join(30)
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    wait_until(lambda: committed_offsets(bootstrap, group, topic, PARTITIONS) == ends, 120, "all committed", 0.5)
    before_stop = run.log_records()
    assert run.stop() == 0, run.tail()

    # Every slot reports old pid -> new pid and the gap its partitions had.
    lines = [line for line in out.stdout.splitlines() if line.startswith("worker ")]
    assert len(lines) == 4 and all("partitions without a consumer" in line for line in lines), out.stdout
    old_pids = {int(line.split()[3]) for line in lines}
    new_pids = {int(line.split()[5].rstrip(",")) for line in lines}

    got = rows(record)
    seen = Counter((p, o) for p, o, _, _ in got)
    missing = [(p, o) for p, end in ends.items() for o in range(end) if (p, o) not in seen]
    assert missing == []
    assert sum(n - 1 for n in seen.values() if n > 1) == 0, "nothing processed twice"
    assert {v for _, _, pid, v in got if pid in new_pids} == {"version-two"}
    assert {v for _, _, pid, v in got if pid in old_pids} == {"v1"}
    # Static membership: during the roll only the worker being replaced saw a revocation.
    revoked_by = {r["pid"] for r in before_stop if r["message"].startswith("revoked")}
    assert revoked_by <= old_pids, (revoked_by, old_pids)


def test_reload_with_broken_new_code_stops_and_keeps_consuming(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 4)
    produce_sequence(bootstrap, topic, 200, partitions=4)
    (tmp_path / "versioned.py").write_text(HANDLER_CODE.format(version="v1"))
    record = tmp_path / "record.txt"
    run = ksup("versioned:process", bootstrap, topic, group, workers=2, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "PYTHONDONTWRITEBYTECODE": "1"})
    wait_until(lambda: len(rows(record)) >= 200, 60, "first batch processed")
    pids_before = set(run.worker_pids())
    (tmp_path / "versioned.py").write_text("raise ImportError('half-installed release')\n")
    out = ksup_cli("reload", "-g", group, timeout=180)
    assert out.returncode != 0
    assert "reload stopped: worker 0: handler 'versioned:process': importing 'versioned' raised ImportError: " \
           "half-installed release" in out.stderr, out.stderr
    assert set(run.worker_pids()) == pids_before, "the old workers keep running"
    produce_sequence(bootstrap, topic, 200, start=200, partitions=4)
    wait_until(lambda: len(rows(record)) >= 400, 60, "consumption goes on after the failed reload")
    assert run.stop() == 0, run.tail()


def _wheel(folder: Path, version: str) -> None:
    """A minimal wheel of package ksup_example_handler (no build step, no index needed)."""
    write_wheel(folder, "ksup_example_handler", "ksup-example-handler", version,
                HANDLER_CODE.format(version=version) + f"__version__ = {version!r}\n")


def test_rolling_upgrade_script_installs_rolls_and_checks_the_version(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 100, partitions=2)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "1.0")
    _wheel(wheels, "2.0")
    venv = Path(sys.executable).parent.parent
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PYTHONPATH": str(REPO)}
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "ksup-example-handler==1.0"], env=pip_env, check=True, timeout=120)
    try:
        run = ksup("ksup_example_handler:process", bootstrap, topic, group, workers=2,
                   env={"KSUP_TEST_RECORD": str(tmp_path / "record.txt")})
        wait_until(lambda: len(rows(tmp_path / "record.txt")) >= 100, 60, "messages processed by 1.0")
        out = subprocess.run([str(REPO / "examples" / "rolling-upgrade.sh"), str(venv), "ksup-example-handler==2.0",
                              group], env=pip_env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr + run.tail()
        assert "every worker runs ksup-example-handler 2.0" in out.stdout
        assert out.stdout.count("partitions without a consumer") == 2
        assert run.stop() == 0
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "ksup-example-handler"],
                       env=pip_env, timeout=120)


def test_a_reload_whose_old_worker_did_not_drain_cleanly_says_so_and_exits_4(ksup, bootstrap, names, tmp_path):
    """The old worker's drain gives up on a message slower than --graceful-timeout: the slot is
    replaced, but `ksup reload` must not print a plain "reload done" and exit 0 (as it did): it
    names the message, exits 4 (the README's table: a message abandoned), and the new worker
    handles that message again, so nothing is lost."""
    from tests.test_handlers_and_policies import all_committed, loaded, missing

    topic, group = names
    ends = loaded(bootstrap, topic, 1, 20)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLOW_AT": "0:3", "KSUP_TEST_SLOW_S": "8"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env,
               extra=["--graceful-timeout", "1"])
    # One partition, in order: with 0, 1 and 2 recorded, 0:3 is in the handler.
    wait_until(lambda: record.exists() and len(whole_lines(record)) >= 3, 60, "0:3 in the handler")
    out = ksup_cli("reload", "-g", group, timeout=120)
    assert out.returncode == 4, out.stdout + out.stderr + run.tail()
    assert "NOT DRAINED CLEANLY" in out.stdout and f"{topic}[0]@3" in out.stdout, out.stdout
    assert "did not drain cleanly" in out.stderr and "reload done" not in out.stdout, out.stdout + out.stderr
    all_committed(bootstrap, group, topic, ends, timeout=90)
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == []


def test_a_reload_whose_old_worker_raised_while_draining_says_so_and_exits_4(ksup, bootstrap, names, tmp_path):
    """Two things at once: a reload drains the old worker while its handler runs, and that
    handler then raises (--on-error stop). The old worker used to exit 0 (the drain's first
    reason kept its code), so the reload said it drained cleanly. Now it says NOT DRAINED CLEANLY,
    exits 4, and the new worker handles that message (the oracle: the handler's record and the
    broker's committed offsets)."""
    from tests.test_handlers_and_policies import all_committed, loaded, missing

    topic, group = names
    ends = loaded(bootstrap, topic, 1, 20)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_RAISE_ON_GO_AT": "0:10"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env)
    wait_until(lambda: Path(f"{record}.KSUP_TEST_RAISE_ON_GO_AT").exists(), 60, "the handler on 0:10")
    result: list[subprocess.CompletedProcess[str]] = []
    reload = threading.Thread(target=lambda: result.append(ksup_cli("reload", "-g", group, timeout=120)))
    reload.start()
    try:
        run.wait_for_log("drain requested: SIGTERM received", 60)  # the old worker's (a reload signals it)
        Path(f"{record}.go").touch()  # the old worker's handler raises now, inside its drain
    finally:
        reload.join(130)
    out = result[0]
    assert out.returncode == 4, out.stdout + out.stderr + run.tail()
    assert "NOT DRAINED CLEANLY" in out.stdout and f"{topic}[0]@10" in out.stdout, out.stdout
    all_committed(bootstrap, group, topic, ends, timeout=90)
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == []
    assert Counter(o for _, o, _ in (line.split() for line in whole_lines(record)))["10"] == 1


def test_a_reload_refused_during_a_roll_says_refused_not_that_the_roll_stopped(ksup, bootstrap, names, tmp_path):
    """A second `ksup reload --wait` while a roll runs (`systemctl reload` during a deploy
    script's reload) is refused. Hostile review: it exited 3 (BOOT_FAILED) with "reload
    stopped: ...", although nothing stopped and no code failed to boot, so a script rolling back
    on 3 would have rolled back a good release. Now: "reload refused", exit 2, and the roll in
    progress ends 0."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    (tmp_path / "versioned.py").write_text(HANDLER_CODE.format(version="v1"))
    run = ksup("versioned:process", bootstrap, topic, group, workers=2, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(tmp_path / "record.txt"), "PYTHONDONTWRITEBYTECODE": "1"})
    run.wait_for_log("all 2 workers loaded", 60)  # running: before that a reload is refused anyway
    first = subprocess.Popen([sys.executable, "-m", "supervisor", "reload", "-g", group],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        run.wait_for_log("rolling reload of 2 worker(s) begins", 60)
        second = ksup_cli("reload", "-g", group, timeout=60)
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    assert second.returncode == 2, (second.returncode, second.stderr)
    assert "reload refused: a rolling reload is already in progress" in second.stderr, second.stderr
    assert "stopped" not in second.stderr, second.stderr
    assert first.returncode == 0, (out, err)
    assert run.stop() == 0, run.tail()
