"""The README's cluster table from the suite's results (one JSON line per scenario, written by
tests/cluster/conftest.py): the last result of every test, in the order they ran.

    python -m tests.cluster.results [bench-results/cluster.jsonl]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DEFAULT = Path(__file__).resolve().parents[2] / "bench-results" / "cluster.jsonl"


def _rebalances(r: dict[str, Any]) -> str:
    for key, label in (("rebalances", "{} callbacks"), ("revocations_of_live", "{} revocations of live members"),
                       ("revocations_of_others", "{} revocations of others")):
        if key in r:
            return label.format(r[key])
    return ""


def _notes(r: dict[str, Any]) -> str:
    notes = []
    if "bounces" in r:
        notes.append(f"bounces: {r['bounces']}")
    if "takeover_s" in r:
        notes.append(f"partition taken over after {r['takeover_s']} s")
    if "resumed_s" in r:
        notes.append(f"every partition consumed again {r['resumed_s']} s after")
    if "exit_codes" in r:
        notes.append("exit codes " + "/".join(str(c) for c in r["exit_codes"].values()))
    if "longest_slot_gap_s" in r:
        notes.append(f"longest slot gap in the roll {r['longest_slot_gap_s']} s")
    if "membership" in r:
        notes.append(r["membership"])
    return "; ".join(notes)


def table(lines: list[dict[str, Any]]) -> str:
    last: dict[str, dict[str, Any]] = {}
    for r in lines:
        if r.get("kind") == "scenario":
            last.pop(r["test"], None)
            last[r["test"]] = r
    rows = ["| scenario | protocol | Kafka | result | messages | duplicates | longest gap | rebalances | s | notes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in last.values():
        gap = f"{r['longest_gap_s']:.2f} s" if "longest_gap_s" in r else ""
        rows.append(f"| `{r['test'].split('[')[0].removeprefix('test_')}` {_variant(r['test'])} | "
                    f"{r.get('protocol', '')} | {r.get('kafka', '')} | {r['outcome']} | {r.get('messages', '')} | "
                    f"{r.get('duplicates', '')} | {gap} | {_rebalances(r)} | {r['seconds']:.0f} | {_notes(r)} |")
    clusters = [r for r in lines if r.get("kind") == "cluster"]
    footer = [f"cluster {c['version']}: started in {c['start_s']} s, RSS "
              + ", ".join(f"node {n} {m} MiB" for n, m in c["rss_mib"].items()) for c in clusters[-2:]]
    total = sum(r["seconds"] for r in last.values())
    return "\n".join(rows + ["", *footer, f"scenarios: {len(last)}, {total / 60:.1f} min of test time"])


def _variant(test: str) -> str:
    if "[" not in test:
        return ""
    params = [p for p in test.split("[", 1)[1].rstrip("]").split("-") if p not in ("classic", "consumer")]
    return " ".join(params)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(table(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
