"""The message object a handler receives. Part of ksup's public API.

A handler is called as ``process(record)``; ``record`` is a ``Record``. It is a plain,
immutable value (a named tuple: fields by name, cheap to build, which matters at hundreds of
thousands of messages a second; every field immutable too, so it can be hashed): keeping it after
the handler returned is safe, and it holds no Kafka handle.
"""

from __future__ import annotations

from typing import NamedTuple


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    #: (name, value) pairs in the message's order; () when it has none.
    headers: tuple[tuple[str, bytes | None], ...]
    #: (type, milliseconds since the epoch); type 0 = not available, 1 = create time, 2 = log append.
    timestamp: tuple[int, int]

    @property
    def coordinates(self) -> str:
        """``topic[partition]@offset``, the form ksup's logs use."""
        return f"{self.topic}[{self.partition}]@{self.offset}"


# The handler Protocols, importable from here too (``from supervisor.record import Record,
# MessageHandler``). Imported last: handler_types itself imports Record from this module.
from supervisor.handler_types import (  # noqa: E402
    AsyncBatchClassHandler,
    AsyncBatchHandler,
    AsyncClassHandler,
    AsyncMessageHandler,
    BatchClassHandler,
    BatchHandler,
    ClassHandler,
    HandlerHooks,
    MessageHandler,
    TopicPartition,
)

__all__ = ["Record", "AsyncBatchClassHandler", "AsyncBatchHandler", "AsyncClassHandler", "AsyncMessageHandler",
           "BatchClassHandler", "BatchHandler", "ClassHandler", "HandlerHooks", "MessageHandler", "TopicPartition"]
