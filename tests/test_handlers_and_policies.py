"""Handler shapes and error policies on the real broker: async, batch, class lifecycle,
concurrency with the contiguous-prefix rule, revokes during slow handlers, lost partitions,
retry then dead-letter with headers, and poison messages that kill the process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.harness import REPO, read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, produce_sequence

pytestmark = pytest.mark.kafka


def loaded(bootstrap: str, topic: str, partitions: int, count: int) -> dict[int, int]:
    create_topic(bootstrap, topic, partitions)
    produce_sequence(bootstrap, topic, count, partitions=partitions)
    return end_offsets(bootstrap, topic, partitions)


def missing(record, ends) -> list[tuple[int, int]]:
    seen = {(p, o) for p, o, _ in read_record(record)}
    return [(p, o) for p, end in ends.items() for o in range(end) if (p, o) not in seen]


def all_committed(bootstrap, group, topic, ends, timeout=90):
    wait_until(lambda: committed_offsets(bootstrap, group, topic, len(ends)) == ends, timeout, "all committed", 0.5)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_sigterm_drain_on_both_group_protocols(ksup, bootstrap, names, tmp_path, protocol):
    topic, group = names
    ends = loaded(bootstrap, topic, 4, 3000)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.002"}
    extra = ["--group-protocol", protocol]
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2, env=env, extra=extra)
    wait_until(lambda: len({pid for *_, pid in read_record(record)}) == 2, 60, "both busy")
    assert run.stop() == 0, run.tail()
    second = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2, env=env, extra=extra)
    all_committed(bootstrap, group, topic, ends)
    assert second.stop() == 0
    assert missing(record, ends) == []
    assert max(Counter((p, o) for p, o, _ in read_record(record)).values()) == 1


@pytest.mark.parametrize(("spec", "extra"), [
    ("tests.handlers.shapes:process_async", []),
    ("tests.handlers.shapes:process_batch", ["--batch-size", "50", "--batch-timeout", "0.2"]),
])
def test_async_and_batch_handlers(ksup, bootstrap, names, tmp_path, spec, extra):
    topic, group = names
    ends = loaded(bootstrap, topic, 2, 500)
    record = tmp_path / "r.txt"
    run = ksup(spec, bootstrap, topic, group, env={"KSUP_TEST_RECORD": str(record)}, extra=extra)
    all_committed(bootstrap, group, topic, ends)
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == []
    if "batch" in spec:
        sizes = [int(x) for x in (tmp_path / "r.txt.batches").read_text().split()]
        assert max(sizes) == 50 and sum(sizes) == 500


def test_class_lifecycle_calls_in_order(ksup, bootstrap, names, tmp_path):
    topic, group = names
    ends = loaded(bootstrap, topic, 2, 50)
    record = tmp_path / "r.txt"
    run = ksup("tests.handlers.shapes:Lifecycle", bootstrap, topic, group, env={"KSUP_TEST_RECORD": str(record)})
    all_committed(bootstrap, group, topic, ends)
    assert run.stop() == 0
    life = [line.split(" ", 1)[1] for line in (tmp_path / "r.txt.life").read_text().splitlines()]
    assert life == ["setup", "assign [0, 1]", "revoke [0, 1]", "teardown"]


def test_concurrency_by_key_stores_only_the_contiguous_prefix(ksup, bootstrap, names, tmp_path):
    """Offset 3 of partition 0 is slow; later offsets (other keys) finish first. Kill the worker:
    the committed offset is 3, and redelivery starts exactly there."""
    topic, group = names
    loaded(bootstrap, topic, 1, 40)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLOW_AT": "0:3", "KSUP_TEST_SLOW_S": "30"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env,
               extra=["--concurrency", "4", "--order-by", "key", "--restart-delay", "0.2"])
    wait_until(lambda: len(read_record(record)) >= 39, 60, "all but the slow message done")
    # The contiguous prefix 0..2 gets committed (auto-commit); that nothing past it was stored
    # shows below: the redelivery after the kill starts at 3 and offset 4 comes again.
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 1) == {0: 3}, 60, "the prefix 0..2 committed", 0.3)
    victim = run.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: any(pid != victim for _, _, pid in read_record(record)), 60, "redelivery")
    wait_until(lambda: 4 in {o for _, o, pid in read_record(record) if pid != victim}, 60, "offset 4 again")
    redelivered = [o for _, o, pid in read_record(record) if pid != victim]
    # Offset 4 had been finished by the victim but was past the stored prefix: it comes again;
    # nothing before the first unfinished offset (3, still sleeping in the new worker) does.
    assert min(redelivered) >= 3, "redelivery starts at the first unfinished offset, nothing before it"
    run.kill_everything()


def test_revoke_during_slow_handler_commits_finished_work_and_fences_the_late_one(ksup, bootstrap, names,
                                                                                 tmp_path):
    """Offset 20 of every partition takes 6 s, and with --concurrency 4 all four are in flight at
    once: whichever partitions the scale-up moves away are revoked mid-message, so a late
    finish is fenced (not stored) whatever the assignor picks, and its new owner handles it again."""
    topic, group = names
    ends = loaded(bootstrap, topic, 4, 400)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.01",
           "KSUP_TEST_SLOW_AT": "0:20,1:20,2:20,3:20", "KSUP_TEST_SLOW_S": "6"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env,
               extra=["--revoke-timeout", "1", "--no-static-membership", "--concurrency", "4"])
    wait_until(lambda: any(w.get("in_flight") and w["in_flight"]["offset"] == 20 for w in _status(group)), 60,
               "the slow message in flight")
    assert subprocess.run([sys.executable, "-m", "supervisor", "scale", "4", "-g", group], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30).returncode == 0
    all_committed(bootstrap, group, topic, ends, timeout=120)
    text = run.log_text()
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == []
    fenced = [p for p in range(4) if f"{topic}[{p}]@20 after its partition was revoked: not stored" in text]
    assert fenced, "a revoke during a running handler fences its late finish"
    handled = Counter((p, o) for p, o, _ in read_record(record))
    # Each fenced late finish was handled again by the partition's new owner.
    assert all(handled[(p, 20)] >= 2 for p in fenced), {p: handled[(p, 20)] for p in fenced}


def _status(group: str) -> list[dict]:
    import json

    out = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "-g", group], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    return json.loads(out.stdout)["workers"] if out.returncode == 0 else []


def test_lost_partitions_commit_nothing(ksup, bootstrap, names, tmp_path):
    """A frozen worker's session expires; its partitions are lost to the other worker, which
    finishes and commits everything. When the frozen one wakes up, it commits nothing for the
    lost partitions: the broker's committed offsets stay at the end (a stale commit from it would
    move them back, and nobody would move them forward again: no new messages come)."""
    topic, group = names
    ends = loaded(bootstrap, topic, 2, 600)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.02"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2, env=env,
               extra=["--no-static-membership", "-X", "session.timeout.ms=3000", "--heartbeat-timeout", "60"])
    wait_until(lambda: len({pid for *_, pid in read_record(record)}) == 2, 60, "both busy")
    victim = run.worker_pids()[0]
    other = [pid for pid in run.worker_pids() if pid != victim][0]

    def assigned_to(pid: int) -> list[str]:
        return [r["message"] for r in run.log_records() if r.get("pid") == pid and r["message"].startswith("assigned")]

    before = len(assigned_to(other))
    os.kill(victim, signal.SIGSTOP)
    # The group gives the victim's partitions to the other worker (past the session timeout),
    # and it finishes and commits every message while the victim is still frozen.
    wait_until(lambda: len(assigned_to(other)) > before, 60, "the other worker takes the victim's partitions")
    all_committed(bootstrap, group, topic, ends, timeout=120)
    finished_by_victim = len([1 for *_, pid in read_record(record) if pid == victim])
    os.kill(victim, signal.SIGCONT)
    # (Not wait_for_log("lost"): the topic's own name contains the word.)
    wait_until(lambda: any(r["message"].startswith("lost ") for r in run.log_records()), 60, "the victim's on_lost")
    assert [r["pid"] for r in run.log_records() if r["message"].startswith("lost ")] == [victim]
    # The victim then rejoins (an assignment callback after its on_lost: that one has run).
    rejoined = len(assigned_to(victim))
    wait_until(lambda: len(assigned_to(victim)) > rejoined, 60, "the victim rejoins")
    assert committed_offsets(bootstrap, group, topic, 2) == ends, "the woken worker committed for lost partitions"
    assert run.stop() == 0, run.tail()
    assert committed_offsets(bootstrap, group, topic, 2) == ends
    assert missing(record, ends) == []
    # Awake, the victim may finish a few queued messages before its consumer thread learns of
    # the loss; none of them is stored (the committed offsets above), and it logs them.
    if len([1 for *_, pid in read_record(record) if pid == victim]) > finished_by_victim:
        assert "after its partition was revoked: not stored" in run.log_text()


def test_headers_reach_the_handler_as_an_immutable_tuple(ksup, bootstrap, names, tmp_path):
    """A message's headers arrive in order, a value-less one as None, as a tuple of pairs; a
    message without headers has (); the Record hashes (every field is immutable)."""
    from confluent_kafka import Producer

    topic, group = names
    create_topic(bootstrap, topic, 1)
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce(topic, value=b"a", headers=[("first", b"1"), ("none", None), ("first", b"2")])
    p.produce(topic, value=b"b")
    assert p.flush(30) == 0
    record = tmp_path / "r.txt"
    for spec, extra in (("process_fields", []),
                        ("process_fields_batch", ["--batch-size", "2", "--batch-timeout", "0.1"])):
        record.unlink(missing_ok=True)
        run = ksup(f"tests.handlers.shapes:{spec}", bootstrap, topic, f"{group}-{spec}",
                   env={"KSUP_TEST_RECORD": str(record)}, extra=extra)
        wait_until(lambda: record.exists() and len(record.read_text().splitlines()) >= 2, 60, "both handled")
        assert run.stop() == 0, run.tail()
        assert record.read_text().splitlines() == [
            "0 (('first', b'1'), ('none', None), ('first', b'2')) 1", "1 () 1"]


def test_retry_then_dead_letter_with_headers(ksup, bootstrap, names, tmp_path):
    topic, group = names
    ends = loaded(bootstrap, topic, 2, 100)
    create_topic(bootstrap, f"{topic}.dlq", 1)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_RAISE_ALWAYS_AT": "1:7"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env,
               extra=["--on-error", "retry,dead-letter", "--retry-attempts", "2", "--retry-backoff", "0.1"])
    all_committed(bootstrap, group, topic, ends)
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == [(1, 7)], "every message but the failing one was processed"
    assert run.log_text().count(f"on {topic}[1]@7 (attempt") == 2
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}-dlq-reader", "auto.offset.reset": "earliest"})
    c.assign([TopicPartition(f"{topic}.dlq", 0, 0)])
    msg = None
    deadline = time.monotonic() + 20
    while msg is None and time.monotonic() < deadline:
        msg = c.poll(0.5)
    c.close()
    assert msg is not None and msg.error() is None
    headers = {k: v.decode() for k, v in msg.headers()}
    assert headers["ksup.original.topic"] == topic
    assert (headers["ksup.original.partition"], headers["ksup.original.offset"]) == ("1", "7")
    assert headers["ksup.error.type"] == "ValueError" and "cannot parse 1:7" in headers["ksup.error.message"]
    assert headers["ksup.attempts"] == "3"
    assert msg.value() == b"seq-15"  # round-robin production: partition 1, offset 7 is message 15


def test_poison_message_that_kills_the_process_goes_to_dead_letter(ksup, bootstrap, names, tmp_path):
    topic, group = names
    ends = loaded(bootstrap, topic, 2, 60)
    create_topic(bootstrap, f"{topic}.dlq", 1)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_EXIT_ALWAYS_AT": "0:10"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env,
               extra=["--on-error", "dead-letter", "--poison-after", "2", "--restart-delay", "0.2"])
    all_committed(bootstrap, group, topic, ends, timeout=120)
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == [(0, 10)]
    text = run.log_text()
    assert text.count(f"in flight at death: {topic}[0]@10") == 2
    assert f"{topic}[0]@10 killed 2 worker processes: the next worker will dead-letter it" in text
    assert f"{topic}[0]@10 sent to dead-letter topic {topic}.dlq (poison message" in text
    assert end_offsets(bootstrap, f"{topic}.dlq", 1) == {0: 1}


@pytest.mark.parametrize(("spec", "extra"), [
    ("process", []),
    ("process_batch", ["--batch-size", "50", "--batch-timeout", "0.1"]),
])
def test_a_poison_message_of_a_topic_with_the_longest_name_is_put_aside(ksup, bootstrap, names, tmp_path,
                                                                       spec, extra):
    """Kafka allows 249-character topic names; the in-flight board keeps 237 bytes of a name. The
    poison message must still be recognised by the next worker (skipped), not kill every worker;
    in batch mode it must first run alone (a suspect), then be skipped."""
    topic, group = names
    topic = (topic + "-" + "x" * 249)[:249]
    ends = loaded(bootstrap, topic, 1, 30)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_EXIT_ALWAYS_AT": "0:10"}
    run = ksup(f"tests.handlers.recording:{spec}", bootstrap, topic, group, env=env,
               extra=["--on-error", "skip", "--poison-after", "2", "--restart-delay", "0.2", *extra])
    all_committed(bootstrap, group, topic, ends, timeout=120)
    assert run.stop() == 0, run.tail()
    assert missing(record, ends) == [(0, 10)]
    # Per message: two deaths on it. A batch: the first death names the whole batch (suspects),
    # which then run one by one, so the next two deaths name it alone.
    assert run.log_text().count("[0]@10 killed 2 worker processes") == 1, run.tail()


def test_a_slow_message_abandoned_by_drains_ksup_asked_for_is_not_poison(ksup, bootstrap, names, tmp_path):
    """--max-messages recycles a worker while a healthy message takes longer than
    --graceful-timeout: each drain gives up on it (the worker's own exit 11). Those are not deaths
    that message caused, so it never becomes poison: it is handled once the recycles stop, and
    nothing is skipped."""
    topic, group = names
    ends = loaded(bootstrap, topic, 2, 480)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLOW_AT": "0:3", "KSUP_TEST_SLOW_S": "6",
           "KSUP_TEST_SLEEP": "0.02"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, env=env,
               extra=["--on-error", "skip", "--poison-after", "2", "--concurrency", "2", "--max-messages", "30",
                      "--graceful-timeout", "1", "--restart-delay", "0.2"])
    all_committed(bootstrap, group, topic, ends, timeout=150)
    assert run.stop() == 0, run.tail()
    text = run.log_text()
    assert text.count("did not finish") + text.count("drain timeout") >= 2, "the recycles gave up on 0:3"
    assert "without running the handler" not in text and "SKIPPED" not in text, run.tail()
    assert missing(record, ends) == []


def test_drain_during_a_rebalance_is_bounded(ksup, bootstrap, names, tmp_path):
    """SIGTERM while the group is rebalancing (two workers joining): no hang, exit 0, no loss."""
    topic, group = names
    ends = loaded(bootstrap, topic, 8, 4000)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.002"}
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2, env=env,
               extra=["--no-static-membership"])
    wait_until(lambda: len({pid for *_, pid in read_record(record)}) == 2, 60, "both busy")
    subprocess.run([sys.executable, "-m", "supervisor", "scale", "4", "-g", group], cwd=REPO, timeout=30,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    run.wait_for_log("worker 2 started", 30)
    # Mid-rebalance: a new worker has sent its JoinGroup (it logs just before subscribing), and
    # the group has not settled (checked after the stop: some worker was revoked or assigned).
    run.wait_for_log('"message": "joining group', 60, count=3)
    t0 = time.monotonic()
    assert run.stop(60) == 0, run.tail()
    took = time.monotonic() - t0
    print(f"drain during a rebalance took {took:.2f}s")
    records = run.log_records()
    upto = next(i for i, r in enumerate(records) if r["message"].startswith("SIGTERM received"))
    settled = {r["pid"] for r in records[:upto] if r["message"].startswith("assigned t-")}
    assert len(settled) < 4, "the group had settled before the SIGTERM: not a drain during a rebalance"
    assert took < 20
    second = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2, env=env,
                  extra=["--no-static-membership"])
    all_committed(bootstrap, group, topic, ends)
    assert second.stop() == 0
    assert missing(record, ends) == []
