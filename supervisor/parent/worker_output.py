"""Worker stderr (parent side): forwarded line by line to the supervisor's stderr, and the last
lines kept per slot so that a death report can quote them."""

from __future__ import annotations

import selectors
import sys
import time

from supervisor.contract import messages as m
from supervisor.logs import redact
from supervisor.parent.slots import WorkerSlot


def read_stderr(slot: WorkerSlot, selector: selectors.BaseSelector, final: bool = False) -> None:
    """Forward what is available; with ``final`` (the worker exited) everything left, then close."""
    stream = slot.proc.stderr if slot.proc is not None else None
    if stream is None or stream.closed:
        return
    try:
        data = stream.read()
    except (BlockingIOError, ValueError):
        data = None
    if data:
        forward(slot, data)
    if final and slot.stderr_buf:
        forward(slot, b"\n")
    if final or data == b"":  # b"" is end of file; None is "nothing right now"
        try:
            selector.unregister(stream)
        except (KeyError, ValueError):
            pass
    if final:
        stream.close()


# Secret values (from the Kafka settings) to blank out of anything a worker writes to stderr.
SECRETS: list[str] = []


def forward(slot: WorkerSlot, data: bytes) -> None:
    *lines, slot.stderr_buf = (slot.stderr_buf + data).split(b"\n")
    for line in lines:
        if SECRETS:
            line = redact(line.decode(errors="replace"), SECRETS).encode()
        slot.stderr_tail.append(line.decode(errors="replace"))
        try:
            sys.stderr.buffer.write(line + b"\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def coords(inflight: m.InFlight) -> str:
    return f"{inflight.topic}[{inflight.partition}]@{inflight.offset}"


def last_moments(slot: WorkerSlot) -> str:
    """What the worker was doing when it ended, for the death log line."""
    if slot.exiting is not None:
        return f": {slot.exiting.reason}"
    inflight = slot.report.in_flight if slot.report else None
    if inflight is not None:
        return f"; in flight: {coords(inflight)} for {time.time() - inflight.since:.1f}s"
    return ""


def stderr_tail(slot: WorkerSlot) -> str:
    tail = [line for line in slot.stderr_tail if line.strip()][-3:]
    return f"; last output: {' | '.join(tail)[-600:]}" if tail else ""
