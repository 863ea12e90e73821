"""Settings (edge): defaults, TOML config file, -X Kafka properties, validation.

Everything is validated here, before any worker exists. Settings that would break the offset
contract (auto offset store on, auto commit off) are refused with the reason.
"""

from __future__ import annotations

import math
import socket
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from supervisor.child.policies import ErrorPolicy
from supervisor.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

GROUP_PROTOCOLS = ("classic", "consumer")
ORDER_BY = ("partition", "key")
LOG_FORMATS = ("auto", "json", "text")


@dataclass(frozen=True)
class Settings:
    handler: str = ""
    topics: tuple[str, ...] = ()
    group: str = ""
    bootstrap_servers: str = ""
    workers: int = 1
    kafka: dict[str, str] = field(default_factory=dict)  # librdkafka properties from -X / [kafka]
    group_protocol: str = "classic"
    auto_offset_reset: str = "earliest"
    graceful_timeout: float = 30.0   # seconds from a stop request to SIGKILL
    quick_timeout: float = 5.0       # the same after a second Ctrl+C or SIGQUIT
    broker_timeout: float = 30.0     # how long a booting worker waits for the broker
    revoke_timeout: float = 10.0     # how long a revoke waits for the message in flight
    restart_delay: float = 1.0       # first respawn delay after a worker died; doubles, capped ...
    max_restart_delay: float = 30.0  # ... at this
    crash_loop_deaths: int = 5       # this many unexpected deaths ...
    crash_loop_window: float = 60.0  # ... within this many seconds stop the supervisor
    handler_timeout: float | None = None  # a message taking longer marks the worker stuck
    heartbeat_timeout: float = 30.0  # a joined worker silent this long is stuck (reports every 1 s)
    max_messages: int | None = None  # recycle a worker after about this many messages
    max_memory: int | None = None    # recycle a worker whose RSS exceeds this many bytes
    log_format: str = "auto"
    log_level: str = "info"
    receipt: str | None = None
    control_socket: str | None = None
    pidfile: str | None = None
    concurrency: int = 1             # handler threads per worker (lanes run in parallel)
    order_by: str = "partition"      # lane = partition, or partition + key
    batch_size: int = 1              # >1: the handler gets a list of up to this many records
    batch_timeout: float = 1.0       # how long a partial batch waits to fill
    on_error: tuple[ErrorPolicy, ...] = (ErrorPolicy.STOP,)  # the error-policy chain (child/policies.py)
    retry_attempts: int = 3
    retry_backoff: float = 0.5       # seconds before the first retry; doubles each time
    dead_letter_topic: str = "{topic}.dlq"
    poison_after: int = 2            # worker deaths on one message before it counts as poison
    on_worker_exit: str | None = None  # shell command run (not waited for) when a worker ends
    metrics_addr: str | None = None  # host:port for /metrics and health endpoints (off by default)
    progress_timeout: float = 60.0   # /healthz: lag with no commit progress for this long is unhealthy
    static_membership: bool = True   # one stable group.instance.id per slot
    instance_id_prefix: str | None = None  # default: <host>-<group>
    instance_id_wait: float = 60.0   # KIP-848: retry a group.instance.id the broker still holds this long

    @property
    def worker_drain_timeout(self) -> float:
        return drain_wait(self.graceful_timeout)


def drain_wait(graceful_timeout: float) -> float:
    """How long a worker waits for its handler in a graceful drain: leaves it time to store,
    commit and close before the supervisor's SIGKILL deadline."""
    return max(graceful_timeout - 5.0, graceful_timeout * 0.5)


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'512M', '2G', '1048576' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS and not t[-1:].isdigit() else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"--max-memory {text!r} is not a size (for example 512M or 2G)") from None


# Properties ksup owns. The offset contract: store only after the handler finished, and let
# librdkafka commit what was stored (also on revoke and close).
_FORCED = {"enable.auto.offset.store": "false", "enable.auto.commit": "true"}
# librdkafka fetches for a partition while its local queue holds fewer than queued.min.messages;
# once it holds more, it looks again only after fetch.queue.backoff.ms, 1000 by default. A
# partition of small messages is then capped at about one fetch-ahead a second whatever the
# handler's speed (about 200k msg/s of 16-byte messages here: tests/bench/throughput.py). At 50 ms
# the queue is refilled as it drains; an idle worker with a full queue spends no measurable CPU
# more (5 ms costs 0.6 % of a core, 0 a spinning thread).
FETCH_DEFAULTS = {"fetch.queue.backoff.ms": "50"}
# A worker restart (exit, interpreter start, import, join) takes about 1-3 s here; the session must
# comfortably outlast it so that the restarted static member finds its old assignment.
MIN_STATIC_SESSION_MS = 6000
_CLASSIC_ONLY = ("session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy")


