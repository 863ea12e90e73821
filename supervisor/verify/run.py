"""``ksup verify``'s run: produce N sequence-numbered messages to a scratch topic while a real
``ksup start`` consumes them with the recording handler, inject faults on a seeded schedule,
then judge from the handler's record and the broker's committed offsets (never from ksup's own
report) that every message was processed at least once.

The pieces: plan.py (faults, settings, how a run ends early), ksup_process.py (the ksup it
drives), faults.py (one function per scheduled fault), producer.py, tally.py (the record, read
as it grows), report.py (outcome, verdict, text and JSON). This module is the loop.

Scheduled faults come in seeded rounds in which every kind happens once; the first round is
always finished, and after each fault the run waits until ksup is ready again before the next.
SIGTERM/SIGINT are only recorded (plan.Cancel); the loop then stops ksup, reports what was
seen and deletes the scratch topic.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from supervisor.verify.faults import INJECT, FaultContext, message_faults_seen, new_message_faults
from supervisor.verify.ksup_process import Ksup, write_config
from supervisor.verify.plan import (
    DEFAULT_FAULTS,
    HANDLER_TIMEOUT_S,
    MESSAGE_FAULT_SPACING_S,
    PROGRESS_EVERY_S,
    READY_WAIT_S,
    Cancel,
    CouldNotRun,
    Fault,
    Interrupted,
    Plan,
)
from supervisor.verify.producer import marked, produce
from supervisor.verify.report import Outcome, as_json, report
from supervisor.verify.tally import Tally

__all__ = ["DEFAULT_FAULTS", "CouldNotRun", "Fault", "Outcome", "Plan", "as_json", "report", "run"]


def _admin_and_probe(plan: Plan) -> tuple[Any, Any]:
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {k: v for k, v in plan.kafka.items() if not k.startswith(("group.", "enable.", "auto."))}
    conf["bootstrap.servers"] = plan.bootstrap
    probe = Consumer({**conf, "group.id": f"ksup-verify-probe-{uuid.uuid4().hex[:8]}"})
    return AdminClient(conf), probe


def run(plan: Plan, show_progress: bool = True) -> Outcome:
    """The whole verification. Raises CouldNotRun when it cannot reach a verdict. The scratch
    topic is deleted on every way out of here (unless --keep-topic), and SIGTERM/SIGINT end the
    run cleanly with a report of what was seen (``Outcome.interrupted``)."""
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    rng = random.Random(plan.seed)
    topic = f"ksup-verify-{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix="ksup-verify-"))
    record = work / "record.txt"
    env = {**os.environ, "KSUP_VERIFY_RECORD": str(record), "KSUP_VERIFY_SLEEP": str(plan.handler_sleep),
           # One message fault of a kind at a time (recorder.py): a raise costs a worker restart,
           # a hang the --handler-timeout and a restart, a poison a restart.
           "KSUP_VERIFY_FAULT_SPACING": str(max(MESSAGE_FAULT_SPACING_S, plan.fault_interval)),
           "KSUP_VERIFY_HANG_SPACING": str(max(HANDLER_TIMEOUT_S + MESSAGE_FAULT_SPACING_S, plan.fault_interval))}
    admin, probe = _admin_and_probe(plan)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=plan.partitions, replication_factor=-1)])[topic].result(60)
    except Exception as exc:
        raise CouldNotRun(f"could not create the scratch topic on {plan.bootstrap}: {exc}") from None
    write_config(plan, work / "ksup.toml")
    outcome = Outcome(topic=topic, max_gap_s=plan.max_gap)
    cancel = Cancel()
    previous = {sig: signal.signal(sig, cancel) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _run(plan, rng, topic, work, env, admin, probe, outcome, cancel, show_progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        probe.close()
        (work / "ksup.toml").unlink(missing_ok=True)  # it may hold a password; the logs stay
        if not plan.keep_topic:
            try:
                admin.delete_topics([topic])[topic].result(60)
            except Exception as exc:  # noqa: BLE001 - said, not fatal
                sys.stderr.write(f"ksup verify: could not delete the scratch topic {topic}: {exc}\n")
    if outcome.ok and not os.environ.get("KSUP_VERIFY_KEEP_FILES"):
        shutil.rmtree(work, ignore_errors=True)  # on failure the records and logs stay for a look
    outcome.files = str(work)
    return outcome


def _run(plan: Plan, rng: random.Random, topic: str, work: Path, env: dict[str, str], admin: Any,
         probe: Any, outcome: Outcome, cancel: Cancel, show_progress: bool) -> None:
    t0 = time.monotonic()
    marks = marked(plan, rng)
    tally = Tally(work / "record.txt")
    progress: dict[str, Any] = {"produced": 0}
    stop_producing = threading.Event()
    producer = threading.Thread(target=produce, args=(plan, topic, marks, progress, stop_producing),
                                name="ksup-verify-producer", daemon=True)
    ctx: FaultContext | None = None
    ends: dict[int, int] = {}
    scheduled = plan.scheduled
    try:
        ctx = FaultContext(plan, topic, work, env, rng, cancel, Ksup(plan, topic, work, env))
        if not ctx.ksup.wait_ready(cancel, READY_WAIT_S):
            raise CouldNotRun(f"its ksup was not ready within {READY_WAIT_S:.0f}s (see {ctx.ksup.log.name})")
        producer.start()
        next_fault = time.monotonic() + plan.fault_interval
        deck: list[Fault] = []
        markers: set[str] = set()
        # On a thread of its own: a progress line every 10 s also while a fault is under way.
        threading.Thread(target=_progress, args=(t0, progress, tally, outcome.faults, admin, topic, plan,
                                                 stop_producing), name="ksup-verify-progress", daemon=True).start()
        while True:
            cancel.check()
            for at_ns, kind in new_message_faults(work, markers):
                tally.fault(at_ns, kind.value)  # a gap or duplicate after it is this fault's
            tally.poll()
            if show_progress:
                _bar(progress["produced"], tally.distinct, plan.messages, len(outcome.faults))
            if "error" in progress:
                raise CouldNotRun(progress["error"])
            ctx.ksup.check_alive()
            first_round_left = bool(scheduled) and len(outcome.faults) < len(scheduled)
            if not producer.is_alive() and tally.distinct >= plan.messages and not first_round_left:
                break
            if time.monotonic() - t0 > plan.timeout:
                raise CouldNotRun(f"verification did not finish within {plan.timeout:.0f}s")
            if scheduled and (producer.is_alive() or first_round_left) and time.monotonic() >= next_fault:
                if not deck:
                    deck = rng.sample(scheduled, len(scheduled))
                fault = deck.pop()
                tally.fault(time.time_ns(), fault.value)
                outcome.faults.append(fault.value)
                INJECT[fault](ctx)
                # One fault at a time: what follows is this fault's outcome, not two at once.
                if not ctx.ksup.wait_ready(cancel, READY_WAIT_S):
                    outcome.not_ready_after.append(fault.value)
                next_fault = time.monotonic() + plan.fault_interval
            cancel.sleep(0.2)
        ends = _wait_committed(admin, probe, topic, plan)
    except Interrupted as exc:
        outcome.interrupted = str(exc)
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise CouldNotRun(str(exc)) from None
    finally:
        stop_producing.set()
        if ctx is not None:
            ctx.ksup.stop()
        if show_progress:
            sys.stderr.write("\n")
    outcome.seconds = round(time.monotonic() - t0, 1)
    if outcome.interrupted:
        ends = _wait_committed(admin, probe, topic, plan, within_s=5.0)
    counts = Counter(outcome.faults)
    for kind, n in message_faults_seen(work).items():
        if n:
            counts[kind.value] = n
            outcome.faults.append(f"{kind.value} x{n}")
    outcome.fault_counts = dict(counts)
    tally.poll()
    _analyse(outcome, tally, ends, admin, topic)


def _wait_committed(admin: Any, probe: Any, topic: str, plan: Plan, within_s: float = 60.0) -> dict[int, int]:
    """The end offsets, once the group's commits reached them (or ``within_s`` passed)."""
    from confluent_kafka import TopicPartition

    ends = {p: probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(plan.partitions)}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and _committed(admin, topic, plan.partitions) != ends:
        time.sleep(0.5)
    return ends


