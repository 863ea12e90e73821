"""What happens when a handler raises (child side): the ``--on-error`` chain.

``retry``  run it again after an exponential backoff, up to --retry-attempts times; only its
           partition waits (its lane holds, its fetching is paused), then the next policy;
``dead-letter``  produce it to the dead-letter topic (default ``<topic>.dlq``) with headers saying
           where it came from and why; its offset is stored only after the broker acknowledged;
``skip``   log loudly and store its offset (an explicit opt-in);
``stop``   store nothing; the worker drains and exits, and the supervisor restarts it (default).

The chain ends in ``stop`` whatever is configured. A *poison* message (one that killed worker
processes, named by the supervisor) skips the handler and goes straight to dead-letter or skip.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from enum import Enum
from typing import Any

from supervisor.child.handler import check_returned
from supervisor.child.runner import STORED, Outcome
from supervisor.connection import connection_properties
from supervisor.contract.inflight_board import key_of
from supervisor.record import Record

log = logging.getLogger("ksup.worker")


class ErrorPolicy(str, Enum):
    """The names ``--on-error`` takes (config.py validates against these)."""

    RETRY = "retry"
    DEAD_LETTER = "dead-letter"
    SKIP = "skip"
    STOP = "stop"


# The policies that take a message out of the way without running it again: a poison message
# (one that killed workers) goes to the first of these in the chain.
QUARANTINE = (ErrorPolicy.DEAD_LETTER, ErrorPolicy.SKIP)

class DeadLetter:
    def __init__(self, kafka: dict[str, str], topic_template: str, timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        conf: dict[str, Any] = connection_properties(kafka)  # a new dict
        conf.update({"acks": "all", "enable.idempotence": True, "linger.ms": 0})
        self._producer = Producer(conf)
        self._template = topic_template
        self._timeout_s = timeout_s
        self._lock = threading.Lock()

    def topic_for(self, topic: str) -> str:
        return self._template.replace("{topic}", topic)

    def send(self, records: list[Record], attempts: int, error: BaseException | None, reason: str) -> str | None:
        """Produce and wait for the acknowledgement. Returns None when acknowledged, else why not.
        ``attempts``: failed handler calls so far (the ksup.attempts header is one more)."""
        failures: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(str(err.str() if hasattr(err, "str") else err))

        with self._lock:
            for r in records:
                headers: list[tuple[str, str | bytes | None]] = [*r.headers,
                    ("ksup.original.topic", r.topic.encode()),
                    ("ksup.original.partition", str(r.partition).encode()),
                    ("ksup.original.offset", str(r.offset).encode()),
                    ("ksup.error.type", (type(error).__name__ if error else reason).encode()),
                    ("ksup.error.message", (str(error) if error else reason).encode()[:4096]),
                    ("ksup.attempts", str(attempts + 1).encode()),
                ]
                self._producer.produce(self.topic_for(r.topic), value=r.value, key=r.key, headers=headers,
                                       on_delivery=delivered)
            left = self._producer.flush(self._timeout_s)
        if left:
            return f"{left} message(s) not acknowledged within {self._timeout_s:g}s"
        return "; ".join(failures) or None


class Poison(Exception):
    """Raised instead of calling the handler on a poison message: the policy puts it aside."""


class Executor:
    """Runs the handler for a record or a batch and applies the error policy. Called on
    handler threads. ``attempts`` everywhere: how many times the first record failed before."""

    def __init__(self, process: Callable[..., Any], chain: list[ErrorPolicy], retry_attempts: int,
                 retry_backoff_s: float,
                 dead_letter: DeadLetter | None, poison: set[tuple[str, int, int]]) -> None:
        self.process = process
        self.chain = chain
        self.retry_attempts = retry_attempts
        self.retry_backoff_s = retry_backoff_s
        self.dead_letter = dead_letter
        self.poison = poison
        self.is_async = inspect.iscoroutinefunction(process) or inspect.iscoroutinefunction(
            getattr(process, "__call__", None))  # noqa: B004 - an object whose __call__ is async
        self._local = threading.local()
        # The per-message call (runner.Execute.one): the handler itself when calling it is all it
        # takes (sync, no poison), since the runner calls it for every message.
        self.one: Callable[[Record], object] = process if not (self.is_async or poison) else self._one

    def _one(self, record: Record) -> object:
        if self.poison and key_of(record) in self.poison:
            raise Poison(f"poison message: worker processes died on {record.coordinates}")
        return self.call(record)

    def batch(self, records: list[Record], attempts: int) -> Outcome:
        """``STORED`` (that very object) when the handler returned; else what the policy says."""
        first = records[0]
        try:
            if self.poison and key_of(first) in self.poison:
                raise Poison(f"poison message: worker processes died on {first.coordinates}")
            result = self.call(records)
            if result is not None:
                check_returned(result)
            return STORED
        except BaseException as exc:  # noqa: BLE001 - the policy decides
            return self.on_failure(records, attempts, exc)

    def call(self, arg: Any) -> object:
        """The handler on ``arg`` (a record, or a list in batch mode); an async one runs to its
        end on this thread's event loop. Returns what a sync handler returned (the caller checks
        it with check_returned); an async one's result is checked here."""
        if not self.is_async:
            return self.process(arg)
        loop = getattr(self._local, "loop", None)
        if loop is None:  # one event loop per handler thread, kept for the worker's life
            import asyncio  # here: only an async handler's worker needs it (the supervisor imports this module)

            loop = self._local.loop = asyncio.new_event_loop()
        result = loop.run_until_complete(self.process(arg))
        if result is not None:
            check_returned(result)
        return None

    def on_failure(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome:
        """The chain, in order: the first policy that decides gives the outcome; ``stop`` ends
        it whatever is configured after it (and when nothing decided). A poison message (``one``
        raised Poison) is put aside at once."""
        if isinstance(exc, Poison):
            return self.fall_back(records, attempts, None, str(exc))
        for policy in self.chain:
            outcome = self._ON_FAILURE[policy](self, records, attempts, exc)
            if outcome is not None:
                return outcome
        return Outcome(store=False, stop=True, error=exc)

    def _retry(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome | None:
        if attempts >= self.retry_attempts:
            return None  # attempts used up: the next policy
        delay = self.retry_backoff_s * 2 ** attempts
        log.warning("handler raised %s on %s (attempt %d of %d); retrying in %.2fs; only this partition waits",
                    type(exc).__name__, records[0].coordinates, attempts + 1, self.retry_attempts + 1, delay)
        return Outcome(store=False, retry_in=delay, error=exc)

    def _quarantine(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome:
        return self.fall_back(records, attempts, exc, f"{type(exc).__name__}: {exc}")

    def _stop(self, records: list[Record], attempts: int, exc: BaseException) -> Outcome:
        return Outcome(store=False, stop=True, error=exc)

    _ON_FAILURE: dict[ErrorPolicy, Callable[[Executor, list[Record], int, BaseException], Outcome | None]] = {
        ErrorPolicy.RETRY: _retry,
        ErrorPolicy.DEAD_LETTER: _quarantine,
        ErrorPolicy.SKIP: _quarantine,
        ErrorPolicy.STOP: _stop,
    }

    def fall_back(self, records: list[Record], attempts: int, exc: BaseException | None, reason: str) -> Outcome:
        """The first of dead-letter / skip in the chain that works; stop when none does."""
        for policy in self.chain:
            put_aside = self._PUT_ASIDE.get(policy)
            outcome = put_aside(self, records, attempts, exc, reason) if put_aside else None
            if outcome is not None:
                return outcome
        return Outcome(store=False, stop=True, error=exc)

    def _dead_letter(self, records: list[Record], attempts: int, exc: BaseException | None,
                     reason: str) -> Outcome | None:
        if self.dead_letter is None:
            return None
        where = records[0].coordinates
        problem = self.dead_letter.send(records, attempts, exc, reason)
        if problem is not None:
            log.error("dead-letter produce of %s failed: %s", where, problem)
            return None
        log.warning("%s sent to dead-letter topic %s (%s)", where, self.dead_letter.topic_for(records[0].topic),
                    reason)
        return Outcome(store=True, error=exc, note="dead-lettered")

    def _skip(self, records: list[Record], attempts: int, exc: BaseException | None, reason: str) -> Outcome:
        log.error("SKIPPED %s: %s (--on-error skip): its offset is stored without processing",
                  records[0].coordinates, reason)
        return Outcome(store=True, error=exc, note="skipped")

    _PUT_ASIDE: dict[ErrorPolicy, Callable[[Executor, list[Record], int, BaseException | None, str],
                                           Outcome | None]] = {
        ErrorPolicy.DEAD_LETTER: _dead_letter,
        ErrorPolicy.SKIP: _skip,
    }
