"""What the worker makes of Kafka's errors (child side): which ones end the worker, and which
standing problems it reports to the supervisor (``Report.problems``) for status and health.

Fatal, with their own exit codes (the supervisor halts on each, restarting cannot help; but
see "instance id held"):
- the broker refused the credentials (wrong password, unknown user, a SASL mechanism it does not
  offer): librdkafka 2.16 reports ``_AUTHENTICATION`` to ``error_cb`` for every connection
  attempt (about 0.3 s after connecting, against Kafka 4.3) and retries for ever; a metadata
  request only times out with ``_TRANSPORT``. ``fatal()`` and ``retriable()`` are both False, so
  the code decides. TLS: an untrusted broker certificate or a client certificate the broker
  rejects (their texts, below). At boot the worker serves ``error_cb`` while it waits for
  metadata (main.py).
- fenced: another consumer joined with this worker's ``group.instance.id``. librdkafka hands
  this out of ``poll()`` as ``_FATAL`` whose text carries the broker's error (FENCED_INSTANCE_ID
  on the classic protocol, which fences the older member). ``KafkaError.fatal()`` is False on
  that event, so the text decides.
- instance id held (KIP-848, UNRELEASED_INSTANCE_ID, which refuses the newcomer): another member
  still has this ``group.instance.id``: a live duplicate, or this slot's predecessor that died
  without leaving. The supervisor retries the slot for ``--instance-id-wait`` (the predecessor's
  session expires meanwhile) and halts as fenced only if the id is still held after that.
- the broker lacks KIP-848 (``--group-protocol consumer`` against Kafka 3.x): librdkafka only
  says so in a ``cgrp`` debug line ("ConsumerGroupHeartbeatRequest not supported by broker")
  and retries for ever, so the worker asks for that debug context and watches its log
  (``LogWatch``); the lines it did not ask for are not passed on.

Standing problems (each reported while it lasts; none is fatal): no broker answering (librdkafka
statistics: no broker UP with a receive in the last ``after_s``, or ``_ALL_BROKERS_DOWN``),
commits failing for longer than ``after_s``, a subscribed topic that is unknown (deleted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from confluent_kafka import KafkaError

from supervisor.contract.exitcodes import WorkerExit

log = logging.getLogger("ksup.worker")


def _text(code: int) -> str:
    return str(KafkaError(code).str()).split(": ", 1)[-1]


FENCED_TEXTS = (_text(KafkaError.FENCED_INSTANCE_ID), _text(KafkaError._FENCED))
FENCED_CODES = (KafkaError.FENCED_INSTANCE_ID, KafkaError._FENCED)
# KIP-848 refuses a joining static member whose instance id another member still holds. That is
# a live duplicate, or this slot's own predecessor that died without leaving (SIGKILL, OOM, a
# crash): the broker keeps it until its session expires, so only time tells the two apart.
UNRELEASED_TEXT = _text(KafkaError.UNRELEASED_INSTANCE_ID)
# Both end the consumer (librdkafka makes them fatal: every later call fails).
IDENTITY_EXITS = (WorkerExit.FENCED, WorkerExit.INSTANCE_ID_HELD)
UNSUPPORTED_848_TEXT = "ConsumerGroupHeartbeatRequest not supported by broker"
# KIP-848: a member whose target assignment is empty gets no rebalance callback at all and
# librdkafka keeps its join state "init"; this cgrp debug line is the broker saying so.
EMPTY_TARGET_848_TEXT = 'ConsumerGroupHeartbeat received target assignment ""'
UNKNOWN_TOPIC_CODES = (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION)
AUTH_CODES = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)


class Fatal(NamedTuple):
    code: WorkerExit
    reason: str


def fenced_reason(instance_id: str, group: str, detail: str) -> str:
    return (f"fenced: another consumer joined group {group!r} with this worker's group.instance.id "
            f"{instance_id!r} ({detail}); give each ksup of the group its own --instance-id-prefix")


def unsupported_reason(servers: str) -> str:
    return (f"--group-protocol consumer needs KIP-848 (the ConsumerGroupHeartbeat API, Kafka 4.0+), and the "
            f"broker at {servers} does not offer it (Kafka 3.x or older); use --group-protocol classic, "
            f"or upgrade the brokers to Kafka 4.x")


# TLS handshakes that no retry can fix (measured, librdkafka 2.16.0 against Kafka 4.3.1): we do not
# trust the broker's certificate (_SSL "certificate verify failed"), or the broker rejects ours
# with a TLS alert (_TRANSPORT "ssl/tls alert bad certificate" when none or a wrong one is sent).
TLS_UNTRUSTED_TEXT = "certificate verify failed"
TLS_ALERT_TEXTS = ("alert bad certificate", "alert certificate required", "alert unknown ca",
                   "alert certificate unknown", "alert certificate expired", "alert certificate revoked",
                   "alert unsupported certificate", "alert access denied")
TLS_CODES = (KafkaError._SSL, KafkaError._TRANSPORT)


def _tls_refusal(text: str) -> bool:
    return TLS_UNTRUSTED_TEXT in text or any(t in text for t in TLS_ALERT_TEXTS)


def is_refusal(err: Any) -> bool:
    """The broker refused our login (SASL), or a TLS handshake failed over a certificate."""
    return _refused(err.code(), str(err.str()), False)


def _detail(text: str, start: str) -> str:
    """librdkafka's text without the broker's name before it and the timing after it:
    "<broker>: <start>... (after 301ms in state AUTH_REQ)", where <broker> is
    "sasl_ssl://host:port/1" or "GroupCoordinator: host:port"."""
    detail = text.rsplit(" (after ", 1)[0]
    return detail[detail.find(start):] if start in detail else detail


def auth_reason(kafka: Mapping[str, str], text: str) -> str:
    """One line for a refused login or certificate: who tried what where, the words of the side
    that refused, the fix. Never a password (only the names of the settings that hold it)."""
    servers = kafka.get("bootstrap.servers", "?")
    if TLS_UNTRUSTED_TEXT in text:
        detail = _detail(text, "certificate verify failed").split(", verify that", 1)[0]
        return (f"authentication failed: the TLS handshake with the broker at {servers} failed ({detail}); "
                f"set ssl.ca.location to the CA that signed the broker's certificate")
    if any(t in text for t in TLS_ALERT_TEXTS):
        detail = _detail(text, "ssl/tls alert").split(": SSL alert number", 1)[0]
        return (f"authentication failed: the broker at {servers} refused the TLS client certificate "
                f"({detail}); set ssl.certificate.location and ssl.key.location to a certificate signed by a "
                f"CA the broker trusts")
    mechanism = kafka.get("sasl.mechanism", kafka.get("sasl.mechanisms", "GSSAPI"))
    user = kafka.get("sasl.username", "")
    detail = _detail(text, "SASL ").removeprefix("SASL authentication error: ")
    who = f"SASL {mechanism} login of user {user!r}" if user else f"SASL {mechanism} login (no sasl.username)"
    fix = ("set sasl.mechanism to one the broker offers" if "Unsupported SASL mechanism" in detail else
           "check sasl.username and the password (sasl.password, or the file or variable its :file/:env "
           "reference names)")
    return f"authentication failed: the broker at {servers} refused the {who} ({detail}); {fix}"


def _fenced(code: int, text: str, fatal: bool) -> bool:
    return code in FENCED_CODES or any(t in text for t in FENCED_TEXTS)


def _unreleased(code: int, text: str, fatal: bool) -> bool:
    return code == KafkaError.UNRELEASED_INSTANCE_ID or UNRELEASED_TEXT in text


def held_reason(instance_id: str, group: str, text: str) -> str:
    return (f"the broker still holds group.instance.id {instance_id!r} of group {group!r} for another member "
            f"({text}): a previous worker of this slot that died without leaving (until its session "
            f"expires), or another consumer using this instance id")


def _refused(code: int, text: str, fatal: bool) -> bool:
    return code in AUTH_CODES or (code in TLS_CODES and _tls_refusal(text))


def _other_fatal(code: int, text: str, fatal: bool) -> bool:
    return code == KafkaError._FATAL or fatal


class _Kind(NamedTuple):
    matches: Callable[[int, str, bool], bool]
    code: WorkerExit
    reason: Callable[[str, str, Mapping[str, str], str], str]  # (instance_id, group, kafka, text)


# First match wins: fencing comes as _FATAL too, so it goes before the catch-all.
FATAL_KINDS = (
    _Kind(_unreleased, WorkerExit.INSTANCE_ID_HELD, lambda iid, group, kafka, text: held_reason(iid, group, text)),
    _Kind(_fenced, WorkerExit.FENCED, lambda iid, group, kafka, text: fenced_reason(iid or "(none)", group, text)),
    _Kind(_refused, WorkerExit.AUTH_FAILED, lambda iid, group, kafka, text: auth_reason(kafka, text)),
    _Kind(_other_fatal, WorkerExit.KAFKA_FATAL, lambda iid, group, kafka, text: f"fatal Kafka error: {text}"),
)


def classify(err: Any, instance_id: str, group: str, kafka: Mapping[str, str] | None = None) -> Fatal | None:
    """A consumer error (from poll/consume, error_cb or a commit) that must end the worker.
    ``kafka``: the worker's librdkafka properties, for naming the login that was refused."""
    code, text, fatal = err.code(), str(err.str()), bool(err.fatal())
    for kind in FATAL_KINDS:
        if kind.matches(code, text, fatal):
            return Fatal(kind.code, kind.reason(instance_id, group, kafka or {}, text))
    return None


