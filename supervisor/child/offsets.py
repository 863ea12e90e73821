"""OffsetBook: the one place that decides which offsets may be stored (child side).

Rules it enforces:
- an offset is stored only after the handler finished the message (``mark_done``), and only
  the contiguous finished prefix of each partition: with out-of-order completion (concurrency by
  key) the stored offset is that of the first message fetched and not yet finished;
- only for a partition this worker still owns *in the same assignment* it received the message
  in: every assignment of a partition gets a new epoch, and a completion from an older epoch is
  fenced (a late finish after a revoke must not move the committed offset);
- per partition, offsets only move forward.

``in_order``: every partition's messages finish in the order they were fetched (one lane per
partition: the default ``--order-by partition``, and batches). Then the first unfinished is
simply the one after the last finished, and the book keeps no per-message list.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TP = tuple[str, int]


def tp_name(tp: TP) -> str:
    return f"{tp[0]}[{tp[1]}]"


@dataclass
class PartitionBook:
    epoch: int
    last_processed: int = -1
    stored: int = -1      # next offset to consume, as stored (last processed + 1)
    committed: int = -1   # as last confirmed by a commit result
    pending: deque[int] = field(default_factory=deque)  # fetched, not yet finished, in fetch order
    finished: set[int] = field(default_factory=set)     # finished, but behind an unfinished one


@dataclass
class OffsetBook:
    owned: dict[TP, PartitionBook] = field(default_factory=dict)
    # Partitions this worker has had, kept for the receipt after they were revoked.
    history: dict[TP, PartitionBook] = field(default_factory=dict)
    _epoch: int = 0
    _dirty: dict[TP, int] = field(default_factory=dict)
    fenced: int = 0
    in_order: bool = False

    def acquire(self, tps: list[TP]) -> None:
        for tp in tps:
            self._epoch += 1
            book = PartitionBook(self._epoch)
            old = self.history.get(tp)
            if old is not None:
                book.last_processed, book.committed = old.last_processed, old.committed
            self.owned[tp] = book
            self.history[tp] = book

    def release(self, tps: list[TP]) -> None:
        for tp in tps:
            self.owned.pop(tp, None)
            self._dirty.pop(tp, None)

    def epoch_of(self, tp: TP) -> int:
        book = self.owned.get(tp)
        return book.epoch if book else -1

    def track(self, tp: TP, offset: int) -> None:
        """A message of ``tp`` was fetched and handed to the runner (not needed ``in_order``).
        (The consumer loop appends to ``pending`` itself, for speed; this is the same thing.)"""
        if not self.in_order:
            self.owned[tp].pending.append(offset)

    def mark_done(self, tp: TP, offsets: int | list[int], epoch: int) -> bool:
        """Record that the handler finished ``offsets`` (of one partition, all fetched in the
        assignment ``epoch``). False (and counted) when fenced."""
        if isinstance(offsets, int):
            offsets = [offsets]
        book = self.owned.get(tp)
        if book is None or book.epoch != epoch:
            self.fenced += len(offsets)
            return False
        pending, finished = book.pending, book.finished
        last = -1
        n = len(offsets)
        if self.in_order:
            last = offsets[-1]
        elif len(pending) >= n and pending[0] == offsets[0] and pending[n - 1] == offsets[-1]:
            # The common case: the n oldest fetched, in order. (Both are increasing, offsets are
            # among pending, and pending has exactly n values from the first to the last: equal.)
            popleft = pending.popleft
            for _ in range(n):
                popleft()
            last = offsets[-1]
        else:
            for offset in offsets:
                if pending and pending[0] == offset:
                    last = pending.popleft()
                else:
                    finished.add(offset)
        while pending and pending[0] in finished:
            last = pending.popleft()
            finished.discard(last)
        book.last_processed = max(book.last_processed, max(offsets))
        if last >= 0 and last + 1 > book.stored:
            self._dirty[tp] = last + 1
        return True

    def take_dirty(self) -> dict[TP, int]:
        """Offsets (next to consume) to store now; clears the set."""
        dirty, self._dirty = self._dirty, {}
        for tp, nxt in dirty.items():
            self.owned[tp].stored = nxt
        return dirty

    def note_committed(self, tp: TP, offset: int) -> None:
        book = self.history.get(tp)
        if book is not None and offset >= 0:
            book.committed = offset
