"""A consumer group made of ksup "hosts" on the local 3-node cluster, and the oracles the cluster
scenarios judge it by.

A host is one ``ksup start`` with its own ``--instance-id-prefix`` (``h0``, ``h1``, ...) and
control socket; its workers are the group's members (instance id ``<prefix>-<slot>``). The
handler (tests/handlers/rebalances.py) is the witness outside ksup: it records every message
it finished and every assignment change of its member. The broker is the other witness: its
committed offsets, and its view of the group (AdminClient describe while polling; Kafka's own
kafka-consumer-groups at the check points, see tests/grouptool.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from supervisor.adapters.control import request
from tests import grouptool
from tests.cluster.brokerview import BrokerView
from tests.harness import KsupRun, ksup_cli, read_record, wait_until, whole_lines
from tests.kafkautil import committed_offsets, end_offsets
from tests.localcluster import LocalKafkaCluster

HANDLER = "tests.handlers.rebalances:Witness"


class Load(threading.Thread):
    """Produces ``rate`` messages a second, round-robin over the partitions, until ``finish()``.
    Idempotent with acks=all, so a broker bounce neither loses nor doubles a message in the
    topic; every delivery error is kept (a scenario asserts there were none)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, rate: int) -> None:
        super().__init__(daemon=True)
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                                  "enable.idempotence": True, "log_level": 2})
        self.topic, self.partitions, self.rate = topic, partitions, rate
        self.stopped = threading.Event()
        self.sent = 0
        self.errors: list[str] = []

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stopped.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while self.sent < due:
                try:
                    self.producer.produce(self.topic, value=f"seq-{self.sent}".encode(),
                                          partition=self.sent % self.partitions, on_delivery=self._delivered)
                except BufferError:
                    break
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.01)  # paces the load only
        left = self.producer.flush(60)
        if left:
            self.errors.append(f"{left} messages not delivered")

    def finish(self) -> None:
        self.stopped.set()
        self.join(90)
        assert not self.errors, f"the producer failed: {self.errors[:3]}"


@dataclass(frozen=True)
class Event:
    """One line of the witness: member ``pid`` was given (assign) or lost (revoke) ``partitions``."""

    pid: int
    kind: str
    partitions: tuple[int, ...]


