"""At-least-once under SIGTERM, on a real broker with real processes and signals.

The naive twin of the scenario (auto offset store, batch consumption) must lose messages, so we
know the check can fail; ksup must lose none."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import REPO, read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, produce_sequence

pytestmark = pytest.mark.kafka

MESSAGES = 10_000
PARTITIONS = 8
SLEEP = "0.002"


def _all_busy(record: Path, workers: int = 4, at_least: int = 2_000) -> bool:
    """Every consumer process has finished messages (the group settled) and enough are done."""
    rows = read_record(record)
    return len(rows) >= at_least and len({pid for _, _, pid in rows}) >= workers


def _check_complete(records: list[tuple[int, int, int]], ends: dict[int, int]) -> tuple[int, int]:
    """(missing, duplicates) over every offset produced."""
    seen = Counter((p, o) for p, o, _ in records)
    missing = sum(1 for p, end in ends.items() for o in range(end) if (p, o) not in seen)
    dups = sum(n - 1 for n in seen.values() if n > 1)
    return missing, dups


@pytest.mark.compat
def test_sigterm_mid_flight_loses_nothing_and_duplicates_nothing(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, PARTITIONS)
    produce_sequence(bootstrap, topic, MESSAGES, partitions=PARTITIONS)
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": SLEEP}

    first = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=4, env=env)
    wait_until(lambda: _all_busy(record), 120, "all 4 workers busy, 2,000 messages processed")
    first.signal(signal.SIGTERM)  # handlers are mid-flight: every worker is busy
    assert first.wait(60) == 0, first.tail()
    done_first = len(read_record(record))
    assert done_first < MESSAGES, "the stop must interrupt the work for this test to mean anything"

    # The receipt matches the broker: committed = last processed + 1 per partition.
    receipt = first.receipt()
    committed = committed_offsets(bootstrap, group, topic, PARTITIONS)
    for p in range(PARTITIONS):
        entry = receipt["partitions"][f"{topic}[{p}]"]
        if entry["last_processed"] < 0:  # nothing finished yet: nothing may be committed
            assert entry["committed"] == -1 and committed[p] < 0, (p, entry, committed)
        else:
            assert entry["committed"] == entry["last_processed"] + 1 == committed[p], (p, entry, committed)

    second = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=4, env=env)
    wait_until(lambda: len(read_record(record)) >= MESSAGES, 180, "all messages processed")
    assert second.stop(60) == 0, second.tail()

    missing, dups = _check_complete(read_record(record), ends)
    assert missing == 0
    assert dups == 0, "graceful stops must not process a message twice"
    assert committed_offsets(bootstrap, group, topic, PARTITIONS) == ends


def test_naive_auto_store_loses_messages(bootstrap, names, tmp_path):
    """Same scenario, librdkafka's default offset store and batches: the SIGTERM loses messages."""
    topic, group = names
    create_topic(bootstrap, topic, PARTITIONS)
    produce_sequence(bootstrap, topic, MESSAGES, partitions=PARTITIONS)
    ends = end_offsets(bootstrap, topic, PARTITIONS)
    record = tmp_path / "record.txt"
    cmd = [sys.executable, str(REPO / "tests" / "naive_consumer.py"), bootstrap, group, topic, str(record), SLEEP]
    procs = [subprocess.Popen(cmd, start_new_session=True) for _ in range(4)]
    try:
        wait_until(lambda: _all_busy(record), 120, "all 4 consumers busy, 2,000 messages processed")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(60) == 0
        # Restart and let it finish: whatever the first run committed past is never seen again.
        procs = [subprocess.Popen(cmd, start_new_session=True) for _ in range(4)]
        for p in procs:
            p.wait(240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    missing, _ = _check_complete(read_record(record), ends)
    assert missing > 0, "the naive consumer was expected to lose messages on SIGTERM"
    print(f"naive consumer lost {missing} of {MESSAGES} messages")
