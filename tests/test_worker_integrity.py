"""A worker that cannot make progress must be noticed (issue 12): an exception outside the
handler (in the error-policy code, or a ksup bug) on a handler thread fails the worker loudly
(its own exit code, the traceback in the log) instead of leaving a live-looking worker that
holds its partitions for ever. Oracle: the handler's record and the broker's committed offsets."""

from __future__ import annotations

import signal

import pytest

from tests.harness import read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, produce_sequence

pytestmark = pytest.mark.kafka

POLICY_BUG = '''
import os


class Weird(Exception):
    def __str__(self):  # the error policy formats the exception: this raises inside the policy
        raise RuntimeError("bug in the policy path")


def process(record):
    if record.offset == 5:
        raise Weird()
    with open(os.environ["KSUP_TEST_RECORD"], "a") as f:
        f.write(f"{record.partition} {record.offset} {os.getpid()}\\n")
'''


def test_an_exception_in_the_error_policy_fails_the_worker_loudly(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20)
    (tmp_path / "policybug.py").write_text(POLICY_BUG)
    record = tmp_path / "record.txt"
    run = ksup("policybug:process", bootstrap, topic, group, cwd=tmp_path, env={"KSUP_TEST_RECORD": str(record)},
               extra=["--on-error", "skip", "--restart-delay", "30"])
    wait_until(lambda: "exit 14 (HANDLER_CRASHED)" in run.log_text(), 30, "the worker exits HANDLER_CRASHED")
    log = run.log_text()
    assert "RuntimeError: bug in the policy path" in log, "the traceback is in the log"
    assert [off for _, off, _ in read_record(record)] == [0, 1, 2, 3, 4]
    # The finished prefix was committed on the way out; offset 5 was not (it will be redelivered).
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 1) == {0: 5}, 15, "offsets 0-4 committed")
    run.stop()


POLICY_BUG_ON_GO = POLICY_BUG.replace(
    "    if record.offset == 5:\n",
    "    if record.offset == 5:\n"
    "        open(os.environ['KSUP_TEST_RECORD'] + '.at5', 'w').close()\n"
    "        while not os.path.exists(os.environ['KSUP_TEST_RECORD'] + '.go'):\n"
    "            import time; time.sleep(0.01)  # paces the wait for the test's signal\n")


def test_an_exception_in_the_error_policy_during_a_drain_is_not_a_clean_stop(ksup, bootstrap, names, tmp_path):
    """The same bug, but it comes while the worker drains for a SIGTERM: the drain's first
    reason kept its code 0, so the traceback was not logged and ksup exited 0 ("every worker
    drained"). Now: the traceback in the log, the finished prefix committed, offset 5 not, and ksup
    exits 4 naming the dead thread."""
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20)
    (tmp_path / "policybug.py").write_text(POLICY_BUG_ON_GO)
    record = tmp_path / "record.txt"
    run = ksup("policybug:process", bootstrap, topic, group, cwd=tmp_path, env={"KSUP_TEST_RECORD": str(record)},
               extra=["--on-error", "skip"])
    wait_until(lambda: (tmp_path / "record.txt.at5").exists(), 60, "the handler on offset 5")
    run.signal(signal.SIGTERM)
    run.wait_for_log("drain requested: SIGTERM received", 30)
    (tmp_path / "record.txt.go").touch()  # the policy's bug fires now, inside the drain
    assert run.wait(60) == 4, run.tail()
    log = run.log_text()
    assert "RuntimeError: bug in the policy path" in log, "the traceback is in the log"
    assert [off for _, off, _ in read_record(record)] == [0, 1, 2, 3, 4]
    assert committed_offsets(bootstrap, group, topic, 1) == {0: 5}
    last = log.strip().splitlines()[-1]
    assert "exit 4 (FORCED)" in last and "died of RuntimeError" in last, last


def test_reports_tell_a_dead_handler_thread_from_an_idle_one():
    """Pure: the supervisor's stuck rule reads the handler-thread liveness in the report."""
    import time
    from types import SimpleNamespace

    from supervisor.contract import messages as m
    from supervisor.parent import policy
    from supervisor.parent.slots import WorkerSlot

    now = time.monotonic()
    settings = SimpleNamespace(handler_timeout=None, heartbeat_timeout=30.0)

    def slot(alive: int) -> WorkerSlot:
        s = WorkerSlot(0, joined=True, report_at=now)
        s.report = m.Report(pid=1, state="assigned", assignment=[], in_flight=None, processed=0, failed=0,
                            stored={}, committed={}, rss_bytes=0, handler_threads=2, handler_threads_alive=alive)
        return s

    assert policy.stuck(slot(2), now, time.time(), settings) is None  # type: ignore[arg-type]
    assert policy.stuck(slot(1), now, time.time(), settings) == "has 1 dead handler thread(s) of 2"  # type: ignore[arg-type]


