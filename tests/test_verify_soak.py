"""The longer ksup verify runs of issue 14 (``make test-soak``, not part of ``make test``): a soak
of 100,000 messages with a fault every second, seeds 1-5, every default fault kind, against the
local broker. Each must prove nothing lost, every committed offset where processing ended, and
no partition without a consumer for longer than --max-gap (10 s). About 1.5 minutes a seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = [pytest.mark.kafka, pytest.mark.soak]

KINDS = {"sigterm", "kill", "supervisor-kill", "reload", "scale", "scale-flap", "exception", "hang", "poison"}


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_soak_100k_messages_faults_every_second(bootstrap, seed):
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "verify", "-b", bootstrap, "--messages", "100000",
         "--fault-interval", "1", "--seed", str(seed), "--json"],
        capture_output=True, text=True, timeout=1200, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(out.stdout) if out.stdout.startswith("{") else {}
    summary = {k: result.get(k) for k in ("lost", "duplicates", "longest_gap_s", "by_fault", "seconds")}
    print(f"seed {seed}: {json.dumps(summary)}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert result["ok"] and result["lost"] == 0 and result["committed_ok"], summary
    assert result["produced"] == result["processed"] == 100000, summary
    assert {k for k, row in result["by_fault"].items() if row["count"]} >= KINDS, result["by_fault"]
