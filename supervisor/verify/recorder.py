"""The built-in recording handler of ``ksup verify`` (runs in workers).

Writes one line per finished message, ``partition offset pid create_ms done_ns`` (wall clock), to the file
named by KSUP_VERIFY_RECORD (appended whole with O_APPEND, so a line survives SIGKILL or is
absent). A message whose value ends in ``:fail`` raises the first time it is handled (a marker
file remembers), to exercise the handler-exception path; one ending in ``:hang`` hangs the first
time (until ksup's --handler-timeout stops the worker), to exercise the stuck-handler path.
"""

from __future__ import annotations

import os
import time

from supervisor.record import Record

_RECORD = os.environ.get("KSUP_VERIFY_RECORD", "")
_SLEEP = float(os.environ.get("KSUP_VERIFY_SLEEP", "0"))
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if _RECORD else -1


def process(record: Record) -> None:
    if _SLEEP:
        time.sleep(_SLEEP)
    if record.value is not None and record.value.endswith(b":hang"):
        marker = f"{_RECORD}.hung-{record.partition}-{record.offset}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            time.sleep(3600)  # ksup's --handler-timeout ends this worker; the next one handles it
        except FileExistsError:
            pass
    if record.value is not None and record.value.endswith(b":fail"):
        marker = f"{_RECORD}.failed-{record.partition}-{record.offset}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            raise RuntimeError(f"ksup verify: injected handler failure at {record.coordinates}")
        except FileExistsError:
            pass
    line = f"{record.partition} {record.offset} {os.getpid()} {record.timestamp[1]} {time.time_ns()}\n"
    os.write(_fd, line.encode())
