"""The OffsetValidationTest scenarios that make sense on an older cluster, again on a local
3-node Kafka 3.9.2 cluster (the last 3.x line: classic group protocol only, the old group
coordinator). Same scenario bodies as test_offset_validation.py (tests/cluster/scenarios.py).
This module runs after every other one of the suite (conftest), so each cluster starts once."""

from __future__ import annotations

import pytest

from tests.cluster import scenarios

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.timeout(900)]

PROTOCOL = "classic"


@pytest.fixture
def kafka39(cluster39, scenario):
    scenario.update(protocol=PROTOCOL, kafka=cluster39.version)
    return cluster39


def test_broker_rolling_bounce(kafka39, new_fleet, scenario):
    scenario.update(bounces="each broker once (Kafka: 5 rolls); each member twice")
    scenarios.broker_rolling_bounce(new_fleet(kafka39, PROTOCOL, session_s=30), scenario)


@pytest.mark.parametrize("hard", [False, True], ids=["clean", "hard"])
def test_consumer_bounce(kafka39, new_fleet, scenario, hard):
    scenario.update(bounces="1 (Kafka: 5)")
    scenarios.consumer_bounce(new_fleet(kafka39, PROTOCOL), scenario, hard, "rolling")


def test_static_consumer_bounce(kafka39, new_fleet, scenario):
    scenario.update(bounces="1 (Kafka: 5)")
    scenarios.static_consumer_bounce(new_fleet(kafka39, PROTOCOL), scenario, "rolling")


def test_consumer_failure(kafka39, new_fleet, scenario):
    scenarios.consumer_failure(new_fleet(kafka39, PROTOCOL), scenario, hard=True)


def test_broker_failure(kafka39, new_fleet, scenario):
    scenarios.broker_failure(new_fleet(kafka39, PROTOCOL), scenario, "coordinator", hard=True)


def test_broker_failure_during_drain(kafka39, new_fleet, scenario):
    slow = 250
    fleet = new_fleet(kafka39, PROTOCOL, env={"KSUP_TEST_SLOW_AT": f"0:{slow},1:{slow},2:{slow}",
                                              "KSUP_TEST_SLOW_S": "6"})
    scenarios.broker_failure_during_drain(fleet, scenario, "coordinator", slow)


def test_group_consumption(kafka39, new_fleet, scenario):
    scenario.update(membership="dynamic (as Kafka's test)")
    scenarios.group_consumption(new_fleet(kafka39, PROTOCOL, static=False), scenario)
