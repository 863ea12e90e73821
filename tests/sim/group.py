"""A consumer group as the broker's coordinator runs it, reduced to what the supervisor's rules
depend on (no I/O, no clock of its own: every call gets ``now``).

- CLASSIC (static members, ``group.instance.id``): a static member that closes sends no
  LeaveGroup; a member whose process died keeps its partitions (unconsumed) until its session
  expires. A new member starts a rebalance, and a rebalance completes only when every member
  rejoined: live members rejoin at once, a dead one only when its instance id comes back or its
  session expires. A static member coming back while the group is stable gets its partitions
  back without a rebalance (KIP-345).
- CONSUMER (KIP-848): no barrier. The coordinator recomputes the assignment on every change; a
  static member that left or died keeps its partitions until its session expires.
- Fencing: a second live process joining with an instance id fences the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class GroupProtocol(Enum):
    CLASSIC = "classic"
    CONSUMER = "consumer"


class Process(Protocol):
    instance: str

    def assigned(self, partitions: list[int], now: float) -> None: ...
    def fenced(self, now: float) -> None: ...


@dataclass
class Member:
    instance: str
    process: Process | None            # None: its process is gone, the session still runs
    expires_at: float | None = None
    assignment: list[int] = field(default_factory=list)
    rejoined: bool = True
    leaving_for_good: bool = False     # its slot was removed (scale down)


class Group:
    def __init__(self, protocol: GroupProtocol, partitions: int, session_timeout: float) -> None:
        self.protocol = protocol
        self.partitions = partitions
        self.session_timeout = session_timeout
        self.members: dict[str, Member] = {}
        self.rebalancing = False
        self.fenced: list[str] = []

    # ---- what members do ------------------------------------------------------------------

    def join(self, process: Process, now: float) -> None:
        member = self.members.get(process.instance)
        if member is not None and member.process is not None and member.process is not process:
            self.fenced.append(process.instance)
            member.process.fenced(now)
        if member is not None:
            member.process, member.expires_at, member.leaving_for_good = process, None, False
            if self.protocol is GroupProtocol.CLASSIC and self.rebalancing:
                member.rejoined = True
                self._maybe_complete(now)
            else:
                process.assigned(list(member.assignment), now)
            return
        self.members[process.instance] = Member(process.instance, process)
        self._change(now)

    def closed(self, process: Process, now: float, for_good: bool = False) -> None:
        """The process closed its consumer: a static member sends no LeaveGroup (classic) or a
        static leave (KIP-848): either way the member and its partitions stay until the session
        expires."""
        self._gone(process, now, for_good)

    def left(self, process: Process, now: float) -> None:
        """A LeaveGroup (unsubscribe before close): the member goes now, the group rebalances."""
        member = self.members.get(process.instance)
        if member is None or member.process is not process:
            return
        del self.members[process.instance]
        self._change(now)

    def died(self, process: Process, now: float) -> None:
        self._gone(process, now, False)

    def _gone(self, process: Process, now: float, for_good: bool) -> None:
        member = self.members.get(process.instance)
        if member is None or member.process is not process:
            return
        member.process, member.expires_at, member.leaving_for_good = None, now + self.session_timeout, for_good

    # ---- the coordinator --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        expired = [i for i, m in self.members.items() if m.process is None and m.expires_at is not None
                   and now >= m.expires_at]
        for instance in expired:
            del self.members[instance]
        if expired:
            self._change(now)
        if self.rebalancing:
            for m in self.members.values():
                if m.process is not None:
                    m.rejoined = True  # live members rejoin at their next heartbeat
            self._maybe_complete(now)

    def _change(self, now: float) -> None:
        if self.protocol is GroupProtocol.CONSUMER:
            self._assign(now)
            return
        self.rebalancing = True
        for m in self.members.values():
            m.rejoined = m.process is not None
        self._maybe_complete(now)

    def _maybe_complete(self, now: float) -> None:
        if all(m.rejoined for m in self.members.values()):
            self.rebalancing = False
            self._assign(now)

    def _assign(self, now: float) -> None:
        members = sorted(self.members.values(), key=lambda m: m.instance)
        if self.protocol is GroupProtocol.CONSUMER:
            # Partitions of a departed static member stay with it until its session expires.
            kept = {p for m in members if m.process is None for p in m.assignment}
            live = [m for m in members if m.process is not None]
            free = [p for p in range(self.partitions) if p not in kept]
            for m in live:
                m.assignment = []
            for n, p in enumerate(free):
                if live:
                    live[n % len(live)].assignment.append(p)
            for m in live:
                assert m.process is not None
                m.process.assigned(list(m.assignment), now)
            return
        for m in members:
            m.assignment = []
        for p in range(self.partitions):
            if members:
                members[p % len(members)].assignment.append(p)
        for m in members:
            if m.process is not None:
                m.process.assigned(list(m.assignment), now)

    # ---- what the test looks at ---------------------------------------------------------------

    def consumer_of(self, partition: int) -> Process | None:
        """The live process consuming ``partition`` now, if any."""
        for m in self.members.values():
            if partition in m.assignment and m.process is not None:
                return m.process
        return None

    def held_by_departed_for_good(self, partition: int, removed: set[str]) -> bool:
        """Held by a member whose process is gone for good (its slot was scaled away): a static
        member keeps its partitions until its session expires, the documented trade-off."""
        return any(partition in m.assignment and m.process is None and (m.leaving_for_good or m.instance in removed)
                   for m in self.members.values())
