"""Fixtures of the cluster suite (``make test-cluster``, marker ``cluster``, not in the default
run): a local 3-node cluster (at most one alive at a time: Kafka 4.3.1 for most modules, 3.9.2
for test_on_kafka39.py, which runs last), every node back up and in sync before each test, and
a ``scenario`` dict each test fills with its figures; with its outcome they go as one JSON line
to ``$KSUP_CLUSTER_RESULTS`` (default bench-results/cluster.jsonl, not committed), from which
``python -m tests.cluster.results`` draws the README's table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.fleet import Fleet
from tests.harness import REPO, KsupRun
from tests.localcluster import LocalKafkaCluster
from tests.localkafka import KAFKA_VERSION

RESULTS = Path(os.environ.get("KSUP_CLUSTER_RESULTS", REPO / "bench-results" / "cluster.jsonl"))


def _write_result(line: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")


class Clusters:
    """Keeps at most one cluster running (two would be six JVMs on two cores)."""

    def __init__(self) -> None:
        self.current: LocalKafkaCluster | None = None

    def get(self, version: str) -> LocalKafkaCluster:
        if self.current is not None and self.current.version != version:
            self.current.cleanup()
            self.current = None
        if self.current is None:
            cluster = LocalKafkaCluster(version=version)
            cluster.start()
            rss = cluster.rss_bytes()
            _write_result({"kind": "cluster", "version": version, "start_s": round(cluster.start_seconds, 1),
                           "rss_mib": {str(k): v >> 20 for k, v in rss.items()}, "at": time.time()})
            self.current = cluster
        self.current.ensure_all_running()
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.cleanup()


@pytest.fixture(scope="session")
def clusters() -> Iterator[Clusters]:
    registry = Clusters()
    try:
        yield registry
    finally:
        registry.close()


@pytest.fixture
def cluster(clusters: Clusters) -> LocalKafkaCluster:
    return clusters.get(KAFKA_VERSION)


@pytest.fixture
def cluster39(clusters: Clusters) -> LocalKafkaCluster:
    return clusters.get("3.9.2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests on the 3.9 cluster run after every other one: one cluster start per version."""
    items.sort(key=lambda item: "cluster39" in getattr(item, "fixturenames", ()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def scenario(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The test's figures (messages, duplicates, longest gap, rebalances, ...), written with its
    outcome and wall time when it ends."""
    figures: dict[str, Any] = {}
    t0 = time.monotonic()
    yield figures
    rep = getattr(request.node, "rep_call", None)
    _write_result({"kind": "scenario", "test": request.node.nodeid.split("::", 1)[-1],
                   "module": request.node.module.__name__.rsplit(".", 1)[-1],
                   "outcome": "xfail" if rep is not None and hasattr(rep, "wasxfail")
                   else (rep.outcome if rep is not None else "error"),
                   "seconds": round(time.monotonic() - t0, 1), **figures, "at": time.time()})


@pytest.fixture
def new_fleet(ksup: type[KsupRun], names: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """``new_fleet(cluster, protocol, **options)``: a Fleet on that cluster (one per test); its
    producer is stopped and its ksup processes killed (by the ksup fixture) at teardown."""
    made: list[Fleet] = []

    def make(cluster: LocalKafkaCluster, protocol: str, **options: Any) -> Fleet:
        fleet = Fleet(ksup, cluster, names, tmp_path, protocol, **options)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:
        fleet.load.stopped.set()
        fleet.view.close()
