"""A real 3-node Apache Kafka (KRaft) cluster on 127.0.0.1, for the cluster tests.

Three combined broker+controller nodes (one static quorum of three voters), each on free
loopback ports with its own data directory, replication factor 3 and min.insync.replicas 2:
any one node may be stopped (cleanly or by SIGKILL), frozen (SIGSTOP) or restarted while the
cluster keeps serving. Same jars and cache as ``tests/localkafka.py``; every node runs in its
own session and is stopped by its pid, never by name.

Run as a script to keep a cluster in the foreground::

    python tests/localcluster.py run        # prints the bootstrap list, Ctrl+C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka.admin import AdminClient  # noqa: E402

from tests.localkafka import (  # noqa: E402
    KAFKA_VERSION,
    _alive,
    _cluster_id,
    _launch,
    _stop_pid,
    _wait_started,
    ensure_jars,
    free_port,
    node_properties,
    serve_until_signal,
    write_properties,
)


@dataclass
class Node:
    """One node of the cluster: its id, ports, directory and (while it runs) its pid."""

    node_id: int
    port: int
    controller_port: int
    workdir: Path
    pid: int | None = None
    paused: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)  # every process we started

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.pid is not None and _alive(self.pid)


class LocalKafkaCluster:
    """``nodes`` combined broker+controller nodes; ``start()`` blocks until all of them serve."""

    def __init__(self, nodes: int = 3, workdir: Path | None = None, version: str = KAFKA_VERSION,
                 overrides: dict[str, str] | None = None) -> None:
        self.version = version
        # KIP-848 heartbeats every 2 s (production default 5 s; the single test broker uses 1 s).
        # librdkafka times a heartbeat out after one interval, and a heartbeat that timed out
        # while the group rebalanced can stall the group for max.poll.interval.ms (librdkafka
        # 2.16.0; tests/cluster/kip848_heartbeat_stall.py): on these loaded 2 cores 1 s was too
        # short (1 stall in about 25 KIP-848 joins).
        self.overrides = {"group.consumer.heartbeat.interval.ms": "2000", **(overrides or {})}
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ksup-cluster-"))
        self.nodes = [Node(i, free_port(), free_port(), self.workdir / f"node-{i}") for i in range(1, nodes + 1)]
        self.voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        self.start_seconds = 0.0

    @property
    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.nodes)

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap})

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Format every node with one cluster id, start them together (a node cannot finish
        starting before a majority of the controllers is up) and wait until all serve."""
        libs = ensure_jars(self.version)
        t0 = time.monotonic()
        cluster_id = _cluster_id()
        for n in self.nodes:
            n.workdir.mkdir(parents=True, exist_ok=True)
            write_properties(n.workdir, {**node_properties(n.node_id, n.port, n.controller_port, self.voters,
                                                           n.workdir / "data", replicas=len(self.nodes)),
                                         **self.overrides})
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: subprocess.run(
                ["java", "-Xmx256m", "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format",
                 "-t", cluster_id, "-c", str(n.workdir / "server.properties"), "--ignore-formatted"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120), self.nodes))
        try:
            for n in self.nodes:
                self._launch(n)
            for n in self.nodes:
                assert n.pid is not None
                _wait_started(n.workdir, n.pid, timeout)
            self.wait_in_sync(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0

    def _launch(self, n: Node) -> None:
        assert threading.current_thread() is threading.main_thread(), "die_with_parent follows the thread"
        proc = _launch(n.workdir, ensure_jars(self.version), die_with_parent=True)
        n.procs.append(proc)
        n.pid, n.paused = proc.pid, False

    def stop_node(self, node_id: int, hard: bool = False, timeout: float = 30.0) -> float:
        """Stop one node: SIGTERM (a controlled shutdown: its leaderships move first) or SIGKILL
        (gone at once; the controller fences it after broker.session.timeout.ms). Returns once the
        process is gone, with how long that took."""
        n = self.node(node_id)
        t0 = time.monotonic()
        if n.pid is not None:
            if n.paused:
                os.killpg(n.pid, signal.SIGCONT)
            if hard:
                try:
                    os.killpg(n.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _stop_pid(n.pid, timeout)
            self._reap(n)
        n.pid, n.paused = None, False
        (n.workdir / "broker.pid").unlink(missing_ok=True)
        return time.monotonic() - t0

    def start_node(self, node_id: int, timeout: float = 90.0) -> float:
        """Start a stopped node again (same id, ports and data); returns once it serves."""
        n = self.node(node_id)
        assert not n.running, f"node {node_id} is running"
        t0 = time.monotonic()
        self._launch(n)
        assert n.pid is not None
        _wait_started(n.workdir, n.pid, timeout)
        return time.monotonic() - t0

    def restart_node(self, node_id: int, hard: bool = False, timeout: float = 90.0) -> float:
        """Stop and start one node, then wait until every partition is fully replicated again
        (so that the next bounce never leaves a partition below min.insync.replicas). Returns
        how long the node was away."""
        t0 = time.monotonic()
        self.stop_node(node_id, hard)
        self.start_node(node_id, timeout)
        away = time.monotonic() - t0
        self.wait_in_sync(timeout)
        return away

    def pause_node(self, node_id: int) -> None:
        """Freeze a node (SIGSTOP to its process group): its sockets stay open, nothing answers."""
        n = self.node(node_id)
        assert n.pid is not None
        os.killpg(n.pid, signal.SIGSTOP)
        n.paused = True

    def resume_node(self, node_id: int) -> None:
        n = self.node(node_id)
        assert n.pid is not None
        os.killpg(n.pid, signal.SIGCONT)
        n.paused = False

    def ensure_all_running(self, timeout: float = 90.0) -> None:
        """Bring back any node a test left stopped or frozen, and wait until all are in sync."""
        for n in self.nodes:
            if n.paused:
                self.resume_node(n.node_id)
            if not n.running:
                self.start_node(n.node_id, timeout)
        self.wait_in_sync(timeout)

    def stop(self) -> None:
        """Stop every node at once: a node left alone cannot finish a controlled shutdown (it
        waits for a controller quorum that is gone), so stopping them one by one would cost the
        last one its whole SIGKILL deadline."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: self.stop_node(n.node_id, timeout=15), self.nodes))

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _reap(n: Node) -> None:
        for proc in n.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        n.procs = [p for p in n.procs if p.returncode is None]

    # ---- what the cluster says -------------------------------------------------------------------

    def leader(self, topic: str, partition: int) -> int:
        """The node id that leads ``topic[partition]`` now (-1 while it has none)."""
        md = self.admin().list_topics(topic, timeout=10)
        return int(md.topics[topic].partitions[partition].leader)

    def coordinator(self, group: str) -> int:
        """The node id of ``group``'s coordinator: the leader of its __consumer_offsets partition
        (partition = Java's String.hashCode of the group id, made non-negative, modulo the
        partition count), which is where FindCoordinator sends every member."""
        md = self.admin().list_topics("__consumer_offsets", timeout=10).topics["__consumer_offsets"]
        if md.error is not None:
            raise RuntimeError(f"__consumer_offsets: {md.error}")
        return int(md.partitions[_java_hash(group) % len(md.partitions)].leader)

    def under_replicated(self) -> list[str]:
        """Partitions (internal topics included) whose in-sync replicas are fewer than their replicas."""
        md = self.admin().list_topics(timeout=10)
        if len(md.brokers) < len(self.nodes):
            return [f"only brokers {sorted(md.brokers)} registered"]
        return [f"{t.topic}[{p.id}]" for t in md.topics.values() for p in t.partitions.values()
                if len(p.isrs) < len(p.replicas) or p.leader not in md.brokers]

    def wait_in_sync(self, timeout: float = 90.0) -> None:
        _wait(lambda: not self.under_replicated(), timeout,
              lambda: f"partitions still under-replicated: {self.under_replicated()[:5]}")

    def rss_bytes(self) -> dict[int, int]:
        out = {}
        for n in self.nodes:
            if n.pid is None:
                continue
            try:
                with open(f"/proc/{n.pid}/status") as f:
                    out[n.node_id] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return out


def _java_hash(text: str) -> int:
    """Java's String.hashCode (over UTF-16 code units), masked like Kafka's Utils.abs."""
    h = 0
    units = text.encode("utf-16-be")
    for i in range(0, len(units), 2):
        h = (31 * h + int.from_bytes(units[i:i + 2], "big")) & 0xFFFFFFFF
    return h & 0x7FFFFFFF


def _wait(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # a node that is just starting may not answer metadata yet
            pass
        time.sleep(0.2)
    raise TimeoutError(what())


def main(argv: list[str]) -> int:
    if argv[:1] != ["run"]:
        print("usage: localcluster.py run", file=sys.stderr)
        return 2
    cluster = LocalKafkaCluster()

    def started() -> str:
        return f"started in {cluster.start_seconds:.1f}s, rss " + \
            ", ".join(f"node {i} {b >> 20} MiB" for i, b in cluster.rss_bytes().items())

    return serve_until_signal(cluster, started, lambda: True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
