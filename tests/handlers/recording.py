"""Test handler: records every message it finished as a line ``partition offset pid`` in the file
named by KSUP_TEST_RECORD, after sleeping KSUP_TEST_SLEEP seconds. Behaviour switches for the
failure tests come from the environment too (the workers inherit it)."""

from __future__ import annotations

import os
import time

from supervisor.record import Record

_SLEEP = float(os.environ.get("KSUP_TEST_SLEEP", "0"))
_RAISE_AT = os.environ.get("KSUP_TEST_RAISE_AT")  # "partition:offset" raises once per process
_HANG_AT = os.environ.get("KSUP_TEST_HANG_AT")    # "partition:offset" sleeps an hour
_fd = os.open(os.environ["KSUP_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def process(record: Record) -> None:
    where = f"{record.partition}:{record.offset}"
    if _SLEEP:
        time.sleep(_SLEEP)
    if where == _HANG_AT:
        time.sleep(3600)
    if where == _RAISE_AT and not os.path.exists(os.environ["KSUP_TEST_RECORD"] + ".raised"):
        open(os.environ["KSUP_TEST_RECORD"] + ".raised", "w").close()
        raise RuntimeError(f"test failure at {where}")
    # One write per message with O_APPEND: a line is either whole or absent, even on SIGKILL.
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\n".encode())
