"""A fleet on the 3-node cluster: three ksup instances ("hosts": their own --instance-id-prefix
and control socket) in one group, upgraded one after another by examples/rolling-upgrade.sh in
fleet mode (its targets: the three control sockets) while messages flow. Judged by the
handler's witness (messages and rebalance callbacks) and the broker.

(tests/test_fleet.py drives the script's fleet mode on the single broker too, with 2 hosts, no
load during the roll and no revocation count; its 3-host roll under load uses `ksup reload
--wait` per host.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import REPO
from tests.wheels import write_wheel

pytestmark = [pytest.mark.cluster, pytest.mark.kafka, pytest.mark.timeout(900)]

PACKAGE = "ksup-cluster-handler"
MODULE = "ksup_cluster_handler"
CODE = '''"""Release {version} of a handler package: the witness handler of the cluster tests."""
from tests.handlers.rebalances import Witness

__version__ = "{version}"


class Handler(Witness):
    pass
'''


def _wheel(folder: Path, version: str) -> None:
    """A minimal wheel of the package (no build step, no index needed)."""
    write_wheel(folder, MODULE, PACKAGE, version, CODE.format(version=version))


@pytest.fixture
def releases(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Releases 1.0 and 2.0 as wheels in a folder pip may use (no index); 1.0 installed in this
    venv (which is the VENV the script upgrades), uninstalled at the end."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("1.0", "2.0"):
        _wheel(wheels, version)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{PACKAGE}==1.0"], env=env, check=True,
                   timeout=120)
    try:
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", PACKAGE], env=env, timeout=120)


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_fleet_rolled_by_the_upgrade_script(cluster, new_fleet, scenario, releases, protocol):
    """3 hosts x 2 workers, 6 partitions (every member owns one), 150 msg/s throughout, the
    script rolls host after host onto release 2.0. Every host's roll exits 0 with its per-slot
    report; no member other than the one being replaced is ever revoked (each old worker's only
    callback after the group settled is its own final revoke, each new worker's only callback is
    the assignment of its predecessor's partitions); nothing lost, no duplicates; every worker
    runs 2.0; kafka-consumer-groups agrees with `ksup status --json`."""
    scenario.update(protocol=protocol, kafka=cluster.version)
    fleet = new_fleet(cluster, protocol, partitions=6, handler=f"{MODULE}:Handler")
    hosts = [fleet.add_host(workers=2) for _ in range(3)]
    fleet.load.start()
    mark = fleet.wait_settled()
    fleet.wait_progress()
    before = {pid: set(w["partitions"]) for h in hosts for w in h.status()["workers"] for pid in [w["pid"]]}
    slot_of = {w["pid"]: f"{h.name}-{w['slot']}" for h in hosts for w in h.status()["workers"]}
    venv = Path(sys.executable).parent.parent
    fleet.log("rolling-upgrade.sh over the three hosts")
    out = subprocess.run([str(REPO / "examples" / "rolling-upgrade.sh"), str(venv), f"{PACKAGE}==2.0", fleet.group,
                          *(str(h.sock) for h in hosts)], env=releases, capture_output=True, text=True, timeout=600)
    fleet.log("rolled")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rolled 3 ksup instance(s)" in out.stdout, out.stdout

    report = {}
    for h in hosts:
        section = out.stdout.split(f"{h.sock}: installed", 1)[1].split(f"{h.sock}: every worker runs", 1)[0]
        slots = re.findall(r"worker (\d+): pid (\d+) -> (\d+), partitions without a consumer ([\d.]+)s", section)
        assert len(slots) == 2, section
        report[h.name] = [{"slot": int(s), "old": int(a), "new": int(b), "gap_s": float(g)} for s, a, b, g in slots]
        assert f"{h.sock}: every worker runs {PACKAGE} 2.0" in out.stdout
        assert {w["handler_version"] for w in h.status()["workers"]} == {"2.0"}
    print("per-host report:", report)

    fleet.wait_settled()
    fleet.compare_with_group_tool()
    after = {w["pid"]: set(w["partitions"]) for h in hosts for w in h.status()["workers"]}
    new_of = {r["old"]: r["new"] for rows in report.values() for r in rows}
    assert set(new_of) == set(before) and set(new_of.values()) == set(after), (new_of, before, after)
    unexpected = []
    for e in fleet.events()[mark:]:
        names = {f"{fleet.topic}[{p}]" for p in e.partitions}
        if e.pid in before and e.kind == "revoke" and names == before[e.pid]:
            continue  # the old worker's own drain
        if e.pid in after and e.kind == "assign" and names == after[e.pid]:
            continue  # its successor taking the same partitions back
        unexpected.append(e)
    revoked_others = [e for e in unexpected if e.kind == "revoke"]
    scenario.update(revocations_of_others=len(revoked_others), unexpected_callbacks=len(unexpected),
                    per_host={name: [f"{slot_of[r['old']]} {r['old']}->{r['new']} gap {r['gap_s']}s" for r in rows]
                              for name, rows in report.items()},
                    longest_slot_gap_s=max(r["gap_s"] for rows in report.values() for r in rows))
    assert unexpected == [], f"callbacks of members not being replaced: {unexpected}"
    for old, new in new_of.items():
        assert after[new] == before[old], f"{slot_of[old]}: {before[old]} before, {after[new]} after"

    codes = fleet.stop_all()
    assert all(c == 0 for c in codes.values()), codes
    fleet.load.finish()
    scenario.update(fleet.verdict(clean=True), longest_gap_s=round(fleet.longest_gap(), 3))
    assert scenario["duplicates"] == 0
