"""The in-flight board: a small shared file in which each handler thread of a worker writes the
message it is working on *before* calling the handler, so that when a worker dies (segfault,
OOM kill, os._exit) the supervisor knows exactly which messages were in flight, without a pipe
message per message. One fixed-size record per handler thread; the writer is the worker, the
reader the supervisor after the worker has exited.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Callable

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

    def set(self, thread: int, topic: str, partition: int, offset: int) -> None:
        base = thread * RECORD
        written = self._names[thread]
        if written is None or written[0] != topic:
            name = topic.encode()[:_TOPIC_MAX]
            self._map[base + _HEAD.size: base + _HEAD.size + len(name)] = name
            written = self._names[thread] = (topic, len(name))
        _HEAD.pack_into(self._map, base, 1, partition, offset, written[1])

    def offset_writer(self, thread: int, topic: str, partition: int, offset: int) -> Callable[[int], None]:
        """``set`` once, then a callable that writes only the offset (for a run of messages of
        one partition: called for every message, so it does nothing else)."""
        self.set(thread, topic, partition, offset)
        return functools.partial(_OFFSET.pack_into, self._map, thread * RECORD + _OFFSET_AT)

    def clear(self, thread: int) -> None:
        self._map[thread * RECORD] = 0


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
