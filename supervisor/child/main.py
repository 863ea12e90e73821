"""Worker entry point (child side): ``python -m supervisor.child <channel-fd>``.

Boot order, each step able to fail with a one-line BootFailed before the worker has joined
the group: receive Configure (of a protocol version this worker can serve, else exit 15
INCOMPATIBLE_SUPERVISOR) -> import the handler -> create the Consumer (librdkafka checks
the config) -> ask the broker for the topics' metadata (bounded) -> the handler class's
``setup()`` -> report Loaded -> wait for Go. ``setup()`` runs before Loaded so that a release
whose ``setup()`` raises is a BootFailed: a rolling reload stops there with the old worker still
running, instead of draining it and then crash-looping the new one.
This is the one place where the worker's exit code is chosen.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib.metadata
import logging
import os
import selectors
import signal
import sys
import time
from typing import Any

from supervisor.child import liveness
from supervisor.contract import messages as m
from supervisor.contract.channel import Channel
from supervisor.contract.exitcodes import WorkerExit
from supervisor.logs import redact, secret_values, setup_logging

log = logging.getLogger("ksup.worker")

CONFIGURE_TIMEOUT_S = 30.0


class BootError(Exception):
    def __init__(self, code: WorkerExit, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class Flags:
    """Set by signal handlers (which do nothing else), read by the loops."""

    term = False


def _on_term(signum: int, frame: object) -> None:
    Flags.term = True


def _wait_for(channel: Channel, kinds: tuple[type, ...], timeout: float,
              watch: liveness.ParentWatch) -> m.Message | None:
    """Block until a message of ``kinds`` arrives; None on SIGTERM, orphaning or timeout."""
    sel = selectors.DefaultSelector()
    sel.register(channel.sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not Flags.term and not watch.orphaned():
            sel.select(0.2)
            got = channel.read_available()
            for i, msg in enumerate(got):
                if isinstance(msg, kinds):
                    channel.unread(got[i + 1:])  # e.g. a Drain right behind the Go: the loop's
                    return msg
            if channel.closed or channel.incompatible is not None:
                return None
        return None
    finally:
        sel.close()


def boot(cfg: m.Configure, commits: CommitRelay) -> tuple[Any, Any, int]:
    """Handler, Consumer and the subscribed topics' partition count, or BootError."""
    from supervisor.child.handler import HandlerLoadError, load_handler

    try:
        handler = load_handler(cfg.handler)
    except HandlerLoadError as exc:
        raise BootError(WorkerExit.BOOT_FAILED, str(exc)) from None
    from confluent_kafka import Consumer, KafkaException

    from supervisor.child.kafka_problems import LogWatch
    from supervisor.child.ownership import maybe_owned

    kafka = dict(cfg.kafka)
    user_debug = bool(kafka.get("debug"))
    if kafka.get("group.protocol") == "consumer":
        # librdkafka reports a broker without KIP-848 only in a cgrp debug line (kafka_problems.py).
        kafka["debug"] = ",".join(filter(None, (kafka.get("debug"), "cgrp")))
    commits.log = LogWatch(logging.getLogger("librdkafka"), quiet_debug=not user_debug)
    try:
        # librdkafka's own log lines go through Python logging (JSON, redacted) instead of raw stderr.
        consumer = Consumer({"statistics.interval.ms": "1000", **kafka, "on_commit": commits,
                             "stats_cb": commits.stats, "error_cb": commits.error, "logger": commits.log})
    except (KafkaException, ValueError, TypeError) as exc:
        text = _kafka_text(exc)
        fix = next((hint for needle, hint in CONFIG_HINTS.items() if needle in text),
                   "fix or remove that -X/[kafka] setting")
        raise BootError(WorkerExit.CONFIG, f"Kafka configuration rejected: {text} ({fix})") from None
    consumer = maybe_owned(consumer)  # test mode only: checks the one-owner-thread rule
    timeout = float(cfg.options.get("broker_timeout_s", 30.0))
    servers = cfg.kafka.get("bootstrap.servers", "?")
    try:
        md = wait_for_metadata(consumer, commits, cfg.kafka, timeout)
    except BootError:
        consumer.close()
        raise
    missing = [t for t in cfg.topics if t not in md.topics or md.topics[t].error is not None]
    if missing:
        consumer.close()
        raise BootError(WorkerExit.BROKER_UNREACHABLE,
                        f"topic {', '.join(map(repr, missing))} does not exist on {servers} "
                        f"(create it, or check --topic)")
    return handler, consumer, sum(len(md.topics[t].partitions) for t in cfg.topics)