LEAKER = '''
import os
import time

_kept = []


def process(record):
    _kept.append(bytearray(10 << 20))  # 10 MiB per message, never freed
    time.sleep(0.01)
    with open(os.environ["KSUP_TEST_RECORD"], "a") as f:
        f.write(f"{record.partition} {record.offset} {os.getpid()}\\n")
'''


def test_max_memory_bounds_the_overshoot(ksup, bootstrap, names, tmp_path):
    """Issue 13 finding 10: with --max-memory 150M a leaking worker (up to 1 GiB/s here) reached
    1,160 MiB before its recycle: its RSS was checked about once a second. The worker now checks
    its own RSS every few tens of milliseconds and stops taking messages once over the limit,
    until the supervisor recycles it; nothing is lost (the record covers every offset)."""
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 60)
    (tmp_path / "leaker.py").write_text(LEAKER)
    record = tmp_path / "record.txt"
    run = ksup("leaker:process", bootstrap, topic, group, cwd=tmp_path, env={"KSUP_TEST_RECORD": str(record)},
               extra=["--max-memory", "150M"])
    wait_until(lambda: "(--max-memory)" in run.log_text(), 60, "a recycle for memory")
    import re
    seen = [int(m) for m in re.findall(r"RSS (\d+) MiB over 150 MiB", run.log_text())]
    assert seen and max(seen) < 300, f"RSS at the recycle: {seen} MiB (limit 150)"
    wait_until(lambda: {o for _, o, _ in read_record(record)} == set(range(60)), 120, "every message handled")
    run.stop()


BATCH_POISON = '''
import os


def process(records):
    if any(r.offset == 0 for r in records):
        os._exit(1)  # a poison message: kills the worker process whenever it is in the batch
    with open(os.environ["KSUP_TEST_RECORD"], "a") as f:
        for r in records:
            f.write(f"{r.partition} {r.offset} {os.getpid()}\\n")
'''


def test_batch_poison_quarantines_only_the_poison_record(ksup, bootstrap, names, tmp_path):
    """Issue 12: a poison message first in a batch took the whole batch with it (every record
    skipped, none run). Each record of a batch is on the in-flight board; after a death the
    batch's records run alone (suspects), so the next death names the poison one, which alone
    is quarantined (here: skipped); every other record runs."""
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20)
    (tmp_path / "batchpoison.py").write_text(BATCH_POISON)
    record = tmp_path / "record.txt"
    run = ksup("batchpoison:process", bootstrap, topic, group, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record)},
               extra=["--batch-size", "10", "--batch-timeout", "1", "--on-error", "skip", "--restart-delay", "0.5"])
    wait_until(lambda: {o for _, o, _ in read_record(record)} == set(range(1, 20)), 90,
               "every record but the poison one handled")
    assert "SKIPPED" in run.log_text() and "@0" in run.log_text()
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 1) == {0: 20}, 30, "all committed")
    assert run.stop() == 0, run.tail()


SLOW_BATCH = '''
import os
import time


def process(records):
    open(os.environ["KSUP_TEST_RECORD"] + ".started", "a").close()
    time.sleep(float(os.environ.get("BATCH_SLEEP", "0")))
    with open(os.environ["KSUP_TEST_RECORD"], "a") as f:
        for r in records:
            f.write(f"{r.partition} {r.offset} {os.getpid()}\\n")
'''


def test_a_revoke_waits_for_every_record_of_a_running_batch(ksup, bootstrap, names, tmp_path):
    """Issue 12: a revoke waited only for the first record of a running batch. A batch holds
    records of all 4 partitions; a scale-up moves two of them away mid-batch: the revoke must
    wait for the batch and commit it, so the new owner does not handle any record again."""
    from collections import Counter

    topic, group = names
    create_topic(bootstrap, topic, 4)
    produce_sequence(bootstrap, topic, 40, partitions=4)
    (tmp_path / "slowbatch.py").write_text(SLOW_BATCH)
    record = tmp_path / "record.txt"
    run = ksup("slowbatch:process", bootstrap, topic, group, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "BATCH_SLEEP": "8"},
               extra=["--batch-size", "100", "--batch-timeout", "1", "--revoke-timeout", "20"])
    wait_until(lambda: (tmp_path / "record.txt.started").exists(), 60, "the batch in the handler")
    import signal
    run.signal(signal.SIGTTIN)
    run.wait_for_log("worker 1 started", 30)
    wait_until(lambda: {(p, o) for p, o, _ in read_record(record)} == {(p, o) for p in range(4) for o in range(10)},
               90, "every record handled")
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 4) == {p: 10 for p in range(4)}, 90,
               "everything committed (the new owner is done too)")
    twice = [k for k, n in Counter((p, o) for p, o, _ in read_record(record)).items() if n > 1]
    assert twice == [], f"handled again after the revoke: {twice}"
    assert run.stop() == 0, run.tail()
