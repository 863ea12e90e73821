"""Example handler: ``ksup start --workers 4 -t orders -g billing handler:process`` (run from
this folder). Each message is an order as JSON; the handler "bills" it and logs one line.
``handler:Billing`` is the same handler in the class form, with every optional hook.

The annotations at the end make ``mypy --strict examples/handler.py`` check both against the
shapes ksup runs (``supervisor/handler_types.py``)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol

from supervisor.handler_types import ClassHandler, HandlerHooks, MessageHandler, TopicPartition
from supervisor.record import Record

log = logging.getLogger("billing")
# The demo counts finished messages in this file (one line per message, appended whole).
_LEDGER = os.environ.get("DEMO_LEDGER")
_fd = os.open(_LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _LEDGER else None


def process(record: Record) -> None:
    order = json.loads(record.value or b"{}")
    total = sum(item["qty"] * item["price"] for item in order.get("items", []))
    time.sleep(0.005)  # stands for a database write or an HTTP call
    if _fd is not None:
        os.write(_fd, f"{record.partition} {record.offset} {order.get('id')} {total:.2f}\n".encode())
    if record.offset % 250 == 0:
        log.info("billed order %s: %.2f EUR (%s)", order.get("id"), total, record.coordinates)


class Billing:
    """The class form: created once per worker."""

    def __init__(self) -> None:
        self.billed = 0

    def setup(self) -> None:
        """Before the worker reports loaded: raising here stops a rolling reload (exit 3)."""
        log.info("billing ready")

    def process(self, record: Record) -> None:
        process(record)
        self.billed += 1

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        log.info("billing %s", partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        log.info("no longer billing %s", partitions)

    def teardown(self) -> None:
        log.info("billed %d orders", self.billed)


if TYPE_CHECKING:
    class _BillingShape(ClassHandler, HandlerHooks, Protocol):
        ...

    _process: MessageHandler = process
    _billing: _BillingShape = Billing()