METADATA_SLICE_S = 0.25


def wait_for_metadata(consumer: Any, commits: CommitRelay, kafka: dict[str, str], timeout: float) -> Any:
    """The cluster's metadata within ``timeout``, asked for in short slices with ``error_cb``
    served in between: librdkafka hands errors out only from ``poll()``, and a refused login
    (which it retries for ever) would otherwise surface as a bare timeout after all of
    ``timeout``. BootError AUTH_FAILED at the first refusal, BROKER_UNREACHABLE at the deadline."""
    from confluent_kafka import KafkaException

    from supervisor.child.kafka_problems import auth_reason

    deadline = time.monotonic() + timeout
    while True:
        slice_end = min(time.monotonic() + METADATA_SLICE_S, deadline)
        try:
            return consumer.list_topics(timeout=max(slice_end - time.monotonic(), 0.001))
        except KafkaException:
            pass
        # Not subscribed yet: poll() returns no message, it only serves the callbacks (bounded
        # by the slice, also when list_topics gave up early).
        consumer.poll(max(slice_end - time.monotonic(), 0.0))
        if commits.refused is not None:
            raise BootError(WorkerExit.AUTH_FAILED, auth_reason(kafka, str(commits.refused.str())))
        if time.monotonic() >= deadline:
            raise BootError(WorkerExit.BROKER_UNREACHABLE,
                            f"no Kafka broker answered at {kafka.get('bootstrap.servers', '?')} within "
                            f"{timeout:g}s (check --bootstrap-servers and that the broker is running)")


# librdkafka's words when it refuses a setting -> what to fix, where "fix that setting" is too vague.
CONFIG_HINTS = {
    # An encrypted key that does not open (measured: "ssl.key.location failed: ...:PEM lib").
    "ssl.key.location failed": "check ssl.key.password, the password of the key in ssl.key.location",
}


