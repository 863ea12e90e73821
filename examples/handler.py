"""Example handler: ``ksup start --workers 4 -t orders -g billing handler:process`` (run from
this folder). Each message is an order as JSON; the handler "bills" it and logs one line."""

from __future__ import annotations

import json
import logging
import os
import time

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
