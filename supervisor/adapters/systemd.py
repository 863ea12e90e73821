"""systemd integration (parent side): sd_notify over $NOTIFY_SOCKET, and start-up checks of the
unit the supervisor runs in. No dependency: a notification is one datagram. Without
NOTIFY_SOCKET every method is a no-op; a failure to send is logged at debug level, never raised.

What is sent and when:
- ``READY=1`` once this ksup is ready as ``parent/readiness.py`` defines it (every worker is a
  settled member of the group; again after a reload);
- ``STATUS=...`` a human line, whenever it changes;
- ``RELOADING=1`` + ``MONOTONIC_USEC`` when a rolling reload starts;
- ``STOPPING=1`` when the drain starts, then ``EXTEND_TIMEOUT_USEC`` while it makes progress;
- ``WATCHDOG=1`` every half WatchdogSec, only while the loop runs and no worker is stuck or silent.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from supervisor.parent import readiness
from supervisor.parent.hooks import Hooks

log = logging.getLogger("ksup.systemd")

EXTEND_STEP_S = 10.0  # while a drain progresses, keep systemd's stop deadline this far ahead


def notify(message: str, address: str | None = None) -> bool:
    address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier(Hooks):
    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s = int(usec) / 1e6 if usec and (not pid or pid == str(os.getpid())) else 0.0
        self.ready = False
        self.reloading = False
        self.status = ""
        self.last_ping = 0.0
        self.last_extend = 0.0
        self.last_status_at = 0.0
        self.progress_mark: tuple[int, int] | None = None

    def send(self, *lines: str) -> None:
        if self.address:
            notify("\n".join(lines), self.address)

    def on_tick(self, sup: Any) -> None:
        if not self.address:
            return
        now = time.monotonic()
        state = sup.state.value
        if state == "running" and not self.ready and not self.reloading and readiness.ready(sup).ok:
            self.ready = True
            self.send("READY=1", f"STATUS={_status_line(sup)}")
        elif self.ready and state == "running":
            line = _status_line(sup)
            if line != self.status and now - self.last_status_at > 2.0:  # at most one STATUS per 2 s
                self.status, self.last_status_at = line, now
                self.send(f"STATUS={line}")
        if state == "stopping":
            self.extend_while_progressing(sup, now)
        if self.watchdog_s and now - self.last_ping >= self.watchdog_s / 2 and healthy(sup):
            self.last_ping = now
            self.send("WATCHDOG=1")

    def extend_while_progressing(self, sup: Any, now: float) -> None:
        """A long drain that still moves (a worker finished a message or exited) keeps systemd's
        stop timeout ahead of it; a stuck one does not, and systemd's SIGKILL comes on time."""
        alive = [s for s in sup.slots if s.alive]
        mark = (len(alive), sum(s.report.processed for s in alive if s.report is not None))
        if mark != self.progress_mark and now - self.last_extend >= 1.0:
            self.progress_mark, self.last_extend = mark, now
            self.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_STEP_S * 1e6)}",
                      f"STATUS=draining: {len(alive)} worker(s) still finishing")

    def on_stopping(self, sup: Any) -> None:
        self.send("STOPPING=1", f"STATUS=stopping: {sup.stop_reason}")

    def on_reload_start(self, sup: Any) -> None:
        self.reloading = True
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                  "STATUS=rolling reload: replacing workers one by one")

    def on_reload_done(self, sup: Any, summary: dict[str, Any]) -> None:
        self.reloading = False
        outcome = "done" if summary.get("ok") else f"stopped: {summary.get('error')}"
        self.send("READY=1", f"STATUS=rolling reload {outcome}; {_status_line(sup)}")


def _status_line(sup: Any) -> str:
    workers = [s for s in sup.slots if s.alive]
    parts = sum(len(s.report.assignment) for s in workers if s.report is not None)
    done = sum(s.report.processed for s in workers if s.report is not None)
    return f"{len(workers)} worker(s), {parts} partition(s), {done} message(s) processed"


def healthy(sup: Any) -> bool:
    """For the watchdog: no worker stuck (handler timeout) or silent for half its heartbeat timeout."""
    from supervisor.parent import policy

    now, wall = time.monotonic(), time.time()
    for s in sup.slots:
        if not s.alive:
            continue
        if s.stuck_reason or policy.stuck(s, now, wall, sup.settings):
            return False
        if s.joined and now - s.report_at > sup.settings.heartbeat_timeout / 2:
            return False
    return True


# ---- start-up checks ----------------------------------------------------------------------------

def own_unit() -> str | None:
    """The systemd unit this process runs in, from its cgroup (None outside systemd)."""
    if not (os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET")):
        return None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.endswith(".service"):
                return name
    except OSError:
        pass
    return None


def unit_properties(unit: str) -> dict[str, str]:
    try:
        out = subprocess.run(["systemctl", "show", unit, "-p", "KillMode", "-p", "TimeoutStopUSec"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def parse_timespan(text: str) -> float | None:
    """systemd's '45s', '1min 30s', '2min', 'infinity' -> seconds."""
    if not text or text == "infinity":
        return None
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for part in text.split():
        number = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = part[len(number):] or "s"
        if unit not in units:
            return None
        total += float(number) * units[unit]
    return total


def check_unit(graceful_timeout: float, props: dict[str, str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) about how the unit and ksup's settings fit together."""
    errors, warnings = [], []
    stop_timeout = parse_timespan(props.get("TimeoutStopUSec", ""))
    if stop_timeout is not None and graceful_timeout >= stop_timeout:
        errors.append(f"--graceful-timeout {graceful_timeout:g}s is not below the unit's TimeoutStopSec "
                      f"({stop_timeout:g}s): systemd would SIGKILL the workers before ksup's own deadline "
                      f"(raise TimeoutStopSec or lower graceful_timeout)")
    if props.get("KillMode") == "control-group":
        warnings.append("the unit has KillMode=control-group: systemd sends SIGTERM to every worker as well as "
                        "to ksup; it works (each drains once), but KillMode=mixed is the intended setting")
    return errors, warnings
