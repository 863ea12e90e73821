"""Fixtures: one real Kafka broker per test session, unique topics, and ksup processes that are
always cleaned up by pid (with their workers), even when a test fails."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import KsupRun  # noqa: E402
from tests.localkafka import LocalKafka  # noqa: E402

_counter = itertools.count()


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    broker = LocalKafka()
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def bootstrap(kafka: LocalKafka) -> str:
    return kafka.bootstrap


@pytest.fixture
def names(request: pytest.FixtureRequest) -> tuple[str, str]:
    """A fresh (topic, group) pair for this test."""
    n = next(_counter)
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"t-{base}-{os.getpid()}-{n}", f"g-{base}-{os.getpid()}-{n}"


@pytest.fixture
def ksup(tmp_path: Path) -> Iterator[type[KsupRun]]:
    """Factory for ksup processes; every one started is killed (with its workers) at teardown."""
    started: list[KsupRun] = []

    class Tracked(KsupRun):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.setdefault("workdir", tmp_path)
            # Every worker of the suite checks the one-owner-thread rule of its Consumer.
            kwargs["env"] = {"KSUP_CHECK_CONSUMER_THREAD": "1", **(kwargs.get("env") or {})}  # type: ignore[dict-item]
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for run in started:
        run.kill_everything()
    offenders = [line for run in started for line in run.log_text().splitlines()
                 if "not the consumer thread" in line]
    assert not offenders, f"a Consumer was called from another thread: {offenders[:3]}"