def _committed(admin: Any, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (the group is named after the scratch topic)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    req = ConsumerGroupTopicPartitions(topic, [TopicPartition(topic, p) for p in range(partitions)])
    result = admin.list_consumer_group_offsets([req])[topic].result(30)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def _analyse(outcome: Outcome, tally: Tally, ends: dict[int, int], admin: Any, topic: str) -> None:
    outcome.produced = sum(ends.values())
    outcome.processed = tally.processed_below(ends)
    outcome.duplicates = tally.duplicates
    outcome.duplicates_by_fault = dict(tally.duplicates_by_fault)
    committed = _committed(admin, topic, len(ends))
    if outcome.interrupted:
        # Cut short: loss is what the group committed without processing it (the rest was
        # simply not consumed yet).
        outcome.lost = tally.lost_below(committed)
        outcome.committed_ok = outcome.lost == 0
    else:
        outcome.lost = sum(tally.missing(p, end) for p, end in ends.items())
        outcome.committed_ok = committed == ends
        outcome.committed_mismatch = {str(p): [committed.get(p, -1), end] for p, end in ends.items()
                                      if committed.get(p) != end}
    outcome.longest_gap_s = round(tally.longest_gap_s, 3)
    outcome.gap_by_fault = dict(tally.gap_by_fault)


def _progress(t0: float, progress: dict[str, Any], tally: Tally, faults: list[str], admin: Any, topic: str,
              plan: Plan, done: threading.Event) -> None:
    """Every PROGRESS_EVERY_S until the run ends: one line for a soak run's log."""
    while not done.wait(PROGRESS_EVERY_S):
        _progress_line(t0, progress["produced"], tally, faults, admin, topic, plan)


def _progress_line(t0: float, produced: int, tally: Tally, faults: list[str], admin: Any, topic: str,
                   plan: Plan) -> None:
    """Produced, processed, lost so far (committed but never processed), faults so far, the
    longest gap so far."""
    try:
        lost: int | str = tally.lost_below(_committed(admin, topic, plan.partitions))
    except Exception:  # noqa: BLE001 - a progress line is best effort
        lost = "?"
    sys.stderr.write(f"ksup verify: {time.monotonic() - t0:.0f}s produced {produced} processed {tally.distinct} "
                     f"lost so far {lost} faults {len(faults)} longest gap {tally.longest_gap_s:.1f}s\n")
    sys.stderr.flush()


def _bar(produced: int, processed: int, total: int, faults: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * processed / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] produced {produced}/{total}  "
                     f"processed {processed}  faults {faults} ")
    sys.stderr.flush()