def parse_kafka_property(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-X {text!r} is not key=value (for example -X session.timeout.ms=10000)")
    return key.strip(), value.strip()


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML config: top-level keys are ``ksup start`` options, ``[kafka]`` holds
    librdkafka properties."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (check --config)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Settings)} | {"topic"}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"unknown config key {key!r} in {path} "
                              f"(known keys: {', '.join(sorted(known - {'kafka'}))}, and a [kafka] table)")
        if name == "topic":
            name, value = "topics", [value] if isinstance(value, str) else value
        if name == "topics":
            value = tuple(value)
        if name == "kafka":
            if not isinstance(value, dict):
                raise ConfigError(f"[kafka] in {path} must be a table of librdkafka properties")
            tables = [str(k) for k, v in value.items() if isinstance(v, dict)]
            if tables:
                raise ConfigError(f"[kafka] {tables[0]!r} in {path} is a table; a librdkafka property is a "
                                  f"value, and a secret read from a file is written "
                                  f'"{tables[0]}:file" = "/path/to/it" (or :env = "VARIABLE")')
            value = {str(k): _kafka_value(v) for k, v in value.items()}
        out[name] = value
    return out


def _kafka_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def build(values: dict[str, Any]) -> Settings:
    try:
        settings = Settings(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    return validate(settings)


def validate(s: Settings) -> Settings:
    kafka = dict(s.kafka)
    if not s.bootstrap_servers and "bootstrap.servers" in kafka:
        s = replace(s, bootstrap_servers=kafka["bootstrap.servers"])
    if not s.group and "group.id" in kafka:
        s = replace(s, group=kafka["group.id"])
    if not s.handler:
        raise ConfigError("no handler given (ksup start module:function)")
    if not s.topics:
        raise ConfigError("no topic given (use --topic NAME, or topics = [...] in the config file)")
    if not s.group:
        raise ConfigError("no consumer group given (use --group NAME)")
    if not s.bootstrap_servers:
        raise ConfigError("no bootstrap servers given (use --bootstrap-servers HOST:PORT)")
    if s.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {s.workers}")
    if s.group_protocol not in GROUP_PROTOCOLS:
        raise ConfigError(f"--group-protocol must be one of {', '.join(GROUP_PROTOCOLS)}")
    if s.log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
    for key, required in _FORCED.items():
        if key in kafka and kafka[key].lower() != required:
            raise ConfigError(
                f"{key}={kafka[key]} is refused: ksup stores an offset only after the handler "
                f"finished and lets librdkafka commit it, which needs {key}={required} (remove the setting)")
    if s.group_protocol == "consumer":
        bad = [k for k in _CLASSIC_ONLY if k in kafka]
        if bad:
            raise ConfigError(f"{', '.join(bad)} cannot be set with --group-protocol consumer "
                              f"(the broker decides them under KIP-848; remove them)")
    # Every time must be a number of seconds: nan passes each check below (nan <= 0 is false),
    # and a deadline of now + nan is never reached, so a stuck worker would never be killed.
    for f in fields(s):
        value = getattr(s, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            option = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{option} {value} is not a finite number of seconds (give one, e.g. {option} 30)")
    if not 0 < s.restart_delay <= s.max_restart_delay:
        raise ConfigError(f"--restart-delay ({s.restart_delay:g}s) must be positive and at most "
                          f"--max-restart-delay ({s.max_restart_delay:g}s)")
    for name in ("graceful_timeout", "quick_timeout", "broker_timeout", "revoke_timeout", "heartbeat_timeout",
                 "instance_id_wait"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if s.handler_timeout is not None:
        max_poll_s = int(kafka.get("max.poll.interval.ms", "300000")) / 1000
        if not 0 < s.handler_timeout < max_poll_s:
            raise ConfigError(f"--handler-timeout {s.handler_timeout:g}s must be positive and below "
                              f"max.poll.interval.ms ({max_poll_s:g}s): raise -X max.poll.interval.ms "
                              f"or lower the handler timeout")
    if "group.instance.id" in kafka:
        raise ConfigError("group.instance.id cannot be set directly: every worker needs its own; "
                          "use --instance-id-prefix (ids are <prefix>-<slot>)")
    if s.static_membership and s.group_protocol == "classic":
        session_ms = int(kafka.get("session.timeout.ms", "45000"))
        if session_ms < MIN_STATIC_SESSION_MS:
            raise ConfigError(
                f"session.timeout.ms={session_ms} is too short for static membership: a restarting worker "
                f"must rejoin before its session expires or the group rebalances twice "
                f"(use >= {MIN_STATIC_SESSION_MS}, or --no-static-membership)")
    if s.metrics_addr is not None:
        host, sep, port = s.metrics_addr.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"--metrics-addr {s.metrics_addr!r} is not host:port (for example 127.0.0.1:9300)")
    known = {p.value: p for p in ErrorPolicy}
    if not s.on_error or any(p not in known for p in s.on_error):
        raise ConfigError(f"--on-error {','.join(s.on_error)}: each policy must be one of "
                          f"{', '.join(known)} (for example --on-error retry,dead-letter)")
    s = replace(s, on_error=tuple(known[p] for p in s.on_error))
    if s.order_by not in ORDER_BY:
        raise ConfigError(f"--order-by must be one of {', '.join(ORDER_BY)}")
    if s.concurrency < 1 or s.batch_size < 1:
        raise ConfigError("--concurrency and --batch-size must be at least 1")
    if s.batch_size > 1 and s.concurrency > 1:
        raise ConfigError("--batch-size and --concurrency cannot be combined (a batch spans partitions; "
                          "use one or the other)")
    if s.max_messages is not None and s.max_messages < 1:
        raise ConfigError("--max-messages must be at least 1")
    return s


def kafka_config(s: Settings, slot: int) -> dict[str, str]:
    """The librdkafka properties of the worker in ``slot``: ksup's defaults, then the user's, then
    the properties the offset contract requires."""
    conf: dict[str, str] = {
        "bootstrap.servers": s.bootstrap_servers,
        "group.id": s.group,
        "client.id": f"ksup-{socket.gethostname()}-{s.group}-{slot}",
        "auto.offset.reset": s.auto_offset_reset,
        "auto.commit.interval.ms": "1000",
        **FETCH_DEFAULTS,
    }
    if s.group_protocol == "classic":
        # Cooperative: a rebalance moves only the partitions that change owner.
        conf["partition.assignment.strategy"] = "cooperative-sticky"
        # Members learn that a rebalance started from their next heartbeat: 1 s instead of
        # librdkafka's 3 s makes every join, restart and scale step up to 2 s faster per phase.
        conf["heartbeat.interval.ms"] = "1000"
    else:
        conf["group.protocol"] = "consumer"
    if s.static_membership:
        conf["group.instance.id"] = f"{instance_id_prefix(s)}-{slot}"
    conf.update(s.kafka)
    conf.update(_FORCED)
    return conf


def instance_id_prefix(s: Settings) -> str:
    """group.instance.id is ``<prefix>-<slot>``; the prefix defaults to ``<host>-<group>``."""
    return s.instance_id_prefix or f"{socket.gethostname()}-{s.group}"


def worker_options(s: Settings, log_format: str) -> dict[str, Any]:
    return {
        "concurrency": s.concurrency,
        "order_by": s.order_by,
        "batch_size": s.batch_size,
        "batch_timeout_s": s.batch_timeout,
        "on_error": list(s.on_error),
        "retry_attempts": s.retry_attempts,
        "retry_backoff_s": s.retry_backoff,
        "dead_letter_topic": s.dead_letter_topic,
        "graceful_timeout_s": s.worker_drain_timeout,
        "exit_within_s": s.graceful_timeout,  # a direct SIGTERM's budget (the supervisor's kill deadline)
        "max_memory_bytes": s.max_memory or 0,  # the worker stops taking messages above it
        "handler_timeout_s": s.handler_timeout or 0,  # a drain does not wait for a handler past it
        "configured_workers": s.workers,  # an orphan in a slot above it leaves the group for good
        "broker_timeout_s": s.broker_timeout,
        "revoke_timeout_s": s.revoke_timeout,
        # A standing Kafka problem (no broker answering, commits failing) counts for health
        # after this long, like a partition whose commits stand still (--progress-timeout).
        "problem_after_s": s.progress_timeout,
        "log_format": log_format,
        "log_level": s.log_level,
    }
