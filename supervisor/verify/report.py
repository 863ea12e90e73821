"""The outcome of a ``ksup verify`` run, its verdict, and how it is shown (text or JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    produced: int = 0
    processed: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicates_by_fault: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)  # scheduled kinds in order, then "exception xN", "hang xN"
    fault_counts: dict[str, int] = field(default_factory=dict)  # kind -> how many happened
    committed_ok: bool = False
    committed_mismatch: dict[str, list[int]] = field(default_factory=dict)
    longest_gap_s: float = 0.0
    seconds: float = 0.0
    topic: str = ""
    files: str = ""
    interrupted: str = ""  # the signal that ended the run early: no verdict, what was seen so far
    max_gap_s: float = 10.0
    gap_by_fault: dict[str, float] = field(default_factory=dict)  # longest gap that began after each kind
    not_ready_after: list[str] = field(default_factory=list)  # faults after which ksup was not ready in time

    @property
    def ok(self) -> bool:
        """The verdict: nothing lost, every committed offset where processing ended, and no
        partition waited longer than --max-gap for a consumer."""
        return self.lost == 0 and self.committed_ok and not self.interrupted and self.longest_gap_s <= self.max_gap_s

    def by_fault(self) -> dict[str, dict[str, Any]]:
        """Per fault kind: how many happened, the duplicates that followed, the longest gap after."""
        kinds = list(self.fault_counts) + [k for k in {**self.duplicates_by_fault, **self.gap_by_fault}
                                            if k not in self.fault_counts]
        return {k: {"count": self.fault_counts.get(k, 0), "duplicates": self.duplicates_by_fault.get(k, 0),
                    "longest_gap_s": self.gap_by_fault.get(k, 0.0)} for k in kinds}

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "by_fault": self.by_fault(), "ok": self.ok}


def report(outcome: Outcome) -> str:
    lines = [
        f"topic           {outcome.topic}",
        f"produced        {outcome.produced}",
        f"processed       {outcome.processed}",
        f"lost            {outcome.lost}" + ("" if outcome.lost == 0 else "   <-- MESSAGES LOST"),
        f"duplicates      {outcome.duplicates}",
        "committed       " + ("= processed + 1 on every partition" if outcome.committed_ok
                             else f"MISMATCH {outcome.committed_mismatch}"),
        f"longest gap     {outcome.longest_gap_s} s without a consumer on a partition with messages waiting"
        + (f"   <-- ABOVE --max-gap {outcome.max_gap_s:g} s" if outcome.longest_gap_s > outcome.max_gap_s else ""),
        "",
        f"{'fault':<18}{'count':>6}{'duplicates':>12}{'longest gap after':>19}",
    ]
    for kind, row in outcome.by_fault().items():
        lines.append(f"{kind:<18}{row['count']:>6}{row['duplicates']:>12}{row['longest_gap_s']:>17.3f} s")
    if outcome.not_ready_after:
        lines.append(f"not ready again in time after: {', '.join(outcome.not_ready_after)}")
    lines += [
        "",
        f"took            {outcome.seconds} s",
        "result          " + ("OK: nothing lost" if outcome.ok else
                                 f"INTERRUPTED ({outcome.interrupted}): no verdict; lost so far {outcome.lost}"
                                 if outcome.interrupted else "FAILED"),
    ]
    return "\n".join(lines)


def as_json(outcome: Outcome) -> str:
    return json.dumps(outcome.as_dict(), indent=2)
