"""Apache Kafka's own group tool as a second oracle: ``kafka-consumer-groups`` (the class
``org.apache.kafka.tools.consumer.group.ConsumerGroupCommand`` from the Maven artifact
``org.apache.kafka:kafka-tools``, which the broker's runtime classpath lacks), run with plain
``java``. It says what the group coordinator says: the members with their
``group.instance.id`` and assignment, the committed offsets and the lag per partition.

Its output is a whitespace-separated table with a header row; ``-`` stands for "none". Each
call starts a JVM (1.3-4 s on the 2-core test machine), so tests call it at a few chosen
points, never in a polling loop."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from tests.localkafka import ensure_jars

TOOLS_VERSION = "4.3.1"  # served by Maven Central; it also describes groups on Kafka 3.9 brokers
MAIN = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"
JVM = ["-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.net.preferIPv4Stack=true",
       "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn"]

TP = tuple[str, int]


@dataclass(frozen=True)
class Member:
    consumer_id: str
    instance_id: str | None
    client_id: str
    partitions: frozenset[TP]


@dataclass(frozen=True)
class Offsets:
    """One row of ``--describe``: a partition's committed offset, log end, lag and owner."""

    committed: int | None
    log_end: int | None
    lag: int | None
    consumer_id: str | None


@dataclass(frozen=True)
class GroupState:
    coordinator: int
    state: str
    members: int


def run_tool(bootstrap: str, *args: str, timeout: float = 90) -> str:
    libs = ensure_jars(TOOLS_VERSION, "kafka-tools")
    out = subprocess.run(["java", *JVM, "-cp", f"{libs}/*", MAIN, "--bootstrap-server", bootstrap, *args],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"kafka-consumer-groups {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


def _table(text: str) -> list[dict[str, str | None]]:
    lines = [line for line in text.splitlines() if line.strip()]
    header = next((i for i, line in enumerate(lines) if line.startswith("GROUP ")), None)
    if header is None:  # "Consumer group 'g' has no active members." and the like
        return []
    names = lines[header].split()
    rows = []
    for line in lines[header + 1:]:
        cells = line.split()
        if len(cells) != len(names):
            raise ValueError(f"cannot read this row of kafka-consumer-groups: {line!r} (columns {names})")
        rows.append({n: (None if c == "-" else c) for n, c in zip(names, cells, strict=True)})
    return rows


def _assignment(cell: str | None) -> frozenset[TP]:
    """``t1:0,2;t2:1`` -> {(t1, 0), (t1, 2), (t2, 1)}."""
    if not cell:
        return frozenset()
    out = set()
    for part in cell.split(";"):
        topic, _, nums = part.rpartition(":")
        out |= {(topic, int(n)) for n in nums.split(",") if n}
    return frozenset(out)


def _int(cell: str | None) -> int | None:
    return None if cell is None else int(cell)


def members(bootstrap: str, group: str) -> list[Member]:
    rows = _table(run_tool(bootstrap, "--describe", "--group", group, "--members", "--verbose"))
    # The GROUP-INSTANCE-ID column is there only when some member has one (static membership).
    return [Member(str(r["CONSUMER-ID"]), r.get("GROUP-INSTANCE-ID"), str(r["CLIENT-ID"]),
                   _assignment(r.get("CURRENT-ASSIGNMENT", r.get("ASSIGNMENT")))) for r in rows]


def offsets(bootstrap: str, group: str) -> dict[TP, Offsets]:
    rows = _table(run_tool(bootstrap, "--describe", "--group", group, "--offsets"))
    return {(str(r["TOPIC"]), int(str(r["PARTITION"]))): Offsets(
        _int(r["CURRENT-OFFSET"]), _int(r["LOG-END-OFFSET"]), _int(r["LAG"]), r["CONSUMER-ID"]) for r in rows}


def state(bootstrap: str, group: str) -> GroupState:
    text = run_tool(bootstrap, "--describe", "--group", group, "--state")
    # "COORDINATOR (ID)" is one column whose cells read "127.0.0.1:9092  (2)": keep the id.
    text = re.sub(r"\S+:\d+\s+\((\d+)\)", r"\1", text.replace("COORDINATOR (ID)", "COORDINATOR"))
    rows = _table(text)
    if len(rows) != 1:
        raise ValueError(f"cannot read kafka-consumer-groups --state: {text!r}")
    return GroupState(int(str(rows[0]["COORDINATOR"])), str(rows[0]["STATE"]), int(str(rows[0]["#MEMBERS"])))
