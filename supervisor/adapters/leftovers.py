"""Static members a previous ksup of this group left behind for slots it will not bring back.

A slot added by scaling up (``ksup scale``, SIGTTIN) is above the configured ``--workers``: a
restarted ksup does not start it again. When the previous ksup was SIGKILLed (or OOM-killed,
or its host lost power) while such a slot's worker was dead or restarting, nobody sent its
LeaveGroup, and its static member keeps its partitions from everyone until its session expires
(ksup verify's soak: a 46 s gap). At start, ksup asks the broker once for the group's members,
from a short-lived helper process (the supervisor never loads librdkafka), without waiting for
it: the answer (``ev.LeftoverMembers``) names the slots of its own instance-id prefix above
``--workers`` that are still members, and the core starts each once, to rejoin with its
instance id and leave. Best effort: without an answer a ghost member costs its session, as before.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from supervisor.config import Settings, instance_id_prefix
from supervisor.connection import connection_properties

log = logging.getLogger("ksup.supervisor")

ASK_TIMEOUT_S = 5.0


def request(s: Settings) -> dict[str, Any] | None:
    """What the helper needs (its stdin: secrets never go in argv), or None when static
    membership is off (no instance ids to look for) or the group uses KIP-848, which refuses
    the rejoin until the dead member's session expires (membership.must_rejoin)."""
    if not s.static_membership or s.group_protocol != "classic":
        return None
    # Connection properties only: consumer ones would only make the admin client warn.
    return {"conf": {**connection_properties(s.kafka), "bootstrap.servers": s.bootstrap_servers},
            "group": s.group, "prefix": instance_id_prefix(s), "workers": s.workers}


def leftover_slots(instance_ids: list[str], prefix: str, workers: int) -> list[int]:
    """The slots >= ``workers`` among ``<prefix>-<slot>`` instance ids."""
    own = re.compile(re.escape(prefix) + r"-(\d+)")
    return sorted({int(m.group(1)) for i in instance_ids if (m := own.fullmatch(i)) and int(m.group(1)) >= workers})


class LeftoverProbe:
    """The helper process, read without blocking: ``start`` it, hand ``on_readable`` to the loop's
    selector for ``fd``; ``done(slots)`` is called once with the answer ([] on any failure).
    The loop's reaper collects the process; ``expire`` kills it past ASK_TIMEOUT_S + 5 s."""

    def __init__(self, body: dict[str, Any], done: Callable[[list[int]], None]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.adapters.leftovers"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(body).encode())
            self.proc.stdin.close()
        except OSError:
            pass
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.deadline = time.monotonic() + ASK_TIMEOUT_S + 5.0
        self._out = b""
        self._done: Callable[[list[int]], None] | None = done

    def on_readable(self) -> bool:
        """Read what is there; True once the answer was given (then unregister ``fd``)."""
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if chunk and len(self._out) < 1 << 20:
            self._out += chunk
            return False
        try:
            slots = [int(n) for n in json.loads(self._out or b"[]")]
        except (ValueError, TypeError):
            slots = []
        self._finish(slots)
        return True

    def expire(self, now: float) -> bool:
        """Past its deadline: kill it and answer []. True when it was."""
        if self._done is None or now < self.deadline:
            return False
        try:
            self.proc.kill()
        except OSError:
            pass
        log.debug("the broker did not list the group's members within %.0fs", ASK_TIMEOUT_S)
        self._finish([])
        return True

    def kill(self) -> None:
        """At ksup's exit, the helper if it still runs (it lives in a session of its own)."""
        try:
            self.proc.kill()
            self.proc.wait(1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _finish(self, slots: list[int]) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc.returncode = 0  # reaped by the loop's waitpid(-1), not by Popen
        done, self._done = self._done, None
        if done is not None:
            done(slots)


def main() -> int:
    """The helper: a request on stdin, the leftover slots as a JSON list on stdout."""
    body = json.loads(sys.stdin.read())
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(body["conf"])
    group = admin.describe_consumer_groups([body["group"]], request_timeout=ASK_TIMEOUT_S)[body["group"]] \
        .result(ASK_TIMEOUT_S + 1)
    ids = [m.group_instance_id or "" for m in group.members]
    print(json.dumps(leftover_slots(ids, body["prefix"], int(body["workers"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
