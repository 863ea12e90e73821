"""Kafka's OffsetValidationTest scenarios with ksup as the consumer, on the local 3-node
cluster (Kafka 4.3.1), for both group protocols. The scenario bodies and what each asserts:
tests/cluster/scenarios.py."""

from __future__ import annotations

import pytest

from tests.cluster import scenarios

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.timeout(900)]

PROTOCOLS = ["classic", "consumer"]


@pytest.fixture(params=PROTOCOLS)
def protocol(request: pytest.FixtureRequest, scenario, cluster) -> str:
    scenario.update(protocol=request.param, kafka=cluster.version)
    return str(request.param)


def test_broker_rolling_bounce(cluster, new_fleet, scenario, protocol):
    scenario.update(bounces="each broker once (Kafka: 5 rolls); each member twice")
    # Kafka's test raises the session timeout to 30 s for this one (KIP-848: the broker's 10 s).
    scenarios.broker_rolling_bounce(new_fleet(cluster, protocol, session_s=30), scenario)


@pytest.mark.parametrize("mode", ["rolling", "all"])
@pytest.mark.parametrize("hard", [False, True], ids=["clean", "hard"])
def test_consumer_bounce(cluster, new_fleet, scenario, protocol, hard, mode):
    """Hard on KIP-848: the restarted member is refused (UNRELEASED_INSTANCE_ID) until its killed
    predecessor's session expires (the broker's 10 s), and retries meanwhile; before that was
    fixed ksup took it for a duplicate prefix and halted with exit 8."""
    scenario.update(bounces="1 (Kafka: 5)")
    scenarios.consumer_bounce(new_fleet(cluster, protocol), scenario, hard, mode)


@pytest.mark.parametrize("mode", ["rolling", "all"])
def test_static_consumer_bounce(cluster, new_fleet, scenario, protocol, mode):
    scenario.update(bounces="1 (Kafka: 5)")
    scenarios.static_consumer_bounce(new_fleet(cluster, protocol), scenario, mode)


def test_dynamic_consumer_bounce_revokes_live_members(cluster, new_fleet, scenario, protocol):
    """The contrast in Kafka's static bounce test: without static membership a bounce does
    revoke the member kept alive (which shows the witness sees revocations)."""
    scenario.update(bounces="1 (Kafka: 5)")
    scenarios.static_consumer_bounce(new_fleet(cluster, protocol, static=False), scenario, "rolling")


@pytest.mark.parametrize("hard", [False, True], ids=["clean", "hard"])
def test_consumer_failure(cluster, new_fleet, scenario, protocol, hard):
    scenarios.consumer_failure(new_fleet(cluster, protocol), scenario, hard)


@pytest.mark.parametrize("target", ["coordinator", "leader"])
@pytest.mark.parametrize("hard", [False, True], ids=["clean", "hard"])
def test_broker_failure(cluster, new_fleet, scenario, protocol, target, hard):
    scenarios.broker_failure(new_fleet(cluster, protocol), scenario, target, hard)


@pytest.mark.parametrize("target", ["coordinator", "leader"])
def test_broker_failure_during_drain(cluster, new_fleet, scenario, protocol, target):
    slow = 250
    fleet = new_fleet(cluster, protocol, env={"KSUP_TEST_SLOW_AT": f"0:{slow},1:{slow},2:{slow}",
                                              "KSUP_TEST_SLOW_S": "6"})
    scenarios.broker_failure_during_drain(fleet, scenario, target, slow)


def test_group_consumption(cluster, new_fleet, scenario, protocol):
    scenario.update(membership="dynamic (as Kafka's test)")
    scenarios.group_consumption(new_fleet(cluster, protocol, static=False), scenario)