def _kafka_text(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return str(arg.str()) if hasattr(arg, "str") else str(arg)


def run(channel: Channel) -> int:
    watch = liveness.ParentWatch()
    cfg = _wait_for(channel, (m.Configure,), CONFIGURE_TIMEOUT_S, watch)
    if channel.incompatible is not None:
        # A supervisor of another protocol version (see contract/codec.py for the rule): refuse
        # before anything else, with both versions and the fix in one line.
        reason = str(channel.incompatible)
        log.error("boot failed: %s", reason)
        channel.send(m.BootFailed(os.getpid(), int(WorkerExit.INCOMPATIBLE_SUPERVISOR), reason))
        return int(WorkerExit.INCOMPATIBLE_SUPERVISOR)
    if not isinstance(cfg, m.Configure):
        return int(WorkerExit.INTERNAL)
    secrets = secret_values(cfg.kafka)
    setup_logging(str(cfg.options.get("log_format", "json")), str(cfg.options.get("log_level", "info")),
                  "worker", cfg.slot, secrets)
    try:
        commits = CommitRelay()
        handler, consumer, partitions = boot(cfg, commits)
        run_setup(cfg.handler, handler, consumer)
    except BootError as exc:
        reason = redact(exc.reason, secrets)
        log.error("boot failed: %s", reason)
        channel.send(m.BootFailed(os.getpid(), int(exc.code), reason))
        return int(exc.code)
    channel.send(m.Loaded(os.getpid(), cfg.handler, importlib.metadata.version("confluent-kafka"), partitions,
                          handler.version))
    go = _wait_for(channel, (m.Go, m.Drain), float("inf"), watch)
    if not isinstance(go, m.Go):
        consumer.close()
        run_teardown(handler)
        channel.send(m.Exiting(os.getpid(), 0, "stopped before joining"))
        return int(WorkerExit.OK)
    return consume(cfg, handler, consumer, channel, watch, commits)


def consume(cfg: m.Configure, handler: Any, consumer: Any, channel: Channel,
            watch: liveness.ParentWatch, commits: CommitRelay) -> int:
    from supervisor.child.leave_barrier import LeaveBarrier
    from supervisor.child.loop import ConsumerLoop

    def outside_stop() -> str | None:
        # Orphaned first: the kernel's parent-death signal is a SIGTERM too, and what matters
        # then is that no supervisor is left to release us or bring this slot back.
        if watch.orphaned():
            return "supervisor died (orphaned)"
        if Flags.term:
            return "SIGTERM received"
        return None

    runner = build_runner(cfg, handler)
    loop = ConsumerLoop(consumer, runner, channel, cfg.topics, cfg.options, outside_stop, handler.instance)
    loop.instance_id = cfg.kafka.get("group.instance.id", "")
    # Orphaned (the supervisor died): a slot above the configured --workers was added by scaling
    # and will not come back with a restarted ksup, so its static member leaves for good.
    loop.slot_above_configured = cfg.slot >= int(cfg.options.get("configured_workers", cfg.slot + 1))
    loop.group = cfg.kafka.get("group.id", "")
    if commits.log is not None:
        from supervisor.child.kafka_problems import unsupported_reason

        servers = cfg.kafka.get("bootstrap.servers", "?")
        commits.log.on_unsupported = lambda _text: loop.request_drain(
            unsupported_reason(servers), 0.0, WorkerExit.BROKER_UNSUPPORTED)
        commits.log.on_empty_target = loop.on_empty_target
    loop.kafka_conf = cfg.kafka  # names the login in an authentication failure
    commits.target = loop
    tune_gc()
    runner.start()
    if cfg.options.get("board"):  # its folder outlives the supervisor: orphans meet there
        loop.leave_barrier = LeaveBarrier(os.path.dirname(str(cfg.options["board"])))
        loop.leave_barrier.enter()
    log.info("joining group %s for %s", cfg.kafka.get("group.id"), ", ".join(cfg.topics))
    try:
        code = loop.run()
    finally:
        if loop.leave_barrier is not None:
            loop.leave_barrier.leave()
    run_teardown(handler)
    return int(code)


def run_setup(spec: str, handler: Any, consumer: Any) -> None:
    """The handler class's ``setup()``, before the worker reports Loaded; raising is a boot
    failure (the consumer, created but never joined, is closed)."""
    if handler.setup is None:
        return
    try:
        handler.setup()
    except Exception as exc:
        log.error("handler setup() raised", exc_info=True)
        consumer.close()
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BootError(WorkerExit.BOOT_FAILED,
                        f"handler {spec!r}: setup() raised {type(exc).__name__}: {first} "
                        f"(fix setup(); the worker did not join the group)") from None


def run_teardown(handler: Any) -> None:
    if handler.teardown is not None:
        try:
            handler.teardown()
        except Exception:
            log.exception("handler teardown raised")


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for the consumer loop. Every message brings a few
    small container objects (a record, a job, tuples) that refcounting frees; but while they wait
    in the backlog, collections keep walking them, and full collections walk everything the
    imports left behind (measured: a quarter of the consumer thread's time at 200k msg/s). So:
    move what boot created out of the collector's sight (it lives as long as the process), and
    collect the youngest generation every 10,000 allocations instead of 700, by which time most
    messages' objects are gone already. Cycles the handler makes are still collected."""
    if os.environ.get("KSUP_GC_DEFAULTS"):  # for comparing, and a way out
        return
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, 10_000), middle, old)


