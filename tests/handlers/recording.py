"""Test handler: records every message it finished as a line ``partition offset pid`` in the file
named by KSUP_TEST_RECORD, after sleeping KSUP_TEST_SLEEP seconds. Failure switches come from
the environment (the workers inherit it); each ``*_AT`` switch names "partition:offset" and
fires once per test (a marker file next to the record remembers it fired); KSUP_TEST_SLOW_AT may
name several, comma-separated, and slows each every time. KSUP_TEST_RAISE_ON_GO_AT waits (60 s at
most) until a file ``<record>.go`` exists, then raises: a test creates it when the worker is
where the test wants the failure (draining, say)."""

from __future__ import annotations

import os
import time

from supervisor.record import Record

_RECORD = os.environ["KSUP_TEST_RECORD"]
_SLEEP = float(os.environ.get("KSUP_TEST_SLEEP", "0"))
_fd = os.open(_RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_hoard: list[bytes] = []


def _once(name: str, where: str) -> bool:
    """True the first time the switch ``name`` matches ``where`` in this test."""
    if os.environ.get(name) != where:
        return False
    marker = f"{_RECORD}.{name}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def process(record: Record) -> None:
    where = f"{record.partition}:{record.offset}"
    if _SLEEP:
        time.sleep(_SLEEP)
    if _once("KSUP_TEST_HANG_AT", where):
        time.sleep(3600)
    if _once("KSUP_TEST_RAISE_AT", where):
        raise RuntimeError(f"test failure at {where}")
    if _once("KSUP_TEST_RAISE_ON_GO_AT", where):
        go = time.monotonic() + 60
        while not os.path.exists(f"{_RECORD}.go") and time.monotonic() < go:
            time.sleep(0.01)  # paces the wait for the test's signal
        raise RuntimeError(f"test failure at {where}, told to")
    if _once("KSUP_TEST_GROW_AT", where):
        _hoard.append(bytearray(200 << 20))  # 200 MiB, touched so it counts in RSS
        _hoard[-1][:: 4096] = b"x" * len(_hoard[-1][:: 4096])
    if _once("KSUP_TEST_EXIT_AT", where):
        os._exit(1)
    if os.environ.get("KSUP_TEST_EXIT_ALWAYS_AT") == where:  # a poison message: kills every worker
        os._exit(1)
    if os.environ.get("KSUP_TEST_RAISE_ALWAYS_AT") == where:
        raise ValueError(f"cannot parse {where}")
    if where in os.environ.get("KSUP_TEST_SLOW_AT", "").split(","):  # one or more "p:o", comma-separated
        time.sleep(float(os.environ.get("KSUP_TEST_SLOW_S", "5")))
    # One write per message with O_APPEND: a line is either whole or absent, even on SIGKILL.
    os.write(_fd, f"{record.partition} {record.offset} {os.getpid()}\n".encode())


def process_batch(records: list[Record]) -> None:
    """The same for each record of a batch, in order (a switch fires inside the batch)."""
    for r in records:
        process(r)
