"""Protocols a handler can be type-checked against (part of ksup's public API; the package ships
``py.typed``). ksup itself does not require them at run time: it checks the shape when the worker
boots. They document, for a type checker, every shape ksup runs:

===========================  =========================================================================
``MessageHandler``           ``def process(record: Record) -> None``, one message per call
``AsyncMessageHandler``      ``async def process(record: Record) -> None``, run on the handler thread's
                             event loop
``BatchHandler``             ``def process(records: list[Record]) -> None``, with ``--batch-size N``
``AsyncBatchHandler``        ``async def process(records: list[Record]) -> None``, with ``--batch-size N``
``ClassHandler``             a class (``handler:Billing``) created once per worker, with
                             ``process(record)``; ``AsyncClassHandler`` / ``BatchClassHandler`` /
                             ``AsyncBatchClassHandler`` for the other forms of ``process``
``HandlerHooks``             the class form's optional hooks, all four: ``setup()`` (before the worker
                             reports loaded: raising is a boot failure), ``teardown()`` (after the
                             drain), ``on_assign(partitions)`` / ``on_revoke(partitions)`` (on the
                             consumer thread, lists of ``(topic, partition)``: keep them short)
===========================  =========================================================================

A handler returns nothing: raising refuses the message (its offset is not stored, ``--on-error``
decides what follows). Generator functions (``yield`` in the body, sync or async) are refused at
boot: their body would never run. Use them as annotations, for example::

    from supervisor.handler_types import MessageHandler
    from supervisor.record import Record

    def process(record: Record) -> None: ...

    _checked: MessageHandler = process   # mypy reports a shape ksup does not run

A class that implements only some hooks is checked with ``ClassHandler``; one with all four with
a class that inherits from both (``class Checked(ClassHandler, HandlerHooks, Protocol)``).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from supervisor.record import Record

#: ``(topic, partition)``, as given to ``on_assign`` / ``on_revoke``.
TopicPartition = tuple[str, int]

__all__ = [
    "AsyncBatchClassHandler", "AsyncBatchHandler", "AsyncClassHandler", "AsyncMessageHandler",
    "BatchClassHandler", "BatchHandler", "ClassHandler", "HandlerHooks", "MessageHandler", "TopicPartition",
]


class MessageHandler(Protocol):
    """``def process(record: Record) -> None``."""

    def __call__(self, record: Record, /) -> None: ...


class AsyncMessageHandler(Protocol):
    """``async def process(record: Record) -> None``."""

    def __call__(self, record: Record, /) -> Awaitable[None]: ...


class BatchHandler(Protocol):
    """``def process(records: list[Record]) -> None`` (``--batch-size N``): every offset of the
    batch is stored only after it returns."""

    def __call__(self, records: list[Record], /) -> None: ...


class AsyncBatchHandler(Protocol):
    """``async def process(records: list[Record]) -> None`` (``--batch-size N``)."""

    def __call__(self, records: list[Record], /) -> Awaitable[None]: ...


class ClassHandler(Protocol):
    """An instance of the class form: ``process(record)`` per message."""

    def process(self, record: Record, /) -> None: ...


class AsyncClassHandler(Protocol):
    """An instance of the class form with ``async def process(self, record)``."""

    def process(self, record: Record, /) -> Awaitable[None]: ...


class BatchClassHandler(Protocol):
    """An instance of the class form with ``process(self, records)`` (``--batch-size N``)."""

    def process(self, records: list[Record], /) -> None: ...


class AsyncBatchClassHandler(Protocol):
    """An instance of the class form with ``async def process(self, records)`` (``--batch-size N``)."""

    def process(self, records: list[Record], /) -> Awaitable[None]: ...


class HandlerHooks(Protocol):
    """The class form's optional hooks (each one may be left out; this Protocol checks a class
    that has all four)."""

    def setup(self) -> None:
        """Once per worker, before it reports loaded (a rolling reload waits for it); raising
        is a boot failure (exit 3): the worker never joins the group."""

    def teardown(self) -> None:
        """Once, after the drain committed and the consumer closed."""

    def on_assign(self, partitions: list[TopicPartition], /) -> None:
        """Partitions given to this worker (consumer thread: keep it short)."""

    def on_revoke(self, partitions: list[TopicPartition], /) -> None:
        """Partitions taken away, after their finished work was committed; also for lost
        partitions, for which nothing is committed (consumer thread)."""
