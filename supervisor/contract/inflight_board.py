"""The in-flight board: a small shared file in which each handler thread of a worker writes the
message it is working on *before* calling the handler, so that when a worker dies (segfault,
OOM kill, os._exit) the supervisor knows exactly which messages were in flight, without a pipe
message per message. One fixed-size record per handler thread; the writer is the worker, the
reader the supervisor after the worker has exited. A batch (one handler thread) uses as many
records as it needs: one per run of consecutive offsets of a partition, marked as a range
(``RANGE``, with the count in the record's last four bytes), so writing it costs nothing per
message; the reader expands a range into its offsets.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from supervisor.record import Record

RECORD = 256
_HEAD = struct.Struct("<BiqH")  # in use, partition, offset, topic length
_OFFSET = struct.Struct("<q")   # the offset field alone, at byte 5 of a record
_OFFSET_AT = 5
_COUNT = struct.Struct("<I")    # a range's number of offsets, in the record's last bytes
_COUNT_AT = RECORD - _COUNT.size
_TOPIC_MAX = _COUNT_AT - _HEAD.size
ONE, RANGE = 1, 2               # the "in use" byte: one offset, or a range from it


@lru_cache(maxsize=1024)
def board_topic(topic: str) -> str:
    """A topic's name as the board keeps it. A name longer than a record has room for (Kafka
    allows 249 characters, a record 237 bytes) is kept as its first 220 bytes, "#" (never part of a
    topic name) and 16 hex digits of a hash of the whole name: cut names of two topics that differ
    only at their end stay apart."""
    name = topic.encode()
    if len(name) <= _TOPIC_MAX:
        return topic
    digest = hashlib.blake2b(name, digest_size=8).hexdigest()
    return name[:_TOPIC_MAX - len(digest) - 1].decode(errors="replace") + "#" + digest


def key_of(record: Record) -> tuple[str, int, int]:
    """(topic, partition, offset) as ``read`` gives it back for this record. The supervisor names
    poison and suspect messages from the board, so a worker must match its records by this key
    (a plain (topic, partition, offset) never matched a message of a topic with a longer name,
    and such a poison message killed every worker)."""
    return board_topic(record.topic), record.partition, record.offset


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
            name = board_topic(topic).encode()
            self._map[base + _HEAD.size: base + _HEAD.size + len(name)] = name
            written = self._names[thread] = (topic, len(name))
        _HEAD.pack_into(self._map, base, ONE, partition, offset, written[1])

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

    def set_batch(self, runs: Sequence[Sequence[Record]]) -> int:
        """A batch, given as runs of records of one partition each, from board record 0 on: a
        run of consecutive offsets takes one record (a range), any other record one of its own.
        Returns how many board records it took (for ``clear_many``)."""
        used = 0
        for run in runs:
            first, last = run[0], run[-1]
            if last.offset - first.offset + 1 == len(run):
                self.set(used, first.topic, first.partition, first.offset)
                if len(run) > 1:
                    self._map[used * RECORD] = RANGE
                    _COUNT.pack_into(self._map, used * RECORD + _COUNT_AT, len(run))
                used += 1
            else:  # offsets with gaps (a compacted topic, transaction markers): one record each
                for r in run:
                    self.set(used, r.topic, r.partition, r.offset)
                    used += 1
        return used

    def clear(self, thread: int) -> None:
        self._map[thread * RECORD] = 0

    def clear_many(self, count: int) -> None:
        """Board records 0 .. count-1 (a batch's) no longer in use (one write)."""
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
            topic = data[base + _HEAD.size: base + _HEAD.size + n].decode(errors="replace")
            count = _COUNT.unpack_from(data, base + _COUNT_AT)[0] if used == RANGE else 1
            out += [(topic, partition, o) for o in range(offset, offset + count)]
    return out
