"""Log setup for both processes (edge): JSON lines, or a human format on a terminal.

Every line carries the role (supervisor/worker), pid and worker slot, so the interleaved output
of N workers can be told apart; topic/partition/offset ride along as ``extra`` fields.
"""

from __future__ import annotations

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter


class _Context(logging.Filter):
    def __init__(self, role: str, slot: int | None) -> None:
        super().__init__()
        self.role, self.slot = role, slot

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.slot = self.slot
        record.pid = os.getpid()
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = record.__dict__
        who = "supervisor" if ctx.get("role") == "supervisor" else f"worker {ctx.get('slot')}"
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} [{who} {ctx.get('pid')}] "
        text = base + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def resolve_format(fmt: str) -> str:
    """'auto' means text on a terminal, JSON otherwise (systemd, Kubernetes, files)."""
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def setup_logging(fmt: str, level: str, role: str, slot: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if resolve_format(fmt) == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(role)s %(slot)s %(pid)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(_Text())
    handler.addFilter(_Context(role, slot))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
