"""``ksup status`` rendering (edge): the control socket's status as a table a human can scan."""

from __future__ import annotations

from typing import Any


def _partitions(names: list[str]) -> str:
    """['orders[0]', 'orders[3]'] -> 'orders[0,3]'."""
    by_topic: dict[str, list[str]] = {}
    for name in names:
        topic, _, rest = name.rpartition("[")
        by_topic.setdefault(topic, []).append(rest.rstrip("]"))
    return " ".join(f"{t}[{','.join(ps)}]" for t, ps in by_topic.items()) or "-"


def _committed(committed: dict[str, int]) -> str:
    return " ".join(f"{name.rpartition('[')[2].rstrip(']')}:{off}" for name, off in sorted(committed.items())) or "-"


def render(status: dict[str, Any]) -> str:
    sup = status["supervisor"]
    total_lag = sum(n for w in status["workers"] for n in w.get("lag", {}).values())
    processed = sum(w["processed"] for w in status["workers"])
    lines = [f"ksup pid {sup['pid']} {sup['state']}  group {sup['group']}  topics {','.join(sup['topics'])}  "
             f"handler {sup['handler']}  workers {len(status['workers'])}/{sup['workers_target']}  "
             f"processed {processed}  lag {total_lag}  up {sup['uptime_s']:.0f}s"]
    header = ("SLOT", "PID", "STATE", "PARTITIONS", "IN FLIGHT", "AGE", "PROCESSED", "COMMITTED", "LAG", "RSS",
              "RESTARTS")
    rows = [header]
    for w in status["workers"]:
        f = w["in_flight"]
        rows.append((
            str(w["slot"]), str(w["pid"] or "-"), w["state"], _partitions(w["partitions"]),
            f"{f['topic']}[{f['partition']}]@{f['offset']}" if f else "-",
            f"{f['age_s']:.1f}s" if f else "-",
            str(w["processed"]), _committed(w["committed"]), _committed(w.get("lag", {})),
            f"{w['rss_bytes'] / (1 << 20):.0f}M", str(w["restarts"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)