def build_runner(cfg: m.Configure, handler: Any) -> Any:
    """The handler threads with the error policy and the in-flight board, from the options."""
    from supervisor.child.policies import DeadLetter, ErrorPolicy, Executor
    from supervisor.child.runner import HandlerRunner
    from supervisor.contract.inflight_board import BoardWriter

    o = cfg.options
    chain = [ErrorPolicy(p) for p in o.get("on_error", ["stop"])]
    dead_letter = DeadLetter(cfg.kafka, str(o.get("dead_letter_topic", "{topic}.dlq"))) \
        if ErrorPolicy.DEAD_LETTER in chain else None
    poison = {(str(t), int(p), int(off)) for t, p, off in o.get("poison", [])}
    suspects = {(str(t), int(p), int(off)) for t, p, off in o.get("suspects", [])}
    execute = Executor(handler.process, chain, int(o.get("retry_attempts", 3)), float(o.get("retry_backoff_s", 0.5)),
                       dead_letter, poison)
    concurrency = int(o.get("concurrency", 1))
    batch_size = int(o.get("batch_size", 1))
    board = BoardWriter(str(o["board"]), max(concurrency, batch_size)) if o.get("board") else None
    return HandlerRunner(execute, concurrency=concurrency, order_by=str(o.get("order_by", "partition")),
                         batch_size=batch_size, batch_timeout_s=float(o.get("batch_timeout_s", 0)),
                         board=board, isolate=poison | suspects)


class CommitRelay:
    """librdkafka's ``on_commit`` must be given when the Consumer is created, before the loop
    that records commit results exists; this forwards to it once it does."""

    def __init__(self) -> None:
        self.target: Any = None
        self.log: Any = None  # the LogWatch given to librdkafka as its logger
        self.refused: Any = None  # the first authentication error, while booting (no loop yet)

    def __call__(self, err: Any, partitions: Any) -> None:
        if self.target is not None:
            self.target.on_commit(err, partitions)

    def stats(self, stats_json: str) -> None:
        if self.target is not None:
            self.target.on_stats(stats_json)

    def error(self, err: Any) -> None:
        if self.target is not None:
            self.target.on_error(err)
            return
        from supervisor.child.kafka_problems import is_refusal

        if self.refused is None and is_refusal(err):
            self.refused = err


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Signals first: a SIGTERM during boot must not kill us before we can say why.
    signal.signal(signal.SIGTERM, _on_term)
    # A process the handler forks (without exec) would inherit _on_term and ignore the SIGTERM
    # the supervisor sends to a dead worker's process group, outliving its worker.
    os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    # Ctrl+C in a terminal reaches the whole process group; only the supervisor acts on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    liveness.ask_kernel_for_parent_death_signal(signal.SIGTERM)
    # The supervisor sends SIGUSR1 before it SIGKILLs a stuck worker: the stacks land in its log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # A handler's print() goes where stderr goes (the supervisor's pipe): redacted, wrapped as
    # JSON in JSON mode and bounded there, instead of straight into ksup's own stdout.
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    channel = Channel.from_fd(int(argv[0]))
    if len(argv) > 1:
        # The board folder's lock (parent/board_folder.py): kept open for the worker's life and
        # not passed on to what the handler runs.
        os.set_inheritable(int(argv[1]), False)
    try:
        code = run(channel)
    except Exception:
        log.exception("worker crashed")
        code = int(WorkerExit.INTERNAL)
    logging.shutdown()
    try:
        sys.stderr.flush()
    except OSError:
        pass
    # os._exit: a closed stderr pipe (orphaned worker) must not turn our code into 120.
    os._exit(code)