class Host:
    """One ksup instance of the fleet; ``start()`` again after a stop is a restart of that host
    (same prefix, so the same instance ids)."""

    def __init__(self, fleet: Fleet, name: str, workers: int, extra: list[str]) -> None:
        self.fleet, self.name, self.workers, self.extra = fleet, name, workers, extra
        self.sock = fleet.tmp_path / f"{name}.sock"
        self.runs: list[KsupRun] = []
        self.wanted = False  # started and not told to stop: its exit would be a failure

    @property
    def run(self) -> KsupRun:
        return self.runs[-1]

    @property
    def alive(self) -> bool:
        return bool(self.runs) and self.run.proc.poll() is None

    def start(self) -> None:
        f = self.fleet
        f.log(f"start {self.name}")
        self.wanted = True
        self.runs.append(f.ksup(f.handler, f.cluster.bootstrap, f.topic, f.group, workers=self.workers, env=f.env,
                                extra=["--instance-id-prefix", self.name, "--control-socket", str(self.sock),
                                       "--group-protocol", f.protocol, *f.member_options, *self.extra]))

    def stop(self, hard: bool = False, timeout: float = 60.0) -> int | None:
        """Clean: SIGTERM, the drain, ksup's exit code. Hard: SIGKILL of every worker and the
        supervisor at once (a host that loses power), no drain, no exit code."""
        self.fleet.log(f"{'kill' if hard else 'stop'} {self.name}")
        self.wanted = False
        if not hard:
            code = self.run.stop(timeout)
            self.fleet.log(f"{self.name} exited {code}")
            return code
        pids = self.run.worker_pids()
        for pid in [*pids, self.run.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.run.wait(30)
        wait_until(lambda: not any(alive(p) for p in pids), 30, f"{self.name}'s workers gone")
        return None

    def ask(self, cmd: str) -> dict[str, Any]:
        return request(str(self.sock), {"cmd": cmd}, timeout=10)

    def status(self) -> dict[str, Any]:
        return self.ask("status")

    def ready(self) -> bool:
        try:
            return bool(self.ask("ready").get("ready"))
        except (OSError, ValueError):
            return False

    def pids(self) -> set[int]:
        """Pids of every worker this host ever ran (all its starts)."""
        for run in self.runs:
            run.worker_pids()
        return {pid for run in self.runs for pid in run.seen_pids}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Fleet:
    """The group under test: a topic (replication factor 3), a producer running throughout,
    ksup hosts as members, and the oracles."""

    def __init__(self, ksup: type[KsupRun], cluster: LocalKafkaCluster, names: tuple[str, str], tmp_path: Path,
                 protocol: str, partitions: int = 3, rate: int = 150, session_s: float = 10.0,
                 static: bool = True, env: dict[str, str] | None = None, handler: str = HANDLER) -> None:
        self.ksup, self.cluster, self.tmp_path, self.protocol = ksup, cluster, tmp_path, protocol
        self.topic, self.group = names
        self.partitions, self.rate, self.static, self.handler = partitions, rate, static, handler
        self.record = tmp_path / "record.txt"
        self.env = {"KSUP_TEST_RECORD": str(self.record), "KSUP_TEST_SLEEP": "0.002", **(env or {})}
        # KIP-848 takes the session timeout from the broker (group.consumer.session.timeout.ms,
        # 10 s in tests/localkafka.py); librdkafka refuses the client setting with that protocol.
        self.member_options = ([] if static else ["--no-static-membership"]) + (
            ["-X", f"session.timeout.ms={int(session_s * 1000)}"] if protocol == "classic" else [])
        self.hosts: dict[str, Host] = {}
        self.admin = AdminClient({"bootstrap.servers": cluster.bootstrap, "log_level": 2})
        self.view = BrokerView(cluster.bootstrap)
        fut = self.admin.create_topics([NewTopic(self.topic, num_partitions=partitions, replication_factor=3)])
        fut[self.topic].result(30)
        wait_until(lambda: len(self.cluster.under_replicated()) == 0 and self._leaders_known(), 30, "topic ready")
        self.load = Load(cluster.bootstrap, self.topic, partitions, rate)
        self.t0 = time.monotonic()

    def log(self, what: str) -> None:
        """A timestamped step in the test's output (shown when it fails; -s to see it live)."""
        print(f"[{time.monotonic() - self.t0:7.2f}s] {what}", flush=True)

    def _leaders_known(self) -> bool:
        md = self.admin.list_topics(self.topic, timeout=10).topics[self.topic]
        return md.error is None and len(md.partitions) == self.partitions and all(
            p.leader >= 0 for p in md.partitions.values())

    # ---- hosts -----------------------------------------------------------------------------------

    def add_host(self, workers: int = 1, extra: list[str] | None = None, start: bool = True) -> Host:
        host = Host(self, f"h{len(self.hosts)}", workers, extra or [])
        self.hosts[host.name] = host
        if start:
            host.start()
        return host

    def check_hosts(self) -> None:
        """Fail at once when a host that should be running has exited (instead of waiting for
        a settle that cannot come)."""
        for h in self.hosts.values():
            if h.wanted and not h.alive:
                lines = h.run.log_text().strip().splitlines()
                raise AssertionError(f"{h.name} exited {h.run.proc.returncode} unasked: {lines[-1] if lines else ''}")

    def live_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.alive]

    def members_expected(self) -> int:
        return sum(h.workers for h in self.live_hosts())

    def stop_all(self, hard: bool = False) -> dict[str, int | None]:
        """Stop every live host together (as Kafka's stop_all): SIGTERM all, then wait."""
        live = self.live_hosts()
        for h in live:
            h.wanted = False
        if hard:
            return {h.name: h.stop(hard=True) for h in live}
        for h in live:
            h.run.signal(signal.SIGTERM)
        return {h.name: h.run.wait(90) for h in live}

    # ---- the witness -----------------------------------------------------------------------------

    def events(self) -> list[Event]:
        path = Path(f"{self.record}.rebalances")
        out = []
        for line in whole_lines(path):
            pid, kind, *parts = line.split()
            out.append(Event(int(pid), kind, tuple(int(p) for p in parts[0].split(",")) if parts else ()))
        return out

    def consumed(self) -> Counter[int]:
        return Counter(p for p, _, _ in read_record(self.record))

    def wait_progress(self, each: int = 20, timeout: float = 90.0, what: str = "consumption goes on") -> None:
        """Every partition gets at least ``each`` more messages handled (await_consumed_messages)."""
        before, t0 = self.consumed(), time.monotonic()
        def grown() -> bool:
            self.check_hosts()
            return all(self.consumed()[p] >= before[p] + each for p in range(self.partitions))

        wait_until(grown, timeout, f"{what}: {each} more messages on every partition", 0.2)
        self.log(f"{what}: +{each} on every partition after {time.monotonic() - t0:.1f}s")

    def longest_gap(self) -> float:
        """The longest time between two messages handled on one partition (producer running)."""
        path = Path(f"{self.record}.times")
        times: dict[int, list[float]] = {}
        for line in whole_lines(path):
            p, _, t = line.split()
            times.setdefault(int(p), []).append(float(t))
        gaps = [b - a for ts in map(sorted, times.values()) for a, b in zip(ts, ts[1:], strict=False)]
        return max(gaps, default=0.0)

    # ---- the group -------------------------------------------------------------------------------

    def owners(self) -> dict[str, list[str]]:
        """From every live host's ``ksup status``: partition name -> the instance ids owning it."""
        out: dict[str, list[str]] = {}
        for h in self.live_hosts():
            for w in h.status()["workers"]:
                for name in w["partitions"]:
                    out.setdefault(name, []).append(f"{h.name}-{w['slot']}")
        return out

    def broker_view(self) -> tuple[str, dict[str, set[str]]]:
        """The coordinator's view (describe, from a helper process: tests/cluster/brokerview.py):
        state, member -> partition names. Members are named by instance id (static) or member
        id (dynamic). Raises ValueError while the coordinator cannot say."""
        answer = self.view.describe(self.group)
        if "error" in answer:
            raise ValueError(answer["error"])
        return str(answer["state"]), {m: set(parts) for m, parts in answer["members"].items()}

    def settled(self) -> bool:
        hosts = self.live_hosts()
        if not hosts or not all(h.ready() for h in hosts):
            return False
        owners = self.owners()
        if sorted(owners) != sorted(f"{self.topic}[{p}]" for p in range(self.partitions)):
            return False
        if any(len(ids) != 1 for ids in owners.values()):
            return False
        state, members = self.broker_view()
        if state != "STABLE" or len(members) != self.members_expected():
            return False
        if self.static:  # the broker's assignment per instance id is what ksup says it is
            mine = {f"{h.name}-{w['slot']}": set(w["partitions"]) for h in hosts for w in h.status()["workers"]}
            return members == mine
        return True

    def wait_settled(self, timeout: float = 120.0) -> int:
        """Wait until the group is settled: every host ready, every partition owned by exactly one
        member, the coordinator's group Stable with the expected members and the same assignment.
        Returns the witness's mark (the number of rebalance events so far)."""
        t0 = time.monotonic()
        try:
            wait_until(self._settled_quietly, timeout, "the group settled", 0.3)
        except AssertionError:
            raise AssertionError(f"the group did not settle within {timeout}s: owners "
                                 f"{self._try(self.owners)}, broker {self._try(self.broker_view)}, "
                                 f"ready {[(h.name, h.ready()) for h in self.live_hosts()]}") from None
        self.log(f"settled ({self.members_expected()} members) after {time.monotonic() - t0:.1f}s")
        return len(self.events())

    def _settled_quietly(self) -> bool:
        self.check_hosts()
        try:
            return self.settled()
        except (OSError, ValueError, KafkaException, KeyError):  # a host or node between lives
            return False

    @staticmethod
    def _try(fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            return f"<{exc}>"

    def compare_with_group_tool(self) -> list[grouptool.Member]:
        """kafka-consumer-groups' members (instance id, assignment) against ``ksup status --json``
        of every live host: the same members with the same partitions. (The tool's JVM and the
        ksup clients run side by side: each costs seconds of start-up here.)"""
        with ThreadPoolExecutor(4) as pool:
            tool_call = pool.submit(grouptool.members, self.cluster.bootstrap, self.group)
            outs = list(pool.map(lambda h: (h, ksup_cli("status", "--json", "--socket", str(h.sock), timeout=30)),
                                 self.live_hosts()))
            tool = tool_call.result()
        ksup_view: dict[str, frozenset[tuple[str, int]]] = {}
        for h, out in outs:
            assert out.returncode == 0, out.stderr
            for w in json.loads(out.stdout)["workers"]:
                ksup_view[f"{h.name}-{w['slot']}"] = frozenset(
                    (n.rsplit("[", 1)[0], int(n.rsplit("[", 1)[1].rstrip("]"))) for n in w["partitions"])
        self.log(f"kafka-consumer-groups: {len(tool)} members, as ksup status says")
        if self.static:
            assert {m.instance_id: m.partitions for m in tool} == ksup_view, (tool, ksup_view)
        else:
            assert sorted(sorted(m.partitions) for m in tool) == sorted(sorted(v) for v in ksup_view.values()), \
                (tool, ksup_view)
        return tool

    # ---- the verdict (Kafka's OffsetValidationTest assertions) -----------------------------------

    def verdict(self, clean: bool) -> dict[str, Any]:
        """After every host stopped: per partition the committed position (the broker's) against
        the records the handler consumed. Clean: position == consumed (no duplicates), and the
        handled offsets are exactly 0..position-1. Hard: position <= consumed, and nothing below
        the position is missing (nothing lost). kafka-consumer-groups must report the same
        committed offsets, and lag = log end - committed."""
        committed = committed_offsets(self.cluster.bootstrap, self.group, self.topic, self.partitions)
        ends = end_offsets(self.cluster.bootstrap, self.topic, self.partitions)
        rows = read_record(self.record)
        seen = {p: Counter(o for pp, o, _ in rows if pp == p) for p in range(self.partitions)}
        position = {p: max(committed[p], 0) for p in range(self.partitions)}
        consumed = {p: sum(seen[p].values()) for p in range(self.partitions)}
        missing = {p: [o for o in range(position[p]) if o not in seen[p]] for p in range(self.partitions)}
        dups = sum(n - 1 for c in seen.values() for n in c.values())
        tool = grouptool.offsets(self.cluster.bootstrap, self.group)
        for p in range(self.partitions):
            row = tool[(self.topic, p)]
            assert row.committed == position[p], f"partition {p}: kafka-consumer-groups says {row.committed}, " \
                                                 f"the broker's committed offset is {position[p]}"
            assert row.lag == ends[p] - position[p], (p, row, ends[p])
        assert all(not m for m in missing.values()), f"lost below the committed position: " \
                                                     f"{ {p: m[:5] for p, m in missing.items() if m} }"
        if clean:
            assert position == consumed, f"committed position {position} != records consumed {consumed}"
        else:
            assert all(position[p] <= consumed[p] for p in position), \
                f"committed position {position} ahead of records consumed {consumed}"
        return {"messages": sum(ends.values()), "consumed": sum(consumed.values()), "duplicates": dups,
                "lag_at_end": sum(ends[p] - position[p] for p in position)}

    def coordinator_partition_owner(self) -> tuple[int, int]:
        """(coordinator node, a partition whose leader is another node), for broker failures."""
        coord = self.cluster.coordinator(self.group)
        for p in range(self.partitions):
            if self.cluster.leader(self.topic, p) != coord:
                return coord, p
        return coord, 0
