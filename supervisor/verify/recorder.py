"""The built-in recording handler of ``ksup verify`` (runs in workers).

Writes one line per finished message, ``partition offset pid create_ms done_ns`` (wall clock), to the file
named by KSUP_VERIFY_RECORD (appended whole with O_APPEND, so a line survives SIGKILL or is
absent). A message whose value ends in ``:fail`` raises the first time it is handled (a marker
file remembers), to exercise the handler-exception path; one ending in ``:hang`` hangs the first
time (until ksup's --handler-timeout stops the worker), to exercise the stuck-handler path; one
ending in ``:poison`` kills its worker (SIGKILL of itself, mid-handler) the first time: a
message that kills its worker, with no drain and the message in flight.

Message faults of one kind are at least KSUP_VERIFY_FAULT_SPACING seconds apart (a marked
message that comes sooner is handled normally, and its fault does not happen): after a worker
restart the backlog is handled fast, and faults marked far apart in the sequence would come one
on top of the other, each costing the same worker another restart, so that the gaps would be of
the plan's making. Each fault that happened leaves its marker; verify counts those.
"""

from __future__ import annotations

import os
import signal
import time

from supervisor.record import Record
from supervisor.verify.plan import MESSAGE_FAULT_KINDS, Fault

_RECORD = os.environ.get("KSUP_VERIFY_RECORD", "")
_SLEEP = float(os.environ.get("KSUP_VERIFY_SLEEP", "0"))
# seconds between two faults of one kind, by marker (a hang has its own: it costs a restart)
_SPACING = {how.marker: float(os.environ.get("KSUP_VERIFY_HANG_SPACING" if kind is Fault.HANG
                                             else "KSUP_VERIFY_FAULT_SPACING", "0"))
            for kind, how in MESSAGE_FAULT_KINDS.items()}
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _RECORD else -1


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _fault_now(kind: str, record: Record) -> bool:
    """Whether the fault of this marked message happens now: the first time the message is
    handled, and only if no fault of its kind happened in the last spacing seconds (every
    worker claims windows of that length: this one and the one before it must be free, so two
    claims are always a full window apart)."""
    marker = f"{_RECORD}.{kind}-{record.partition}-{record.offset}"
    if os.path.exists(marker):
        return False
    spacing = _SPACING[kind]
    if spacing > 0:
        window = int(time.time() / spacing)
        if os.path.exists(f"{_RECORD}.window-{kind}-{window - 1}") or \
                not _claim(f"{_RECORD}.window-{kind}-{window}"):
            return False
    return _claim(marker)


def _hang(record: Record) -> None:
    time.sleep(3600)  # ksup's --handler-timeout ends this worker; the next one handles it


def _poison(record: Record) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # the next worker handles it (the marker says it happened)


def _fail(record: Record) -> None:
    raise RuntimeError(f"ksup verify: injected handler failure at {record.coordinates}")


_DO = {Fault.HANG: _hang, Fault.POISON: _poison, Fault.EXCEPTION: _fail}
# (value suffix, marker, what happens) per kind of plan.MESSAGE_FAULT_KINDS
_FAULTS = [(how.suffix.encode(), how.marker, _DO[kind]) for kind, how in MESSAGE_FAULT_KINDS.items()]


def process(record: Record) -> None:
    if _SLEEP:
        time.sleep(_SLEEP)
    value = record.value
    if value is not None:
        for suffix, marker, do in _FAULTS:
            if value.endswith(suffix) and _fault_now(marker, record):
                do(record)
    line = f"{record.partition} {record.offset} {os.getpid()} {record.timestamp[1]} {time.time_ns()}\n"
    os.write(_fd, line.encode())
