"""A handler that raises and a worker that is SIGKILLed: the supervisor says why, restarts the
slot, and no message is skipped (at-least-once)."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest

from tests.harness import read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, produce_sequence

pytestmark = pytest.mark.kafka

HANDLER = "tests.handlers.recording:process"


def missing(records: list[tuple[int, int, int]], ends: dict[int, int]) -> list[tuple[int, int]]:
    seen = {(p, o) for p, o, _ in records}
    return [(p, o) for p, end in ends.items() for o in range(end) if (p, o) not in seen]


@pytest.mark.compat
def test_handler_exception_stops_worker_without_storing_and_slot_restarts(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 4)
    produce_sequence(bootstrap, topic, 400, partitions=4)
    ends = end_offsets(bootstrap, topic, 4)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_RAISE_AT": "1:50", "KSUP_TEST_SLEEP": "0.001"}
    run = ksup(HANDLER, bootstrap, topic, group, workers=2, env=env, extra=["--restart-delay", "0.2"])
    wait_until(lambda: len(read_record(record)) >= 400, 90, "all messages processed")
    assert run.stop() == 0, run.tail()

    rows = read_record(record)
    assert missing(rows, ends) == []
    # The failed message was not stored: the restarted worker handled it (exactly once, since the
    # failure happened before the handler recorded it).
    assert Counter((p, o) for p, o, _ in rows)[(1, 50)] == 1
    text = run.log_text()
    assert f"handler raised RuntimeError on {topic}[1]@50" in text
    assert "exit 10 (HANDLER_FAILED)" in text
    assert "restarts in 0.2s" in text
    assert committed_offsets(bootstrap, group, topic, 4) == ends


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_sigkilled_worker_is_restarted_and_its_messages_redelivered(ksup, bootstrap, names, tmp_path, protocol):
    """Both protocols. KIP-848: the restarted static member is refused (UNRELEASED_INSTANCE_ID) until
    its dead predecessor's session expires (the broker's 10 s here); it retries meanwhile, and
    that is not mistaken for another consumer using the instance id (exit 8)."""
    topic, group = names
    create_topic(bootstrap, topic, 4)
    produce_sequence(bootstrap, topic, 2000, partitions=4)
    ends = end_offsets(bootstrap, topic, 4)
    record = tmp_path / "record.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_SLEEP": "0.003"}
    # The dead member holds its partitions until its session times out (KIP-848: the broker's).
    session = ["-X", "session.timeout.ms=6000"] if protocol == "classic" else []
    run = ksup(HANDLER, bootstrap, topic, group, workers=2, env=env,
               extra=["--restart-delay", "0.2", "--group-protocol", protocol, *session])
    wait_until(lambda: len({pid for *_, pid in read_record(record)}) >= 2 and len(read_record(record)) > 300,
               90, "both workers busy")
    victim = run.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # Done when the group has committed everything: the victim's unfinished messages were
    # redelivered to whoever owns its partitions now (all processed once is not enough: the
    # victim processed some it never committed).
    wait_until(lambda: run.proc.poll() is not None or committed_offsets(bootstrap, group, topic, 4) == ends,
               120, "everything committed", 1.0)
    assert run.proc.poll() is None, f"ksup exited {run.proc.returncode}: {run.tail(3)}"
    assert run.stop() == 0, run.tail()

    rows = read_record(record)
    assert missing(rows, ends) == []
    assert f"(pid {victim}) killed by SIGKILL" in run.log_text()
    assert "restarts in 0.2s" in run.log_text()
    assert committed_offsets(bootstrap, group, topic, 4) == ends


def test_a_worker_that_exits_0_without_draining_is_not_a_clean_stop(ksup, bootstrap, names, tmp_path):
    """A library in the handler turned SIGTERM into an immediate exit 0: the worker never
    drained nor sent its exit report, so its last finished messages were not committed. ksup must
    not call that a clean stop: exit 5 (COMMIT_FAILED: redelivered), with a reason naming it."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 3000, partitions=2)
    record = tmp_path / "r.txt"
    run = ksup("tests.handlers.exits_on_sigterm:Handler", bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(record)})
    wait_until(lambda: len(read_record(record)) > 20, 60, "processing")
    assert run.stop() == 5, run.tail()
    assert "exited 0 without draining" in run.log_text(), run.tail()
    assert run.receipt()["exit_code"] == 5


def test_a_handler_that_raises_while_the_worker_drains_is_not_a_clean_stop(ksup, bootstrap, names, tmp_path):
    """A stop comes while a handler runs, and then that handler raises (--on-error stop): the
    message is not stored, so it is redelivered, like one the drain abandoned. The drain's first
    reason ("SIGTERM received") used to keep its code 0 as well, so the worker exited 0 and ksup 0
    ("every worker drained: finished in flight"). Now ksup exits 4 and names the failure. Oracle:
    the handler's record has no line for that message, and the group's committed offset for that
    partition is that message's offset, so the next consumer handles it again."""
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20, partitions=1)
    record = tmp_path / "r.txt"
    env = {"KSUP_TEST_RECORD": str(record), "KSUP_TEST_RAISE_ON_GO_AT": "0:10"}
    run = ksup(HANDLER, bootstrap, topic, group, env=env)
    wait_until(lambda: os.path.exists(f"{record}.KSUP_TEST_RAISE_ON_GO_AT"), 60, "the handler on 0:10")
    run.signal(signal.SIGTERM)
    run.wait_for_log("drain requested: SIGTERM received", 30)
    (tmp_path / "r.txt.go").touch()  # the handler raises now, inside the drain
    assert run.wait(60) == 4, run.tail()
    assert [(p, o) for p, o, _ in read_record(record)] == [(0, o) for o in range(10)]
    assert committed_offsets(bootstrap, group, topic, 1) == {0: 10}
    last = run.log_text().strip().splitlines()[-1]
    assert "exit 4 (FORCED)" in last and f"handler raised RuntimeError on {topic}[0]@10" in last, last
    assert run.receipt()["exit_code"] == 4


def test_a_helper_the_handler_forked_does_not_outlive_its_worker(ksup, bootstrap, names, tmp_path):
    """A fork (no exec) inherits the worker's SIGTERM handler (drain, ignored outside a consumer
    loop), so the SIGTERM ksup sends to a dead worker's process group did not end it: it lived
    on under ksup. A forked child gets SIGTERM's default back."""
    import psutil

    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 10)
    record = tmp_path / "r.txt"
    helpers_file = tmp_path / "r.txt.helpers"

    def helpers() -> list[psutil.Process]:
        out = []
        for pid in map(int, helpers_file.read_text().split() if helpers_file.exists() else []):
            try:
                out.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return out

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    run = ksup("tests.handlers.forks_helper:process", bootstrap, topic, group, env={"KSUP_TEST_RECORD": str(record)})
    try:
        wait_until(lambda: helpers(), 60, "helper forked")
        first = helpers()[0]
        os.kill(first.ppid(), signal.SIGKILL)  # its worker
        run.wait_for_log("worker 0 restarts", 30)
        wait_until(lambda: not alive(first), 10, "the forked helper ended with its worker")
        assert run.stop() == 0, run.tail()
        # A redelivered 0:3 forked another under the next worker: it ends with that one.
        wait_until(lambda: not any(map(alive, helpers())), 10, "every forked helper ended")
    finally:
        for p in helpers():  # by pid, also when the test failed
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
