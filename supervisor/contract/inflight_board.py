"""The in-flight board: a small shared file in which each handler thread of a worker writes the
message it is working on *before* calling the handler, so that when a worker dies (segfault,
OOM kill, os._exit) the supervisor knows exactly which messages were in flight, without a pipe
message per message. One fixed-size record per handler thread; the writer is the worker, the
reader the supervisor after the worker has exited.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from supervisor.record import Record

RECORD = 256
_HEAD = struct.Struct("<BiqH")  # in use, partition, offset, topic length
_OFFSET = struct.Struct("<q")   # the offset field alone, at byte 5 of a record
_OFFSET_AT = 5
_TOPIC_MAX = RECORD - _HEAD.size


def create(path: str, threads: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * RECORD * max(threads, 1))


class BoardWriter:
    def __init__(self, path: str, threads: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, RECORD * max(threads, 1))
        finally:
            os.close(fd)
        # The topic name each thread's record holds (and its encoded length): called for every
        # message, so the name is written only when it changes.
        self._names: list[tuple[str, int] | None] = [None] * max(threads, 1)
        self._cells: list[OffsetCell | None] = [None] * max(threads, 1)

    def set(self, thread: int, topic: str, partition: int, offset: int) -> None:
        base = thread * RECORD
        written = self._names[thread]
        if written is None or written[0] != topic:
            name = topic.encode()[:_TOPIC_MAX]
            self._map[base + _HEAD.size: base + _HEAD.size + len(name)] = name
            written = self._names[thread] = (topic, len(name))
        _HEAD.pack_into(self._map, base, 1, partition, offset, written[1])

    def offset_cell(self, thread: int, topic: str, partition: int, offset: int) -> OffsetCell:
        """``set`` once, then a cell whose ``[0] = offset`` writes only the offset (for a run of
        messages of one partition: written for every message, so it does nothing else)."""
        self.set(thread, topic, partition, offset)
        cell = self._cells[thread]
        if cell is None:
            at = thread * RECORD + _OFFSET_AT
            # A memoryview item store is the cheapest write Python has (no call); it writes native
            # byte order, so only where that is the board's little-endian one.
            cell = self._cells[thread] = memoryview(self._map)[at: at + _OFFSET.size].cast("q") \
                if sys.byteorder == "little" else _PackedCell(self._map, at)
        return cell

    def set_many(self, records: Sequence[Record]) -> None:
        """A batch: record ``i`` in board record ``i``."""
        for i, r in enumerate(records):
            self.set(i, r.topic, r.partition, r.offset)

    def clear(self, thread: int) -> None:
        self._map[thread * RECORD] = 0

    def clear_many(self, count: int) -> None:
        """Board records 0 .. count-1 (a batch's) no longer in use."""
        self._map[0: count * RECORD: RECORD] = bytes(count)


class OffsetCell(Protocol):
    def __setitem__(self, index: int, offset: int, /) -> None: ...


class _PackedCell:
    """The offset cell on a big-endian machine: packs explicitly."""

    def __init__(self, buf: mmap.mmap, at: int) -> None:
        self._buf, self._at = buf, at

    def __setitem__(self, index: int, offset: int) -> None:
        _OFFSET.pack_into(self._buf, self._at, offset)


def read(path: str) -> list[tuple[str, int, int]]:
    """Every (topic, partition, offset) marked in flight; [] if the board is missing."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    out = []
    for base in range(0, len(data) - RECORD + 1, RECORD):
        used, partition, offset, n = _HEAD.unpack_from(data, base)
        if used:
            out.append((data[base + _HEAD.size: base + _HEAD.size + n].decode(errors="replace"), partition, offset))
    return out
