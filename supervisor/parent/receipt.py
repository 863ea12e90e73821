"""The shutdown receipt (parent side): per partition, the last offset a handler finished and
the committed offset read back from the broker, merged from every worker's ``Exiting``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.contract import messages as m


@dataclass
class Receipt:
    partitions: dict[str, dict[str, int]] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)

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

    def as_dict(self, exit_code: int, reason: str) -> dict[str, Any]:
        return {"exit_code": exit_code, "reason": reason, "at": time.time(),
                "partitions": dict(sorted(self.partitions.items())), "workers": self.workers}

    def write(self, path: str, exit_code: int, reason: str) -> None:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(self.as_dict(exit_code, reason), indent=2) + "\n")
        tmp.replace(path)
