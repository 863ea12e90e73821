"""The broker as ksup's health sees it, on brokers of this module's own (never the shared
session broker): a Kafka 3.9 broker without KIP-848 refuses --group-protocol consumer with a
clear exit, and a frozen broker, failing commits or a deleted topic make `ksup health` and
/healthz say unhealthy with the reason."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.harness import ksup_cli, read_record, wait_until
from tests.kafkautil import create_topic, free_port_unused, produce_sequence
from tests.localkafka import LocalKafka
from tests.test_observability import endpoint

pytestmark = pytest.mark.kafka

HANDLER = "tests.handlers.recording:process"


@pytest.fixture(scope="module")
def kafka39() -> Iterator[LocalKafka]:
    broker = LocalKafka(version="3.9.2")  # the last 3.x: no KIP-848 (ConsumerGroupHeartbeat)
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


def test_group_protocol_consumer_on_kafka_3_9_is_a_clear_error(ksup, kafka39, names, tmp_path):
    topic, group = names
    create_topic(kafka39.bootstrap, topic, 2)
    produce_sequence(kafka39.bootstrap, topic, 10, partitions=2)
    record = tmp_path / "record.txt"
    run = ksup(HANDLER, kafka39.bootstrap, topic, group, workers=2, env={"KSUP_TEST_RECORD": str(record)},
               extra=["--group-protocol", "consumer"])
    assert run.wait(60) == 9, run.tail()
    last = run.log_text().strip().splitlines()[-1]
    assert last.startswith("ksup: exit 9 (BROKER_UNSUPPORTED):"), last
    assert "KIP-848" in last and "--group-protocol classic" in last and "Kafka 4" in last, last
    assert read_record(record) == [], "nothing was consumed"
    # The same settings with the classic protocol work on that broker.
    ok = ksup(HANDLER, kafka39.bootstrap, topic, group, workers=2, env={"KSUP_TEST_RECORD": str(record)})
    wait_until(lambda: len(read_record(record)) == 10, 60, "classic consumes on 3.9")
    assert ok.stop() == 0, ok.tail()