class LogWatch:
    """librdkafka's ``logger``: passes lines to ``logger``, except the debug lines ksup asked for
    itself (``quiet_debug``); tells ``on_unsupported`` when the broker lacks KIP-848 and
    ``on_empty_target`` when a KIP-848 heartbeat gave this member no partitions."""

    def __init__(self, logger: logging.Logger, quiet_debug: bool) -> None:
        self.logger = logger
        self.quiet_debug = quiet_debug
        self.on_unsupported: Callable[[str], None] | None = None
        self.on_empty_target: Callable[[], None] | None = None
        self.unsupported = ""

    def log(self, level: int, msg: str, *args: Any) -> None:
        text = msg % args if args else msg
        if UNSUPPORTED_848_TEXT in text and not self.unsupported:
            self.unsupported = text
            if self.on_unsupported is not None:
                self.on_unsupported(text)
        if EMPTY_TARGET_848_TEXT in text and self.on_empty_target is not None:
            self.on_empty_target()
        if level <= logging.DEBUG and self.quiet_debug:
            return
        self.logger.log(level, "%s", text)


class KafkaProblems:
    """Standing Kafka-side problems, one line each (``lines``). Fed from the consumer thread."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self.commit_failing_since: float | None = None
        self.commit_error = ""
        self.brokers_answered_at = time.monotonic()
        self.brokers_seen = ""
        self.all_down_since: float | None = None
        self.unknown_topic = ""

    def on_commit(self, err: Any, partitions: list[Any] | None = None) -> None:
        """A commit result: ``err`` None (or _NO_OFFSET) is a success. A commit refused because
        the topic is unknown is the first sign of a deleted topic (the consumer's metadata learns
        it minutes later)."""
        if err is None or err.code() == KafkaError._NO_OFFSET:
            self.commit_failing_since = None
            return
        if err.code() in UNKNOWN_TOPIC_CODES:
            topics = ", ".join(sorted({str(p.topic) for p in partitions or []})) or "?"
            self.unknown_topic = f"{topics}: {err.str()} (deleted?)"
        if self.commit_failing_since is None:
            self.commit_failing_since = time.monotonic()
        self.commit_error = str(err.str())

    def on_error(self, err: Any) -> None:
        code = err.code()
        if code == KafkaError._ALL_BROKERS_DOWN and self.all_down_since is None:
            self.all_down_since = time.monotonic()
        elif code in UNKNOWN_TOPIC_CODES:
            self.unknown_topic = f"{err.str()} (deleted?)"

    def on_assign(self) -> None:
        self.unknown_topic = ""  # the broker gave us partitions: the topics exist

    def on_stats(self, stats: dict[str, Any]) -> None:
        """Brokers answering: some broker UP that received something within ``after_s``
        (a member heartbeats every few seconds, so a live coordinator always qualifies)."""
        now = time.monotonic()
        states = []
        for name, b in stats.get("brokers", {}).items():
            rxidle = b.get("rxidle", -1)
            states.append(f"{name} {b.get('state')}")
            if b.get("state") == "UP" and rxidle >= 0:
                self.brokers_answered_at = max(self.brokers_answered_at, now - rxidle / 1e6)
                if rxidle < self.after_s * 1e6:
                    self.all_down_since = None
        self.brokers_seen = ", ".join(sorted(states))

    def lines(self) -> list[str]:
        now = time.monotonic()
        out = []
        if self.all_down_since is not None:
            out.append(f"all broker connections are down (for {now - self.all_down_since:.0f}s)")
        elif now - self.brokers_answered_at > self.after_s:
            out.append(f"no broker answered for {now - self.brokers_answered_at:.0f}s "
                       f"({self.brokers_seen or 'no broker statistics'})")
        if self.commit_failing_since is not None and now - self.commit_failing_since > self.after_s:
            out.append(f"commits failing for {now - self.commit_failing_since:.0f}s: {self.commit_error}")
        if self.unknown_topic:
            out.append(f"topic gone: {self.unknown_topic}")
        return out
