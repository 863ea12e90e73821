"""Figures from the benchmark results (matplotlib, PNG): throughput against workers, ksup against
its peers, and each partition's gap between processed messages around a rolling reload, one
panel per way of replacing the workers.

    python -m tests.bench.plot [--results bench-results] [--out bench-results]

Reads ``throughput.json``, ``peers.json`` and ``reload.json`` written by ``make bench``; a missing file skips
its figure. Needs the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LABELS = {"static": "ksup reload, static membership", "dynamic": "ksup reload, dynamic (cooperative)",
          "naive": "stop all, start all (dynamic)", "naive-static": "stop all, start all (static)"}


def throughput_figure(results: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    workers = sorted(results["scaling"], key=int)
    rates = [results["scaling"][w] for w in workers]
    left.bar(workers, rates, color="#4c72b0")
    for x, y in zip(workers, rates, strict=True):
        left.annotate(f"{y:,}", (x, y), ha="center", va="bottom", fontsize=9)
    left.set_xlabel("workers (8 partitions, handler sleeps 1 ms)")
    left.set_ylabel("messages per second")
    left.set_title(f"Scaling ({results.get('machine', '')})")
    names = ["plain poll loop", "ksup, per message", "plain consume(500)", "ksup, batch handler"]
    keys = ["plain_per_message", "ksup_per_message", "plain_batch", "ksup_batch"]
    values = [results[k] for k in keys]
    right.barh(names, values, color=["#999999", "#4c72b0", "#999999", "#4c72b0"])
    for y, v in enumerate(values):
        right.annotate(f"{v:,}", (v, y), va="center", fontsize=9)
    right.invert_yaxis()
    right.set_xlabel("messages per second (1 worker, no-op handler)")
    right.set_title(f"Overhead, {results['messages']:,} messages")
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def peers_figure(results: dict[str, Any], out: Path) -> Path:
    """Each contender's rate as a ratio against the plain poll loop of the same round (every
    round a dot, the median a bar)."""
    import matplotlib.pyplot as plt

    names = list(results["summary"])
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) + 1.4))
    medians = [results["summary"][n]["median_ratio"] for n in names]
    colors = ["#999999" if n.startswith("plain") else "#4c72b0" if n.startswith("ksup") else "#dd8452"
              for n in names]
    ax.barh(names, medians, color=colors)
    for y, n in enumerate(names):
        ratios = results["summary"][n]["ratios"]
        ax.plot(ratios, [y] * len(ratios), "k.", markersize=5)
        ax.annotate(f"{medians[y]:.2f}x (librdkafka {results['summary'][n]['librdkafka']})",
                    (max(ratios + [medians[y]]), y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.axvline(1.0, color="#555555", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(results["summary"][n]["ratios"]) for n in names) * 1.55)
    ax.set_xlabel(f"messages per second against the plain poll loop of the same round\n"
                  f"({results['messages']:,} messages, no-op handlers; bars: median, dots: rounds)")
    ax.set_title("ksup and its peers (rounds alternating, one broker, one topic)")
    fig.tight_layout()
    path = out / "peers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def reload_figure(results: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.2 * len(results)), sharex=True, sharey=True)
    for ax, r in zip(axes, results, strict=True):
        for partition, points in sorted(r.get("gaps", {}).items(), key=lambda kv: int(kv[0])):
            xs, ys = zip(*points, strict=True) if points else ((), ())
            ax.plot(xs, ys, linewidth=0.8, label=f"p{partition}")
        ax.axvspan(0, r["change_s"], color="#dddddd", zorder=0)
        ax.set_title(f"{LABELS.get(r['mode'], r['mode'])}: longest gap {r['max_partition_gap_s']} s, "
                     f"{r['duplicates']} duplicates, {r['lost']} lost", fontsize=9)
        ax.set_ylabel("gap (s)")
    axes[-1].set_xlabel("seconds since the change began (grey: change in progress)")
    axes[0].legend(ncol=8, fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out / "reload-gaps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default="bench-results")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results, out = Path(args.results), Path(args.out or args.results)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    made = []
    if (results / "throughput.json").exists():
        made.append(throughput_figure(json.loads((results / "throughput.json").read_text()), out))
    if (results / "peers.json").exists():
        made.append(peers_figure(json.loads((results / "peers.json").read_text()), out))
    if (results / "reload.json").exists():
        made.append(reload_figure(json.loads((results / "reload.json").read_text()), out))
    for path in made:
        print(path)
    if not made:
        print(f"no results in {results} (run make bench first)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
