"""Releases that change the code must not break a running supervisor: a new release whose
``setup()`` raises, or whose worker speaks a slightly newer wire format, is handled by a real
``ksup reload`` without losing anything and without taking down the old workers."""

from __future__ import annotations

import pytest

from tests.harness import ksup_cli, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, produce_sequence
from tests.test_rolling_reload import rows

pytestmark = pytest.mark.kafka

CLASS_HANDLER = '''
import os
VERSION = "{version}"
_fd = os.open(os.environ["KSUP_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

class Versioned:
    def setup(self):
        {setup}

    def process(self, record):
        os.write(_fd, f"{{record.partition}} {{record.offset}} {{os.getpid()}} {{VERSION}}\\n".encode())
'''


def test_reload_whose_setup_raises_stops_the_roll_and_the_old_worker_keeps_consuming(
        ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 100, partitions=2)
    (tmp_path / "versioned.py").write_text(CLASS_HANDLER.format(version="v1", setup="pass"))
    record = tmp_path / "record.txt"
    run = ksup("versioned:Versioned", bootstrap, topic, group, workers=1, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "PYTHONDONTWRITEBYTECODE": "1"})
    wait_until(lambda: len(rows(record)) >= 100, 60, "first batch processed")
    pids_before = set(run.worker_pids())
    (tmp_path / "versioned.py").write_text(CLASS_HANDLER.format(
        version="v2", setup="raise RuntimeError('cannot reach the billing database')"))
    out = ksup_cli("reload", "-g", group, "--wait", timeout=180)
    assert out.returncode != 0, out.stdout + out.stderr + run.tail()
    assert "setup() raised RuntimeError: cannot reach the billing database" in out.stderr, out.stderr
    assert set(run.worker_pids()) == pids_before, "the old worker keeps running"
    # The old worker keeps consuming: the handler's own record grows after the failed reload.
    produce_sequence(bootstrap, topic, 100, start=100, partitions=2)
    wait_until(lambda: len(rows(record)) >= 200, 60, "consumption goes on after the failed reload")
    got = rows(record)
    assert {v for *_, v in got} == {"v1"}
    assert sorted((p, o) for p, o, _, _ in got) == sorted((n % 2, n // 2) for n in range(200)), "nothing lost"
    ends = end_offsets(bootstrap, topic, 2)
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 2) == ends, 60, "all committed", 0.5)
    assert run.stop() == 0, run.tail()
