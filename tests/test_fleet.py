"""ksup as one member of a fleet: several ksup instances ("hosts": distinct --instance-id-prefix
and --control-socket) in one consumer group on the real broker. Readiness from the group's
point of view (READY=1 per host, /readyz, ksup health agree), a rolling reload of every host in
turn under load, and identity clashes (same host: refused; other host: the fenced side halts).
Judged by the handler's record and the broker's committed offsets."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.harness import ksup_cli, read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, free_port_unused
from tests.test_observability import endpoint
from tests.test_systemd import NotifyListener

pytestmark = pytest.mark.kafka

HANDLER = "tests.handlers.recording:process"


class Load(threading.Thread):
    """Produces ``rate`` messages per second, round-robin over the partitions, until stopped."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, rate: int) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
        self.topic, self.partitions, self.rate = topic, partitions, rate
        self.stopped = threading.Event()
        self.sent = 0

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stopped.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while self.sent < due:
                self.producer.produce(self.topic, value=f"seq-{self.sent}".encode(),
                                      partition=self.sent % self.partitions)
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.01)  # paces the load only
        assert self.producer.flush(30) == 0

    def finish(self) -> None:
        self.stopped.set()
        self.join(60)


def status(sock: Path) -> dict:
    out = ksup_cli("status", "--json", "--socket", str(sock), timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def loss_and_dups(record: Path, ends: dict[int, int]) -> tuple[list[tuple[int, int]], int]:
    seen = Counter((p, o) for p, o, _ in read_record(record))
    lost = [(p, o) for p, end in ends.items() for o in range(end) if (p, o) not in seen]
    return lost, sum(n - 1 for n in seen.values())


def test_fleet_of_three_ready_each_and_rolled_one_host_at_a_time(ksup, bootstrap, names, tmp_path):
    """3 hosts x 2 workers, 4 partitions (so 2 members own nothing: an empty assignment counts).
    Each host sends READY=1; each `ksup reload --wait` exits 0 with its per-slot report while
    messages flow; no member that is not being replaced is ever revoked; nothing is lost."""
    topic, group = names
    partitions = 4
    create_topic(bootstrap, topic, partitions)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.002"}
    load = Load(bootstrap, topic, partitions, rate=200)
    load.start()
    hosts, listeners = [], []
    try:
        for i in range(3):
            listener = NotifyListener(tmp_path / f"notify-{i}.sock")
            listener.start()
            listeners.append(listener)
            sock = tmp_path / f"h{i}.sock"
            run = ksup(HANDLER, bootstrap, topic, group, workers=2,
                       env={**env, "NOTIFY_SOCKET": str(tmp_path / f"notify-{i}.sock")},
                       extra=["--instance-id-prefix", f"h{i}", "--control-socket", str(sock),
                              "-X", "session.timeout.ms=10000"])
            hosts.append((run, sock))
        for i, listener in enumerate(listeners):
            wait_until(lambda lst=listener: "READY=1" in lst.sequence(), 90, f"READY=1 from host {i}")
        for _, sock in hosts:
            assert ksup_cli("health", "--ready", "--socket", str(sock)).returncode == 0
        owned = [p for _, sock in hosts for w in status(sock)["workers"] for p in w["partitions"]]
        assert sorted(owned) == sorted(f"{topic}[{p}]" for p in range(partitions)), owned

        gaps = []
        for i, (_, sock) in enumerate(hosts):
            others = {w["pid"]: w for j, (_, s) in enumerate(hosts) if j != i for w in status(s)["workers"]}
            t0 = time.monotonic()
            out = ksup_cli("reload", "--wait", "--socket", str(sock), timeout=180)
            assert out.returncode == 0, f"host {i}: {out.stdout}{out.stderr}"
            slots = re.findall(r"worker (\d+): pid (\d+) -> (\d+), partitions without a consumer ([\d.]+)s", out.stdout)
            assert len(slots) == 2, out.stdout
            gaps += [float(g) for *_, g in slots]
            print(f"host {i} rolled in {time.monotonic() - t0:.1f}s: {out.stdout.strip()}")
            # Members of the other hosts kept their pids and were never revoked.
            for j, (_, s) in enumerate(hosts):
                if j == i:
                    continue
                for w in status(s)["workers"]:
                    assert w["pid"] in others, f"host {j}'s worker {w['slot']} was replaced"
                    assert w["revocations"] == others[w["pid"]]["revocations"], \
                        f"host {j}'s worker {w['slot']} was revoked during host {i}'s roll"
            assert ksup_cli("health", "--ready", "--socket", str(sock)).returncode == 0
        for i, listener in enumerate(listeners):
            assert listener.sequence().count("READY=1") >= 2, f"host {i}: READY=1 again after its reload"
        # The new workers (every worker now) were never revoked either.
        assert all(w["revocations"] == 0 for _, s in hosts for w in status(s)["workers"])
        load.finish()
        ends = end_offsets(bootstrap, topic, partitions)
        wait_until(lambda: committed_offsets(bootstrap, group, topic, partitions) == ends, 90, "all committed", 0.5)
        for run, _ in hosts:
            assert run.stop() == 0, run.tail()
        lost, dups = loss_and_dups(record, ends)
        assert lost == [], lost[:10]
        print(f"fleet roll: {sum(ends.values())} messages, lost {len(lost)}, duplicates {dups}, "
              f"longest gap {max(gaps):.3f}s")
    finally:
        load.stopped.set()
        for listener in listeners:
            listener.stopped.set()


def test_health_readyz_and_healthz_agree_on_every_state(ksup, bootstrap, names, tmp_path):
    """starting, ready, a worker down, stopping: `ksup health`, `ksup health --ready`, /healthz
    and /readyz give the same verdicts (readiness.py is their one definition)."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    port = free_port_unused()
    sock = tmp_path / "ctl.sock"
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_IMPORT_SLEEP": "4", "KSUP_TEST_EXIT_AT": "0:1",
           "KSUP_TEST_SLOW_AT": "1:1", "KSUP_TEST_SLOW_S": "8"}
    run = ksup("tests.handlers.slow_import:process", bootstrap, topic, group, workers=2, env=env,
               extra=["--metrics-addr", f"127.0.0.1:{port}", "--control-socket", str(sock),
                      "--restart-delay", "30", "--graceful-timeout", "20"])

    def verdicts() -> tuple[bool, bool, bool, bool]:
        health = ksup_cli("health", "--socket", str(sock)).returncode == 0
        ready = ksup_cli("health", "--ready", "--socket", str(sock)).returncode == 0
        return health, endpoint(port, "/healthz")[0] == 200, ready, endpoint(port, "/readyz")[0] == 200

    run.wait_for_log("metrics and health on", 30)
    run.wait_for_log("control socket at", 30)
    assert verdicts() == (False, False, False, False), "starting"
    code, body = endpoint(port, "/readyz")
    assert code == 503 and body["problems"] == ["supervisor is starting"], body

    wait_until(lambda: verdicts() == (True, True, True, True), 60, "ready and healthy everywhere")

    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, b"x", partition=0)
    p.produce(topic, b"x", partition=0)  # offset 1 of partition 0: the handler exits the worker
    p.flush(10)
    run.wait_for_log("restarts in 30.0s", 60)
    # Whichever worker owned partition 0 died (the assignor decides which one that is).
    dead = re.search(r"worker (\d+) restarts in 30.0s", run.log_text())
    assert dead is not None, run.tail()
    assert verdicts() == (False, False, False, False), "a worker down"
    code, body = endpoint(port, "/readyz")
    assert code == 503 and f"worker {dead[1]} is not running" in body["problems"], body

    p.produce(topic, b"x", partition=1)
    p.produce(topic, b"x", partition=1)  # offset 1 of partition 1 takes 8 s
    p.flush(10)
    wait_until(lambda: any(w["in_flight"] for w in status(sock)["workers"]), 30, "the slow message in flight")
    run.signal(15)
    run.wait_for_log("draining", 10)
    assert verdicts() == (False, False, False, False), "stopping"
    assert "supervisor is stopping" in ksup_cli("health", "--socket", str(sock)).stderr
    assert run.wait(60) == 0, run.tail()


def test_same_prefix_on_the_same_host_is_refused_at_start(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record)}
    first = ksup(HANDLER, bootstrap, topic, group, env=env,
                 extra=["--instance-id-prefix", "dup", "--control-socket", str(tmp_path / "a.sock")])
    wait_until(lambda: ksup_cli("health", "--ready", "--socket", str(tmp_path / "a.sock")).returncode == 0,
               60, "the first ksup ready")
    second = ksup(HANDLER, bootstrap, topic, group, env=env,
                  extra=["--instance-id-prefix", "dup", "--control-socket", str(tmp_path / "b.sock")])
    assert second.wait(30) == 8, second.tail()
    last = second.log_text().strip().splitlines()[-1]
    assert "another ksup on this host" in last and "'dup'" in last and "--instance-id-prefix" in last, last
    assert "worker 0 started" not in second.log_text(), "refused before any worker exists"
    # The first one never noticed: it stays ready and keeps consuming.
    p = Producer({"bootstrap.servers": bootstrap})
    for n in range(20):
        p.produce(topic, str(n).encode(), partition=n % 2)
    p.flush(10)
    wait_until(lambda: len(read_record(record)) == 20, 60, "the first ksup processed the new messages")
    assert ksup_cli("health", "--socket", str(tmp_path / "a.sock")).returncode == 0
    assert first.stop() == 0, first.tail()


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_same_prefix_on_another_host_halts_the_fenced_side(ksup, bootstrap, names, tmp_path, protocol):
    """Two "hosts" (the local identity claim bypassed) with one prefix: the broker fences one
    side's static members (classic: the older member; KIP-848: the newcomer, refused until
    --instance-id-wait, 5 s here, has passed). That ksup halts with exit 8 naming the prefix and
    processes nothing more; the other consumes everything."""
    topic, group = names
    partitions = 2
    create_topic(bootstrap, topic, partitions)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.002"}
    extra = ["--instance-id-prefix", "dup", "--group-protocol", protocol, "--instance-id-wait", "5"]
    load = Load(bootstrap, topic, partitions, rate=200)
    load.start()
    try:
        a = ksup(HANDLER, bootstrap, topic, group, workers=2, env=env,
                 extra=[*extra, "--control-socket", str(tmp_path / "a.sock")])
        wait_until(lambda: len({pid for *_, pid in read_record(record)}) == 2, 60, "host A consuming")
        a_pids = set(a.worker_pids())
        b = ksup(HANDLER, bootstrap, topic, group, workers=2, env={**env, "KSUP_IDENTITY_SCOPE": "host-b"},
                 extra=[*extra, "--control-socket", str(tmp_path / "b.sock")])
        fenced, survivor = (a, b) if protocol == "classic" else (b, a)
        t0 = time.monotonic()
        assert fenced.wait(60) == 8, fenced.tail()
        halted_in = time.monotonic() - t0
        last = fenced.log_text().strip().splitlines()[-1]
        assert "exit 8 (FENCED)" in last and "'dup'" in last and "own --instance-id-prefix" in last, last
        fenced_pids = fenced.seen_pids
        done_at_halt = sum(1 for *_, pid in read_record(record) if pid in fenced_pids)
        time.sleep(2)  # paces the load: the survivor keeps consuming meanwhile
        assert sum(1 for *_, pid in read_record(record) if pid in fenced_pids) == done_at_halt
        load.finish()
        ends = end_offsets(bootstrap, topic, partitions)
        wait_until(lambda: committed_offsets(bootstrap, group, topic, partitions) == ends, 90, "all committed", 0.5)
        assert survivor.proc.poll() is None, "the other side keeps running"
        assert survivor.stop() == 0, survivor.tail()
        lost, dups = loss_and_dups(record, ends)
        assert lost == [], lost[:10]
        print(f"{protocol}: fenced side halted {halted_in:.1f}s after the second start; {sum(ends.values())} "
              f"messages, lost 0, duplicates {dups}; A's workers {sorted(a_pids)}")
    finally:
        load.stopped.set()


def test_rolling_upgrade_script_fleet_mode_rolls_each_host_and_stops_at_the_first_failure(ksup, bootstrap, names,
                                                                                         tmp_path):
    import os
    import subprocess
    import sys

    from tests.harness import REPO
    from tests.kafkautil import produce_sequence
    from tests.test_rolling_reload import _wheel, rows

    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 100, partitions=2)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "1.0")
    _wheel(wheels, "2.0")
    venv = Path(sys.executable).parent.parent
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "ksup-example-handler==1.0"], env=pip_env,
                   check=True, timeout=120)
    script = str(REPO / "examples" / "rolling-upgrade.sh")
    try:
        socks = [tmp_path / "h0.sock", tmp_path / "h1.sock"]
        hosts = [ksup("ksup_example_handler:process", bootstrap, topic, group,
                      env={"KSUP_TEST_RECORD": str(tmp_path / "record.txt")},
                      extra=["--instance-id-prefix", f"h{i}", "--control-socket", str(sock)])
                 for i, sock in enumerate(socks)]
        for sock in socks:
            wait_until(lambda s=sock: ksup_cli("health", "--ready", "--socket", str(s)).returncode == 0, 60, "ready")
        wait_until(lambda: len(rows(tmp_path / "record.txt")) >= 100, 60, "messages processed by 1.0")
        # A missing first target: the rollout stops there and rolls nothing else.
        out = subprocess.run([script, str(venv), "ksup-example-handler==2.0", group, str(tmp_path / "nope.sock"),
                              *map(str, socks)], env=pip_env, capture_output=True, text=True, timeout=180)
        assert out.returncode != 0 and "stopped at" in out.stderr and "after 0 of 3" in out.stderr, out.stderr
        assert "partitions without a consumer" not in out.stdout
        out = subprocess.run([script, str(venv), "ksup-example-handler==2.0", group, *map(str, socks)],
                             env=pip_env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count("partitions without a consumer") == 2, out.stdout
        assert out.stdout.count("every worker runs ksup-example-handler 2.0") == 2, out.stdout
        assert "rolled 2 ksup instance(s)" in out.stdout
        for run in hosts:
            assert run.stop() == 0, run.tail()
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "ksup-example-handler"],
                       env=pip_env, timeout=120)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_fleet_reload_with_dynamic_membership_and_empty_assignments(ksup, bootstrap, names, tmp_path, protocol):
    """2 ksup x 2 workers, 2 partitions: two members own nothing (an empty assignment counts as
    joined on both protocols); without static membership each reload's gate is the group
    rebalanced to stable; each `ksup reload --wait` exits 0 and nothing is lost."""
    topic, group = names
    partitions = 2
    create_topic(bootstrap, topic, partitions)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.002"}
    load = Load(bootstrap, topic, partitions, rate=100)
    load.start()
    try:
        socks = [tmp_path / "h0.sock", tmp_path / "h1.sock"]
        hosts = [ksup(HANDLER, bootstrap, topic, group, workers=2, env=env,
                      extra=["--no-static-membership", "--group-protocol", protocol, "--control-socket", str(sock),
                             *(["-X", "session.timeout.ms=6000"] if protocol == "classic" else [])])
                 for sock in socks]
        for sock in socks:
            wait_until(lambda s=sock: ksup_cli("health", "--ready", "--socket", str(s)).returncode == 0, 90, "ready")
        for i, sock in enumerate(socks):
            out = ksup_cli("reload", "--wait", "--socket", str(sock), timeout=180)
            assert out.returncode == 0, f"host {i}: {out.stdout}{out.stderr}"
            assert out.stdout.count("partitions without a consumer") == 2, out.stdout
        load.finish()
        ends = end_offsets(bootstrap, topic, partitions)
        wait_until(lambda: committed_offsets(bootstrap, group, topic, partitions) == ends, 90, "all committed", 0.5)
        for run in hosts:
            assert run.stop() == 0, run.tail()
        lost, dups = loss_and_dups(record, ends)
        assert lost == [], lost[:10]
        print(f"dynamic {protocol}: {sum(ends.values())} messages, lost 0, duplicates {dups}")
    finally:
        load.stopped.set()
