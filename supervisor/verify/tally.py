"""What the recording handler wrote, read as it grows: an oracle outside ksup.

The record (``partition offset pid create_ms done_ns`` per finished message, see recorder.py)
is read incrementally, so an hour's soak costs a constant amount per message and memory in
proportion to the messages (one byte each, per partition): how often each offset was
processed, the duplicates and the fault each followed, and per partition the longest time a
message waited for a consumer while nothing of that partition was processed, with the fault
that gap began after.
"""

from __future__ import annotations

import bisect
import threading
from pathlib import Path

BEFORE_ANY_FAULT = "before any fault"


class Tally:
    def __init__(self, record: Path) -> None:
        self.record = record
        # verify's loop and its progress thread both read the record (the loop can be busy
        # with a fault for many seconds); one at a time.
        self._lock = threading.Lock()
        self._pos = 0
        self._partial = b""
        self.seen: dict[int, bytearray] = {}  # partition -> times each offset was processed (max 255)
        self.distinct = 0
        self.duplicates = 0
        self.duplicates_by_fault: dict[str, int] = {}
        self.last_done: dict[int, int] = {}  # partition -> latest done_ns so far
        self.longest_gap_s = 0.0
        self.gap_by_fault: dict[str, float] = {}
        self._fault_at: list[int] = []    # wall-clock ns of each fault, in order
        self._fault_kind: list[str] = []

    def fault(self, at_ns: int, kind: str) -> None:
        """A fault began at ``at_ns`` (wall clock): what follows is attributed to it. Message
        faults are learnt of a little late (their marker files), so insertion keeps the order."""
        with self._lock:
            i = bisect.bisect_right(self._fault_at, at_ns)
            self._fault_at.insert(i, at_ns)
            self._fault_kind.insert(i, kind)

    def _cause(self, at_ns: int) -> str:
        i = bisect.bisect_right(self._fault_at, at_ns)
        return self._fault_kind[i - 1] if i else BEFORE_ANY_FAULT

    def poll(self) -> None:
        """Take in what was appended since the last call."""
        with self._lock:
            self._poll()

    def lost_below(self, committed: dict[int, int]) -> int:
        """Offsets the group committed (``committed``: partition -> offset, read before this
        call) that the handler never finished. The record is read first: the handler writes
        its row before returning, so everything under an offset committed before this call is
        in it; a stale read would count work finished since as lost."""
        with self._lock:
            self._poll()
            return sum(self.missing(p, max(c, 0)) for p, c in committed.items())

    def _poll(self) -> None:
        try:
            with open(self.record, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written (O_APPEND: rare)
        for line in lines:
            fields = line.split()
            if len(fields) >= 5:
                self._row(int(fields[0]), int(fields[1]), int(fields[3]), int(fields[4]))

    def _row(self, partition: int, offset: int, created_ms: int, done_ns: int) -> None:
        seen = self.seen.setdefault(partition, bytearray())
        if offset >= len(seen):
            seen.extend(bytes(offset + 1 - len(seen) + 1024))
        if seen[offset]:
            self.duplicates += 1
            cause = self._cause(done_ns)
            self.duplicates_by_fault[cause] = self.duplicates_by_fault.get(cause, 0) + 1
        else:
            self.distinct += 1
        seen[offset] = min(seen[offset] + 1, 255)
        last = self.last_done.get(partition)
        if last is None or done_ns <= last:
            self.last_done[partition] = max(done_ns, last or 0)
            return
        waiting_since = max(last, created_ms * 1_000_000)  # the message was already there
        gap = max(done_ns - waiting_since, 0) / 1e9
        self.longest_gap_s = max(self.longest_gap_s, gap)
        cause = self._cause(waiting_since)
        self.gap_by_fault[cause] = max(self.gap_by_fault.get(cause, 0.0), round(gap, 3))
        self.last_done[partition] = done_ns

    def missing(self, partition: int, below: int) -> int:
        """Offsets under ``below`` of ``partition`` never processed."""
        seen = self.seen.get(partition, bytearray())
        return seen[:below].count(0) + max(below - len(seen), 0)

    def processed_below(self, ends: dict[int, int]) -> int:
        return sum(end - self.missing(p, end) for p, end in ends.items())
