"""The producer thread of a ``ksup verify`` run: sequence-numbered messages at the plan's rate,
some marked to make the recording handler raise (``:fail``), hang (``:hang``) or kill its worker
(``:poison``) once (plan.MESSAGE_FAULT_KINDS)."""

from __future__ import annotations

import threading
import time
from typing import Any

from supervisor.connection import connection_properties
from supervisor.verify.plan import MESSAGE_FAULT_KINDS, Plan


def produce(plan: Plan, topic: str, marks: dict[int, str], progress: dict[str, Any],
            stop: threading.Event) -> None:
    """The thread's body: never dies on timing; any error is kept in progress["error"] for the
    run's loop, which stops the run with it."""
    try:
        _produce_all(plan, topic, marks, progress, stop)
    except BaseException as exc:  # noqa: BLE001 - reported by the run's loop
        progress["error"] = f"the producer failed: {type(exc).__name__}: {exc}"


def _produce_all(plan: Plan, topic: str, marks: dict[int, str], progress: dict[str, Any],
                 stop: threading.Event) -> None:
    from confluent_kafka import Producer

    producer = Producer({**connection_properties(plan.kafka),
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
        value = f"seq-{n}" + marks.get(n, "")
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


def spread(count: int, messages: int, rng: Any, shift: float = 0.0) -> set[int]:
    """``count`` sequence numbers spread evenly over the run (jittered by ``rng``), so that
    message faults do not pile up on one partition at one time; ``shift`` (0..1) moves them
    within their share of the sequence."""
    if count <= 0 or messages <= 0:
        return set()
    share = messages / count
    return {min(messages - 1, int(share * (i + 0.25 + 0.5 * ((shift + rng.random() * 0.5) % 1.0))))
            for i in range(count)}


def marked(plan: Plan, rng: Any) -> dict[int, str]:
    """Sequence number -> the suffix of the message fault it carries (at most one each)."""
    marks: dict[int, str] = {}
    for kind, how in MESSAGE_FAULT_KINDS.items():
        if kind in plan.faults:
            for n in spread(max(1, plan.messages // how.every), plan.messages, rng, shift=how.shift):
                marks.setdefault(n, how.suffix)
    return marks
