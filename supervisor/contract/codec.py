"""Wire format: one JSON object per line, ``{"type": <class name>, ...fields}``.

Pure functions with no I/O, so they are tested without pipes. Unknown types and malformed lines
raise ``CodecError``; the reader decides what that means for the peer.
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
# Report fields are read on every report; unknown ones (a newer worker) are dropped, not fatal.


class CodecError(ValueError):
    """A line that is not a ksup message."""


def encode(msg: m.Message) -> bytes:
    body = dataclasses.asdict(msg)
    body["type"] = type(msg).__name__
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> m.Message:
    try:
        body = json.loads(line)
        cls = _TYPES[body.pop("type")]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CodecError(f"not a ksup message: {line[:80]!r}") from exc
    for name, nested in _NESTED.items():
        if isinstance(body.get(name), dict):
            body[name] = nested(**body[name])
    if cls is m.Exiting:
        body["receipt"] = [m.PartitionReceipt(**r) for r in body.get("receipt", [])]
    try:
        return cls(**body)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise CodecError(f"bad fields for {cls.__name__}: {exc}") from exc
