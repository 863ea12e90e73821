"""FairFetch: which partitions a worker stops fetching, so that every partition with waiting
messages reaches the handler under a backlog (child side; sans-I/O: the consumer loop reads the
inputs, applies the answer with pause/resume, and serves this on its own thread).

Why: librdkafka hands fetched messages over in fetch order, each partition's whole fetch (up to
``max.partition.fetch.bytes``, 1 MiB) at a time. With small messages and a slow handler, one
partition's fetch fills the worker's backlog (``MAX_BACKLOG``), and the other partitions wait
behind it in librdkafka's queue, however fairly the handler threads share what is in the backlog
(hostile testing: 4 partitions x 5,000 waiting messages, a 2 ms handler: one partition only for
the first 6 s). Pausing a partition makes librdkafka drop what it had fetched for it, and a
resume fetches again from the next offset the worker has not taken (checked on a real broker:
tests/test_fetch_pauses.py). So the partitions behind it come next, and nothing is skipped or
taken twice.

The rule, evaluated every ``CHECK_S`` by the consumer loop:
- it watches while the backlog, with the runs handler threads took, is at least half full
  (``WATCH_FROM``) or something is held;
- it acts once a partition has starved ``STARVE_S`` without a break (the starve gate), or,
  sooner, while the backlog is full and holds at least ``MIN_WORK_S`` of handler work (the
  work gate: its messages over the rate the handler finished messages at, over the last
  second; half of it keeps the partitions already held). Each pause costs the paused
  partition's prefetched messages, fetched again on resume, and that fetch can wait behind
  another in flight (up to ``fetch.wait.max.ms``, 500 ms by default): pausing at every check
  made runs with a 50 us handler 2-4x slower (a hostile review of the first rule). The work
  gate alone never acted for a handler under about 1 ms or for several handler threads
  (the backlog looks quick to clear), yet how long a partition waits is set by what
  librdkafka prefetched ahead of it, not by this backlog: 6-8 s in a second review. The starve
  gate bounds that wait near STARVE_S, and pauses only for a partition that starved that long
  (README, "Fair under a backlog": run times within noise of no rule at all). Under
  read_committed (librdkafka's default) it fires only for a partition whose last stable offset
  the statistics gave (an open transaction looks like waiting otherwise, for as long as it is
  open: a hostile review measured 25% longer runs); without statistics it never fires;
- a partition *starves* when it is owned, not paused, has nothing in the backlog, and messages
  wait for it (``messages_wait``);
- while a gate acts, the backlog is full (or a partition starved STARVE_S) and a partition
  starves, every partition that holds at least its share of the backlog (``share``:
  MAX_BACKLOG over the partitions owned) is *held*: paused;
- a held partition is released (resumed) once it holds less than half its share, so it is
  fetched again before its last messages are handled, or when it is no longer owned; whether a
  gate is still open or not (closed, it only holds nothing new);
- while a partition starves, the loop may fetch past MAX_BACKLOG one share at a time, up to
  ``OVERFLOW`` x MAX_BACKLOG: the starving partition's messages need room, and the backlog
  stays bounded whatever the number of partitions.

A partition is paused while either this or a retry backoff wants it paused (``wanted_paused``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

TP = tuple[str, int]

CHECK_S = 0.05     # how often the consumer loop looks (a few local librdkafka calls)
MIN_WORK_S = 1.0   # ... and acts while the backlog holds this much handler work (half of it
                   # keeps what is held),
STARVE_S = 1.0     # ... or once a partition has starved this long, whatever the handler's speed
WATCH_FROM = 2     # starving is watched for while the backlog holds MAX_BACKLOG / this or more
RATE_WINDOW_S = 1.0  # the handler's rate is measured over this long
MIN_SHARE = 10     # a share never below this many messages, however many partitions are owned
OVERFLOW = 2       # while a partition starves, the backlog may grow to this many MAX_BACKLOGs


def messages_wait(next_offset: int, committed: int, low: int, high: int, from_latest: bool = False) -> bool:
    """Whether messages of a partition wait to be taken: ``next_offset`` is the next offset the
    worker would take (librdkafka's position; negative before the worker took any of this
    assignment), ``committed`` the group's committed offset as the worker knows it (negative if
    unknown), ``low`` and ``high`` the watermarks as librdkafka last saw them (negative before
    its first fetch answer for the partition: then none of its messages can be queued behind
    another's). Without a position or a committed offset, the partition starts where
    ``auto.offset.reset`` says: the low watermark, or the high one ``from_latest``; so an empty
    partition never waits. Under read_committed the loop passes the last stable offset as
    ``high``: an open transaction holds the position below the high watermark, and nothing waits
    there until it commits."""
    if high < 0:
        return False
    if next_offset >= 0:
        start = next_offset
    elif committed >= 0:
        start = committed
    else:
        start = high if from_latest else max(low, 0)
    return start < high


@dataclass
class FairFetch:
    """The held partitions, and the last check's starving ones. ``update`` is the whole rule."""

    max_backlog: int
    held: set[TP] = field(default_factory=set)
    starving: set[TP] = field(default_factory=set)
    since: dict[TP, float] = field(default_factory=dict)  # starving without a break since (monotonic)

    def watching(self, backlog: int) -> bool:
        """Whether starving partitions are looked for: something is held, or ``backlog`` (the
        messages queued or in a handler, runs handler threads took included) is at least half
        the limit (below that the handler keeps up with what librdkafka hands over, so nobody's
        messages wait behind another partition's)."""
        return bool(self.held) or backlog >= self.max_backlog // WATCH_FROM

    def starved_long(self, starving: Collection[TP], now: float, unsure: Collection[TP] = ()) -> bool:
        """Note the partitions starving at this check (the others' spell ends); True when one
        has starved for STARVE_S or more without a break and is not ``unsure`` (it may not be
        waiting at all: read_committed before its last stable offset is known; its spell counts
        meanwhile, so a partition that does wait is not kept waiting for that)."""
        self.since = {tp: self.since.get(tp, now) for tp in starving}
        return any(now - t >= STARVE_S for tp, t in self.since.items() if tp not in unsure)

    def worth_it(self, work_s: float) -> bool:
        """Whether pausing pays with ``work_s`` seconds of handler work in the backlog: at least
        MIN_WORK_S, or half of it to keep what is held (no pausing and resuming on every wobble
        of the measured rate)."""
        return work_s >= MIN_WORK_S / (2 if self.held else 1)

    def clear(self, keep_since: bool = False) -> None:
        """Nothing held, nobody starving (the rule does not act now); ``keep_since``: the
        starving spells go on (they are being watched)."""
        self.held, self.starving = set(), set()
        if not keep_since:
            self.since = {}

    def share(self, owned: int) -> int:
        """The messages of the backlog one partition may hold while another starves."""
        return max(MIN_SHARE, self.max_backlog // max(owned, 1))

    def update(self, owned: Collection[TP], queued: Mapping[TP, int], starving: Collection[TP],
               backlog: int, acts: bool = True, starved_long: bool = False) -> set[TP]:
        """One check. ``queued``: messages in the backlog (queued or in a handler) per
        partition; ``starving``: owned partitions, not paused, with nothing queued and messages
        waiting; ``backlog``: the backlog's size as the fetch limit counts it; ``acts``: a gate
        is open, so partitions may be newly held (those held already are kept while they hold
        half a share, gate or not: released at once, they would be fetched again for a single
        fetch of the starving one); ``starved_long``: one starved STARVE_S (then a backlog not
        quite full does not keep it waiting). Returns the partitions to hold (a new set)."""
        share = self.share(len(owned))
        self.starving = {tp for tp in starving if tp in owned and not queued.get(tp)}
        held = {tp for tp in self.held if tp in owned and queued.get(tp, 0) >= share // 2}
        if acts and self.starving and (backlog >= self.max_backlog or starved_long):
            held |= {tp for tp, n in queued.items() if n >= share and tp in owned}
        self.held = held
        return held

    def overflow_limit(self, owned: int, backlog: int) -> int:
        """How many messages the loop may fetch with the backlog full (0: none): one share while
        a partition starves, until the backlog reaches OVERFLOW x MAX_BACKLOG."""
        if not self.starving or backlog >= OVERFLOW * self.max_backlog:
            return 0
        return min(self.share(owned), OVERFLOW * self.max_backlog - backlog)

    def forget(self, tps: Collection[TP]) -> None:
        """Partitions revoked or lost: neither held nor starving any more."""
        self.held.difference_update(tps)
        self.starving.difference_update(tps)
        for tp in tps:
            self.since.pop(tp, None)


def wanted_paused(held: set[TP], backing_off: set[TP], owned: Collection[TP]) -> set[TP]:
    """The owned partitions to keep paused: held for fairness or waiting out a retry backoff."""
    return {tp for tp in held | backing_off if tp in owned}
