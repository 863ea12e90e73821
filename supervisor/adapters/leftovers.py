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
import selectors
import signal
import subprocess
import sys
import time
from typing import Any

from supervisor.child.liveness import ask_kernel_for_parent_death_signal
from supervisor.config import Settings, instance_id_prefix
from supervisor.connection import connection_properties
from supervisor.parent import events as ev
from supervisor.parent.hooks import Hooks
from supervisor.parent.membership import rejoins_free_dead_members

log = logging.getLogger("ksup.supervisor")

ASK_TIMEOUT_S = 5.0


def request(s: Settings) -> dict[str, Any] | None:
    """What the helper needs (its stdin: secrets never go in argv), or None when a rejoin could
    not free a leftover member anyway (membership.rejoins_free_dead_members)."""
    if not rejoins_free_dead_members(s):
        return None
    # Connection properties only: consumer ones would only make the admin client warn.
    return {"conf": {**connection_properties(s.kafka), "bootstrap.servers": s.bootstrap_servers},
            "group": s.group, "prefix": instance_id_prefix(s), "workers": s.workers, "parent": os.getpid()}


def leftover_slots(instance_ids: list[str], prefix: str, workers: int) -> list[int]:
    """The slots >= ``workers`` among ``<prefix>-<slot>`` instance ids."""
    own = re.compile(re.escape(prefix) + r"-(\d+)")
    return sorted({int(m.group(1)) for i in instance_ids if (m := own.fullmatch(i)) and int(m.group(1)) >= workers})


class LeftoverProbe(Hooks):
    """The helper process as a loop adapter: started at ``on_start``, its stdout read through the
    loop's selector without blocking, the answer posted as ``ev.LeftoverMembers``; killed past
    ASK_TIMEOUT_S + 5 s (``on_tick``) or at ksup's exit. The loop's reaper collects it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.deadline = 0.0
        self._out = b""

    def on_start(self, sup: Any) -> None:
        body = request(sup.core.settings)
        if body is None:
            return
        try:
            proc = subprocess.Popen([sys.executable, "-m", "supervisor.adapters.leftovers"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            log.debug("could not start the member-list helper: %s", exc)
            return
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(body).encode())
            proc.stdin.close()
        except OSError:
            pass
        os.set_blocking(proc.stdout.fileno(), False)
        self.proc, self.deadline = proc, time.monotonic() + ASK_TIMEOUT_S + 5.0
        sup.selector.register(proc.stdout.fileno(), selectors.EVENT_READ, lambda: self._readable(sup))

    def _readable(self, sup: Any) -> None:
        """Read what is there; once the helper closed its stdout, the answer ([] on any failure)."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk and len(self._out) < 1 << 20:
            self._out += chunk
            return
        try:
            slots = [int(n) for n in json.loads(self._out or b"[]")]
        except (ValueError, TypeError):
            slots = []
        self._finish(sup, slots)

    def on_tick(self, sup: Any) -> None:
        if self.proc is None or time.monotonic() < self.deadline:
            return
        log.debug("the broker did not list the group's members within %.0fs", ASK_TIMEOUT_S)
        self._kill(wait=False)
        self._finish(sup, [])

    def on_exit(self, sup: Any, exit_code: int) -> None:
        """Still asking the broker: its answer is of no use now (it runs in a session of its own)."""
        if self.proc is not None:
            self._kill(wait=True)

    def _kill(self, wait: bool) -> None:
        assert self.proc is not None
        try:
            self.proc.kill()
            if wait:
                self.proc.wait(1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _finish(self, sup: Any, slots: list[int]) -> None:
        proc, self.proc = self.proc, None
        assert proc is not None and proc.stdout is not None
        try:
            sup.selector.unregister(proc.stdout.fileno())
        except (KeyError, ValueError):
            pass
        proc.stdout.close()
        proc.returncode = 0  # reaped by the loop's waitpid(-1), not by Popen
        if slots:
            sup.post(ev.LeftoverMembers(tuple(slots)))


def main() -> int:
    """The helper: a request on stdin, the leftover slots as a JSON list on stdout. It dies with
    ksup (SIGKILL from the kernel when its parent dies): nothing else would end it when ksup is
    killed, or fails to start, while the broker has not answered."""
    ask_kernel_for_parent_death_signal(signal.SIGKILL)
    body = json.loads(sys.stdin.read())
    if os.getppid() != body["parent"]:
        return 0  # ksup died before the kernel was asked
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(body["conf"])
    group = admin.describe_consumer_groups([body["group"]], request_timeout=ASK_TIMEOUT_S)[body["group"]] \
        .result(ASK_TIMEOUT_S + 1)
    ids = [m.group_instance_id or "" for m in group.members]
    print(json.dumps(leftover_slots(ids, body["prefix"], int(body["workers"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
