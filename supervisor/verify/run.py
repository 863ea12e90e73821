"""``ksup verify``: produce N sequence-numbered messages to a scratch topic while a real
``ksup start`` consumes them with the recording handler, inject faults on a seeded schedule,
then check from the records and the broker that every message was processed at least once.

Faults: ``sigterm`` (stop ksup with SIGTERM and start it again), ``kill`` (SIGKILL one worker),
``reload`` (rolling reload), ``scale`` (one worker more, then back), ``exception`` (a message
whose handler raises once), ``broker-restart`` (runs the user's ``--broker-restart-command``,
which restarts a broker and returns once it is back; ksup verify does not manage brokers). Each
duplicate is attributed to the last fault before it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.adapters.control import request

FAULTS = ("sigterm", "kill", "supervisor-kill", "reload", "scale", "scale-flap", "exception", "hang",
          "broker-restart", "broker-pause")
PROGRESS_EVERY_S = 10.0  # a progress line on stderr at least this often (soak runs, logs)
MESSAGE_FAULTS = ("exception", "hang")  # carried by messages, not injected on the schedule
HANDLER_TIMEOUT_S = 3.0  # verify's ksup stops a hung handler after this long
DEFAULT_FAULTS = FAULTS[:-2]  # broker-restart and broker-pause need commands
BROKER_PAUSE_S = 5.0  # how long a broker-pause fault keeps the broker paused
BROKER_RESTART_TIMEOUT_S = 300.0


@dataclass
class Plan:
    bootstrap: str
    messages: int = 20_000
    partitions: int = 8
    workers: int = 4
    rate: int = 2_000            # messages produced per second
    faults: tuple[str, ...] = DEFAULT_FAULTS
    fault_interval: float = 3.0  # seconds between faults
    seed: int = 1
    kafka: dict[str, str] = field(default_factory=dict)
    keep_topic: bool = False
    handler_sleep: float = 0.0005
    timeout: float = 600.0
    broker_restart_command: str | None = None  # a shell command; returns once the broker is back
    max_gap: float = 10.0  # the verdict fails when a partition waited longer than this for a consumer
    broker_pause_command: str | None = None   # freezes a broker (e.g. ssh B kill -STOP <pid>)
    broker_resume_command: str | None = None  # and thaws it


@dataclass
class Outcome:
    produced: int = 0
    processed: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicates_by_fault: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    committed_ok: bool = False
    committed_mismatch: dict[str, list[int]] = field(default_factory=dict)
    longest_gap_s: float = 0.0
    seconds: float = 0.0
    topic: str = ""
    files: str = ""
    interrupted: str = ""  # the signal that ended the run early: no verdict, what was seen so far
    max_gap_s: float = 10.0
    gap_by_fault: dict[str, float] = field(default_factory=dict)  # longest gap that began after each kind

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.committed_ok and not self.interrupted and self.longest_gap_s <= self.max_gap_s

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


class Ksup:
    """One ``ksup start`` process of the verification run."""

    def __init__(self, plan: Plan, topic: str, work: Path, env: dict[str, str]) -> None:
        self.socket = str(work / "ksup.sock")
        # The fault plan accounts for ksup's own rules: injected deaths (kills, hangs) must not
        # trip its crash-loop halt, which is for a handler that can never work.
        config = work / "ksup.toml"
        # The Kafka properties go in the file's [kafka] table, not in -X: they may hold a password,
        # and argv is readable by every local user; the file is the owner's only.
        kafka = "".join(f"{json.dumps(k, ensure_ascii=False)} = {json.dumps(v, ensure_ascii=False)}\n"
                        for k, v in plan.kafka.items())
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("crash_loop_deaths = 1000000\n" + (f"[kafka]\n{kafka}" if kafka else ""))
        args = [sys.executable, "-m", "supervisor", "start", "supervisor.verify.recorder:process",
                "-b", plan.bootstrap, "-t", topic, "-g", topic, "-w", str(plan.workers),
                "--control-socket", self.socket, "--log-format", "json", "--restart-delay", "0.2",
                "--graceful-timeout", "20", "--config", str(config)]
        if "hang" in plan.faults:
            args += ["--handler-timeout", str(HANDLER_TIMEOUT_S)]
        self.log = open(work / f"ksup-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.stopping = False  # verify stopped it on purpose (a sigterm fault, the end)

    def check_alive(self) -> None:
        """Raise CouldNotRun when this ksup ended without verify asking it to."""
        code = self.proc.poll()
        if code is not None and not self.stopping:
            raise CouldNotRun(f"its ksup exited {code} unexpectedly (see {self.log.name})")

    def ask(self, body: dict[str, Any], timeout: float | None = 10.0) -> dict[str, Any]:
        return request(self.socket, body, timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CouldNotRun(f"its ksup exited {self.proc.returncode} while starting (see {self.log.name})")
            try:
                workers = self.ask({"cmd": "status"})["workers"]
                if workers and all(w["state"] == "assigned" for w in workers):
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        raise TimeoutError("ksup did not get its workers assigned")

    def stop(self, timeout: float = 60.0) -> int:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


class CouldNotRun(Exception):
    """The run could not go on (its ksup died, the producer failed, the broker is gone): no
    verdict about loss; verify exits COULD_NOT_RUN with this reason."""


class Interrupted(Exception):
    """SIGTERM or SIGINT: stop cleanly, still report what was seen."""


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In verify's ksup, before exec: the kernel sends it SIGTERM when verify dies, whatever
    kills verify (SIGKILL included); ksup then drains, and its workers exit with it."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _admin_and_probe(plan: Plan) -> tuple[Any, Any]:
    from confluent_kafka import Consumer
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {k: v for k, v in plan.kafka.items() if not k.startswith(("group.", "enable.", "auto."))}
    conf["bootstrap.servers"] = plan.bootstrap
    probe = Consumer({**conf, "group.id": f"ksup-verify-probe-{uuid.uuid4().hex[:8]}"})
    return AdminClient(conf), probe


def _produce(plan: Plan, topic: str, fail_at: set[int], hang_at: set[int], progress: dict[str, Any],
             stop: threading.Event) -> None:
    """The producer thread: never dies on timing; any error is kept in progress["error"] for the
    main loop, which stops the run with it."""
    try:
        _produce_all(plan, topic, fail_at, hang_at, progress, stop)
    except BaseException as exc:  # noqa: BLE001 - reported by the main loop
        progress["error"] = f"the producer failed: {type(exc).__name__}: {exc}"


def _produce_all(plan: Plan, topic: str, fail_at: set[int], hang_at: set[int], progress: dict[str, Any],
                 stop: threading.Event) -> None:
    from confluent_kafka import Producer

    producer = Producer({**{k: v for k, v in plan.kafka.items() if k.startswith(("security.", "sasl.", "ssl."))},
                         "bootstrap.servers": plan.bootstrap, "acks": "all", "linger.ms": 5,
                         # a broker restart makes the producer retry: each message must land once
                         "enable.idempotence": True})
    started = time.monotonic()
    for n in range(plan.messages):
        if stop.is_set():
            break
        wait = started + n / plan.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # one reading of the clock: never a negative sleep
        value = f"seq-{n}" + (":fail" if n in fail_at else ":hang" if n in hang_at else "")
        while True:
            try:
                producer.produce(topic, value.encode(), key=str(n).encode())
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        progress["produced"] = n + 1
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"{left} message(s) not acknowledged by the broker within 60 s")


def run(plan: Plan, show_progress: bool = True) -> Outcome:
    """The whole verification. Raises CouldNotRun when it cannot reach a verdict. The scratch
    topic is deleted on every way out of here (unless --keep-topic), and SIGTERM/SIGINT end the
    run cleanly with a report of what was seen (``Outcome.interrupted``)."""
    from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

    rng = random.Random(plan.seed)
    topic = f"ksup-verify-{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix="ksup-verify-"))
    record = work / "record.txt"
    env = {**os.environ, "KSUP_VERIFY_RECORD": str(record), "KSUP_VERIFY_SLEEP": str(plan.handler_sleep)}
    admin, probe = _admin_and_probe(plan)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=plan.partitions, replication_factor=-1)])[topic].result(60)
    except Exception as exc:
        raise CouldNotRun(f"could not create the scratch topic on {plan.bootstrap}: {exc}") from None
    outcome = Outcome(topic=topic, max_gap_s=plan.max_gap)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _run(plan, rng, topic, work, record, env, admin, probe, outcome, show_progress)
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


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _run(plan: Plan, rng: random.Random, topic: str, work: Path, record: Path, env: dict[str, str], admin: Any,
         probe: Any, outcome: Outcome, show_progress: bool) -> None:
    t0 = time.monotonic()
    # Messages that raise once: one per planned "exception" fault, spread over the run.
    fail_at = {rng.randrange(plan.messages) for _ in range(max(1, plan.messages // 5000))} \
        if "exception" in plan.faults else set()
    # Messages that hang once, fewer: each costs a --handler-timeout and a worker restart.
    hang_at = {rng.randrange(plan.messages) for _ in range(max(1, plan.messages // 20000))} - fail_at \
        if "hang" in plan.faults else set()
    progress: dict[str, Any] = {"produced": 0}
    stop_producing = threading.Event()
    producer = threading.Thread(target=_produce, args=(plan, topic, fail_at, hang_at, progress, stop_producing),
                                daemon=True)
    ksup: Ksup | None = None
    timeline: list[tuple[int, str]] = []
    ends: dict[int, int] = {}
    try:
        ksup = Ksup(plan, topic, work, env)
        ksup.wait_ready()
        producer.start()
        next_fault = time.monotonic() + plan.fault_interval
        scaled = False
        deck: list[str] = []  # scheduled faults come in seeded rounds with every kind once
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while True:
            done = _count_lines(record)
            if show_progress:
                _bar(progress["produced"], done, plan.messages, len(outcome.faults))
            if "error" in progress:
                raise CouldNotRun(progress["error"])
            if time.monotonic() >= next_progress:
                next_progress = time.monotonic() + PROGRESS_EVERY_S
                _progress_line(t0, progress["produced"], done, outcome.faults, admin, topic, plan, record)
            ksup.check_alive()
            faults = [f for f in plan.faults if f not in MESSAGE_FAULTS]
            # The first round is always finished: every chosen kind happens at least once, also
            # when the messages were all produced before the round's slower faults came up.
            first_round_left = bool(faults) and len(outcome.faults) < len(faults)
            if not producer.is_alive() and done >= plan.messages and not first_round_left:
                break
            if time.monotonic() - t0 > plan.timeout:
                raise CouldNotRun(f"verification did not finish within {plan.timeout:.0f}s")
            if faults and (producer.is_alive() or first_round_left) and time.monotonic() >= next_fault:
                if not deck:
                    deck = rng.sample(faults, len(faults))
                fault = deck.pop()
                timeline.append((time.time_ns(), fault))
                outcome.faults.append(fault)
                ksup, scaled = _inject(fault, ksup, plan, topic, work, env, rng, scaled)
                next_fault = time.monotonic() + plan.fault_interval
            time.sleep(0.2)
        if fail_at:
            outcome.faults.append(f"exception x{len(fail_at)}")
        if hang_at:
            outcome.faults.append(f"hang x{len(hang_at)}")
        ends = _wait_committed(admin, probe, topic, plan)
    except Interrupted as exc:
        outcome.interrupted = str(exc)
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise CouldNotRun(str(exc)) from None
    finally:
        stop_producing.set()
        if ksup is not None:
            ksup.stop()
        if show_progress:
            sys.stderr.write("\n")
    outcome.seconds = round(time.monotonic() - t0, 1)
    if outcome.interrupted:
        ends = _wait_committed(admin, probe, topic, plan, within_s=5.0)
    _analyse(outcome, record, ends, timeline, admin, topic)


def _inject(fault: str, ksup: Ksup, plan: Plan, topic: str, work: Path, env: dict[str, str],
            rng: random.Random, scaled: bool) -> tuple[Ksup, bool]:
    if fault == "sigterm":
        code = ksup.stop()
        if code not in (0, 4, 5):  # 4/5: a message abandoned or a commit unconfirmed: duplicates, not loss
            raise RuntimeError(f"ksup exited {code} on SIGTERM (see {ksup.log.name})")
        ksup = Ksup(plan, topic, work, env)
        ksup.wait_ready()
    elif fault == "supervisor-kill":
        # The supervisor dies at once; its workers notice (their pipe closes) and drain on their own.
        workers = [w["pid"] for w in ksup.ask({"cmd": "status"})["workers"] if w["pid"]]
        ksup.stopping = True
        ksup.proc.kill()
        ksup.stop()
        _wait_gone(workers, 60.0)
        ksup = Ksup(plan, topic, work, env)
        ksup.wait_ready()
    elif fault == "kill":
        pids = [w["pid"] for w in ksup.ask({"cmd": "status"})["workers"] if w["pid"]]
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)
    elif fault == "reload":
        began = time.time()
        result = ksup.ask({"cmd": "reload", "wait": True}, timeout=300)
        # A message fault (a raise, a hang) that a freshly rolled worker met is that fault's
        # expected outcome, not a failed release; anything else is a real reload failure.
        if not result.get("ok") and not _message_fault_since(work, began):
            raise RuntimeError(f"rolling reload failed: {result.get('error')}")
    elif fault == "scale-flap":
        # Up by two and straight back down: the scale-down is decided while the new slots boot.
        ksup.ask({"cmd": "scale", "workers": plan.workers + 2})
        ksup.ask({"cmd": "scale", "workers": plan.workers + 1 if scaled else plan.workers})
    elif fault == "scale":
        ksup.ask({"cmd": "scale", "workers": plan.workers if scaled else plan.workers + 1})
        scaled = not scaled
    elif fault == "broker-restart" and plan.broker_restart_command:
        _shell(plan.broker_restart_command, "--broker-restart-command")
    elif fault == "broker-pause" and plan.broker_pause_command and plan.broker_resume_command:
        _shell(plan.broker_pause_command, "--broker-pause-command")
        try:
            time.sleep(BROKER_PAUSE_S)  # the fault itself: the broker stays frozen this long
        finally:
            _shell(plan.broker_resume_command, "--broker-resume-command")
    return ksup, scaled


def _message_fault_since(work: Path, since: float) -> bool:
    """Whether a handler met an injected failure or hang since ``since`` (the recording
    handler leaves a marker file for each, see recorder.py)."""
    for marker in [*work.glob("record.txt.failed-*"), *work.glob("record.txt.hung-*")]:
        try:
            if marker.stat().st_mtime >= since - 1.0:
                return True
        except OSError:
            pass
    return False


def _shell(command: str, option: str) -> None:
    done = subprocess.run(command, shell=True, timeout=BROKER_RESTART_TIMEOUT_S, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{option} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(0.1)
    raise CouldNotRun(f"workers {pids} outlived their killed supervisor by {timeout:.0f}s (orphans)")


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return len({tuple(line.split()[:2]) for line in f})
    except OSError:
        return 0


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


def _analyse(outcome: Outcome, record: Path, ends: dict[int, int], timeline: list[tuple[int, str]],
             admin: Any, topic: str) -> None:
    rows = [tuple(map(int, line.split())) for line in record.read_text().splitlines()] if record.exists() else []
    outcome.produced = sum(ends.values())
    seen = Counter((r[0], r[1]) for r in rows)
    outcome.processed = len(seen)
    outcome.lost = sum(1 for p, end in ends.items() for o in range(end) if (p, o) not in seen)
    outcome.duplicates = sum(n - 1 for n in seen.values() if n > 1)
    first: set[tuple[int, int]] = set()
    by_fault: Counter[str] = Counter()
    for p, o, _pid, _created, done in sorted(rows, key=lambda r: r[4]):
        if (p, o) in first:
            cause = "before any fault"
            for at, name in timeline:
                if at <= done:
                    cause = name
            by_fault[cause] += 1
        first.add((p, o))
    outcome.duplicates_by_fault = dict(by_fault)
    committed = _committed(admin, topic, len(ends))
    if outcome.interrupted:
        # Cut short: loss is what the group committed without processing it (the rest was
        # simply not consumed yet).
        outcome.lost = sum(1 for p, c in committed.items() for o in range(max(c, 0)) if (p, o) not in seen)
        outcome.committed_ok = outcome.lost == 0
        outcome.committed_mismatch = {}
    else:
        outcome.committed_ok = committed == ends
    if not outcome.interrupted:
        outcome.committed_mismatch = {str(p): [committed.get(p, -1), end] for p, end in ends.items()
                                      if committed.get(p) != end}
    worst = 0.0
    by_kind: dict[str, float] = {}
    for p in ends:
        events = sorted((r[4], r[3]) for r in rows if r[0] == p)
        for (done_a, _), (done_b, created_b) in zip(events, events[1:], strict=False):
            waiting_since = max(done_a, created_b * 1_000_000)  # the next message was already there
            gap = (done_b - waiting_since) / 1e9
            worst = max(worst, gap)
            cause = "before any fault"
            for at, name in timeline:
                if at <= waiting_since:
                    cause = name
            by_kind[cause] = max(by_kind.get(cause, 0.0), round(gap, 3))
    outcome.longest_gap_s = round(worst, 3)
    outcome.gap_by_fault = by_kind


def _progress_line(t0: float, produced: int, processed: int, faults: list[str], admin: Any, topic: str, plan: Plan,
                   record: Path) -> None:
    """One line for a soak run's log: produced, processed, lost so far (committed but never
    processed), faults so far."""
    try:
        committed = _committed(admin, topic, plan.partitions)
        seen = {tuple(map(int, line.split()[:2])) for line in record.read_text().splitlines()} \
            if record.exists() else set()
        lost: int | str = sum(1 for p, c in committed.items() for o in range(max(c, 0)) if (p, o) not in seen)
    except Exception:  # noqa: BLE001 - a progress line is best effort
        lost = "?"
    sys.stderr.write(f"ksup verify: {time.monotonic() - t0:.0f}s produced {produced} processed {processed} "
                     f"lost so far {lost} faults {len(faults)}\n")
    sys.stderr.flush()


def _bar(produced: int, processed: int, total: int, faults: int) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * processed / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{' ' * (width - filled)}] produced {produced}/{total}  "
                     f"processed {processed}  faults {faults} ")
    sys.stderr.flush()


def report(outcome: Outcome) -> str:
    lines = [
        f"topic           {outcome.topic}",
        f"produced        {outcome.produced}",
        f"processed       {outcome.processed}",
        f"lost            {outcome.lost}" + ("" if outcome.lost == 0 else "   <-- MESSAGES LOST"),
        f"duplicates      {outcome.duplicates}" + (
            "   (" + ", ".join(f"{k}: {v}" for k, v in sorted(outcome.duplicates_by_fault.items())) + ")"
            if outcome.duplicates else ""),
        "committed       " + ("= processed + 1 on every partition" if outcome.committed_ok
                             else f"MISMATCH {outcome.committed_mismatch}"),
        f"longest gap     {outcome.longest_gap_s} s without a consumer on a partition with messages waiting"
        + (f"   <-- ABOVE --max-gap {outcome.max_gap_s:g} s" if outcome.longest_gap_s > outcome.max_gap_s else ""),
        "gap by fault    " + (", ".join(f"{k}: {v} s" for k, v in sorted(outcome.gap_by_fault.items())) or "none"),
        f"faults          {', '.join(outcome.faults) or 'none'}",
        f"took            {outcome.seconds} s",
        "result          " + ("OK: nothing lost" if outcome.ok else
                                 f"INTERRUPTED ({outcome.interrupted}): no verdict; lost so far {outcome.lost}"
                                 if outcome.interrupted else "FAILED"),
    ]
    return "\n".join(lines)


def as_json(outcome: Outcome) -> str:
    return json.dumps(outcome.as_dict(), indent=2)
