"""The group coordinator's view of a group (AdminClient describe_consumer_groups), asked from a
helper process of its own.

Why a process: while brokers restart, librdkafka's admin client can abort the whole process
(``rdkafka_queue.h: rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0'
failed``, librdkafka issue 4605, seen here during a broker roll); in the test process that
took pytest down and orphaned the cluster. The helper answers one JSON line per request; if it
dies it is started again and that one answer is an error. It makes a new admin client for each
request: a long-lived client, once a node had been down, either kept asking a node that no
longer coordinated the group (NOT_COORDINATOR) or timed out on every describe, for minutes.

Run as ``python -m tests.cluster.brokerview BOOTSTRAP`` (by BrokerView only)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.harness import REPO


class BrokerView:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.proc: subprocess.Popen[str] | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "tests.cluster.brokerview", self.bootstrap], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def describe(self, group: str) -> dict[str, Any]:
        """{"state": "STABLE", "members": {instance id or member id: [partition names]}} or
        {"error": "..."}."""
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(group + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            return {"error": f"broker view helper: {exc}"}
        if not line:
            return {"error": f"broker view helper died ({self.proc.wait()})"}
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _serve(bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient

    for line in sys.stdin:
        group = line.strip()
        # A new client per request: a long-lived one never answered again once a node had
        # been down (every describe timed out, also after the node was back), while a new
        # client answered at once (measured here on Kafka 4.3.1, confluent-kafka 2.16.1).
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
            answer: dict[str, Any] = {
                "state": desc.state.name,
                "members": {(m.group_instance_id or m.member_id): sorted(
                    f"{tp.topic}[{tp.partition}]" for tp in (m.assignment.topic_partitions if m.assignment else []))
                    for m in desc.members}}
        except Exception as exc:
            answer = {"error": str(exc)}
        del admin
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1])
