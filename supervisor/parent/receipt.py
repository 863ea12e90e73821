"""The shutdown receipt (parent side): per partition, the last offset a handler finished and
the committed offset read back from the broker, merged from every worker's ``Exiting``.

A worker killed at the deadline sends no ``Exiting``; its partitions still appear, from the last
report it sent (``"from": "last report"``): what it had stored and what the broker had confirmed
then, never more than it had finished."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.contract import messages as m


@dataclass
class Receipt:
    partitions: dict[str, dict[str, int]] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    reported: dict[str, dict[str, int]] = field(default_factory=dict)  # from workers' reports

    def add(self, slot: int, exiting: m.Exiting) -> None:
        # Later receipts (a later owner of the partition) replace earlier ones; a receipt with
        # nothing processed does not hide an earlier one that did.
        for r in exiting.receipt:
            prev = self.partitions.get(r.partition)
            last = max(r.last_processed, prev["last_processed"] if prev else -1)
            committed = r.committed if r.committed >= 0 or prev is None else prev["committed"]
            self.partitions[r.partition] = {"last_processed": last, "committed": committed}
        self.workers.append({"slot": slot, "pid": exiting.pid, "exit_code": exiting.exit_code,
                             "reason": exiting.reason})

    def note_report(self, report: m.Report) -> None:
        """Keep, per partition, the highest stored (finished + 1) and committed offsets any
        worker reported (a report lists stored offsets not yet committed)."""
        for name, stored in report.stored.items():
            entry = self.reported.setdefault(name, {"last_processed": -1, "committed": -1})
            entry["last_processed"] = max(entry["last_processed"], stored - 1)
        for name, committed in report.committed.items():
            entry = self.reported.setdefault(name, {"last_processed": -1, "committed": -1})
            entry["committed"] = max(entry["committed"], committed)
            # Only finished work is ever stored, hence committed: everything before it was done.
            entry["last_processed"] = max(entry["last_processed"], committed - 1)

    def merged(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {name: dict(v) for name, v in self.partitions.items()}
        for name, seen in self.reported.items():
            have = out.get(name)
            if have is None:
                if seen["last_processed"] >= 0 or seen["committed"] >= 0:
                    out[name] = {**seen, "from": "last report"}
            elif seen["last_processed"] > have["last_processed"]:
                # A later owner processed more and was killed before its Exiting.
                out[name] = {"last_processed": seen["last_processed"],
                             "committed": max(seen["committed"], have["committed"]), "from": "last report"}
        return dict(sorted(out.items()))

    def as_dict(self, exit_code: int, reason: str) -> dict[str, Any]:
        return {"exit_code": exit_code, "reason": reason, "at": time.time(),
                "partitions": self.merged(), "workers": self.workers}

    def write(self, path: str, exit_code: int, reason: str) -> None:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(exit_code, reason), indent=2) + "\n")
        tmp.replace(path)


def path_problem(path: str) -> str | None:
    """Why the receipt could not be written at ``path`` when ksup exits, checked at start (a
    run must not end without the receipt it was asked for); None when it can."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        return f"--receipt {path}: the folder {folder} does not exist (create it, or give another path)"
    if not os.access(target if target.exists() else folder, os.W_OK):
        return f"--receipt {path}: not writable by this user (fix its permissions, or give another path)"
    return None
