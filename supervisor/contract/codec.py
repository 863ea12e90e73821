"""Wire format: one JSON object per line, ``{"type": <class name>, ...fields}``.

Pure functions with no I/O, so they are tested without pipes. Unknown types and malformed lines
raise ``CodecError``; the reader decides what that means for the peer (the channel logs and
skips them).

Compatibility rule (``messages.PROTOCOL_VERSION``, one integer, a *major* version): a supervisor
and a worker can talk when their versions are equal. Within one version the format only grows:

- a new field is added with a default, so an older peer that does not send it still decodes;
- a reader ignores fields it does not know (a newer peer's additions), in every message type
  and in nested objects;
- a new message type may be sent only to a peer known to understand it (an older reader logs
  and skips an unknown type).

Removing or renaming a field, changing its meaning or type, or making a new field required
bumps ``PROTOCOL_VERSION``. The worker checks the version of the first message it gets
(``Configure.version``) and refuses one it cannot serve with ``WorkerExit.INCOMPATIBLE_SUPERVISOR``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from supervisor.contract import messages as m

_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (m.Configure, m.Go, m.Drain, m.Leave, m.Loaded, m.BootFailed, m.Report, m.ReadyToLeave,
                m.Exiting)
}
# Nested dataclasses rebuilt by field name.
_NESTED: dict[str, type[Any]] = {"in_flight": m.InFlight, "abandoned": m.InFlight}
# Field names per type, to drop the ones a newer peer added.
_FIELDS: dict[type[Any], frozenset[str]] = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (*_TYPES.values(), m.InFlight, m.PartitionReceipt)
}
# The fields of protocol version 1 without a default. Every field added since must have one
# (the rule above); tests/test_codec.py holds the messages to it.
FIELDS_OF_VERSION_1: dict[str, tuple[str, ...]] = {
    "Configure": ("slot", "handler", "topics", "kafka", "options"),
    "Drain": ("timeout_s",),
    "Loaded": ("pid", "handler", "client_version"),
    "BootFailed": ("pid", "exit_code", "reason"),
    "Report": ("pid", "state", "assignment", "in_flight", "processed", "failed", "stored", "committed",
               "rss_bytes"),
    "ReadyToLeave": ("pid",),
    "Exiting": ("pid", "exit_code", "reason"),
}


class CodecError(ValueError):
    """A line that is not a ksup message."""


class IncompatibleVersion(CodecError):
    """A Configure of a protocol version this worker cannot serve (it may not even decode)."""

    def __init__(self, theirs: Any) -> None:
        super().__init__(f"the supervisor speaks ksup protocol version {theirs}, this worker speaks "
                         f"version {m.PROTOCOL_VERSION} (run supervisor and workers from the same ksup "
                         f"release: restart ksup itself after upgrading it, a reload is not enough)")
        self.theirs = theirs


def compatible(version: Any) -> bool:
    """Whether a peer of protocol ``version`` can be served (same major version)."""
    return isinstance(version, int) and not isinstance(version, bool) and version == m.PROTOCOL_VERSION


def encode(msg: m.Message) -> bytes:
    body = dataclasses.asdict(msg)
    body["type"] = type(msg).__name__
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _known(cls: type[Any], body: dict[str, Any]) -> dict[str, Any]:
    """``body`` without the fields ``cls`` does not have (a newer peer's additions)."""
    fields = _FIELDS[cls]
    return {k: v for k, v in body.items() if k in fields}


def decode(line: bytes) -> m.Message:
    try:
        body = json.loads(line)
        cls = _TYPES[body.pop("type")]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CodecError(f"not a ksup message: {line[:80]!r}") from exc
    if cls is m.Configure and not compatible(body.get("version", m.PROTOCOL_VERSION)):
        raise IncompatibleVersion(body.get("version"))
    body = _known(cls, body)
    try:
        for name, nested in _NESTED.items():
            if isinstance(body.get(name), dict):
                body[name] = nested(**_known(nested, body[name]))
        if cls is m.Exiting:
            body["receipt"] = [m.PartitionReceipt(**_known(m.PartitionReceipt, r)) for r in body.get("receipt", [])]
        return cls(**body)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise CodecError(f"bad fields for {cls.__name__}: {exc}") from exc
