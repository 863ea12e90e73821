"""Log setup for both processes (edge): JSON lines, or a human format on a terminal.

Every line carries the role (supervisor/worker), pid and worker slot, so the interleaved output
of N workers can be told apart; topic/partition/offset ride along as ``extra`` fields.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

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
        elif record.exc_text:  # already formatted (and redacted) by _Redact
            text += "\n" + record.exc_text
        return text


# librdkafka properties whose values must never be shown (sasl.password, ssl.key.password,
# ssl.keystore.password, ssl.key.pem, sasl.oauthbearer.client.secret, sasl.oauthbearer.config,
# sasl.oauthbearer.assertion.private.key.passphrase/.pem, sasl.jaas.config, ...).
SECRET_KEY = re.compile(r"password|secret|token|jaas|oauthbearer\.config|private|credential|passphrase|key\.pem",
                        re.IGNORECASE)
SHORT_SECRET = 4  # below this length a value is redacted only where it stands as a whole word


def secret_values(kafka: dict[str, str]) -> list[str]:
    """The values to hide: those of secret-looking keys, whatever their length (see redact)."""
    return sorted({v for k, v in kafka.items() if SECRET_KEY.search(k) and v}, key=len, reverse=True)


@functools.lru_cache(maxsize=8)
def _short_pattern(short: tuple[str, ...]) -> re.Pattern[str] | None:
    if not short:
        return None
    return re.compile(r"(?<![A-Za-z0-9_])(?:" + "|".join(map(re.escape, short)) + r")(?![A-Za-z0-9_])")


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace secret values with ***. A value of 4 characters or more goes wherever it appears;
    a shorter one only as a whole word (between non-alphanumerics), so that a 2-character
    password does not blank out those two letters in every word of every line (it may still
    hide an ordinary word that equals it: a short secret is weak anyway)."""
    secrets = tuple(secrets)
    for secret in secrets:
        if len(secret) >= SHORT_SECRET and secret in text:
            text = text.replace(secret, "***")
    pattern = _short_pattern(tuple(x for x in secrets if len(x) < SHORT_SECRET))
    if pattern is not None:
        text = pattern.sub("***", text)
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
                  secrets: list[str] | None = None, stream: Any = None) -> None:
    """``stream``: where lines go (default stderr; the supervisor gives its non-blocking sink)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
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
