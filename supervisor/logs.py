"""Log setup for both processes (edge): JSON lines, or a human format on a terminal.

Every line carries the role (supervisor/worker), pid and worker slot, so the interleaved output
of N workers can be told apart; topic/partition/offset ride along as ``extra`` fields.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable

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


# librdkafka properties whose values must never be shown (sasl.password, ssl.key.password,
# sasl.oauthbearer.client.secret, sasl.jaas.config, ...).
SECRET_KEY = re.compile(r"password|secret|token|jaas|oauthbearer\.config|private|credential", re.IGNORECASE)


def secret_values(kafka: dict[str, str]) -> list[str]:
    """The values to hide: those of secret-looking keys (at least 4 characters, so that a value
    like "1" does not blank out every digit of a log line)."""
    return sorted({v for k, v in kafka.items() if SECRET_KEY.search(k) and len(v) >= 4}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _Redact(logging.Filter):
    """Replaces secret values in every formatted message (ours, librdkafka's, a handler's)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact(message, self.secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info), self.secrets)
                record.exc_info = None
        return True


def resolve_format(fmt: str) -> str:
    """'auto' means text on a terminal, JSON otherwise (systemd, Kubernetes, files)."""
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


def setup_logging(fmt: str, level: str, role: str, slot: int | None = None,
                  secrets: list[str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if resolve_format(fmt) == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(role)s %(slot)s %(pid)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(_Text())
    handler.addFilter(_Context(role, slot))
    handler.addFilter(_Redact(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
