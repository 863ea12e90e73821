"""Worker output (parent side): a worker's stdout and stderr (one pipe) forwarded line by line to
the supervisor's stderr through its non-blocking sink, redacted, and in JSON mode as one JSON
object per line (a line that is not one, such as a print() or a traceback, is wrapped); the last
lines kept per slot so that a death report can quote them.

Bounded and linear: the pipe is read in chunks of READ_BYTES per wake-up, a line longer than
MAX_LINE is cut (the rest of it, up to its newline, is discarded), and only the unfinished tail
of the latest chunk is ever joined with the next one."""

from __future__ import annotations

import json
import os
import selectors
import sys
import time

from supervisor.contract import messages as m
from supervisor.logs import redact
from supervisor.parent.slots import WorkerSlot

READ_BYTES = 1 << 16
MAX_LINE = 1 << 16
CUT_MARK = b" [ksup: line cut at 64 KiB]"


def read_stderr(slot: WorkerSlot, selector: selectors.BaseSelector, final: bool = False) -> None:
    """Forward what is available (one chunk; the selector calls again while there is more);
    with ``final`` (the worker exited) everything left, then close."""
    stream = slot.proc.stderr if slot.proc is not None else None
    if stream is None or stream.closed:
        return
    fd = stream.fileno()
    eof = False
    for _ in range(64 if final else 1):  # final: drain what is left, still bounded
        try:
            data = os.read(fd, READ_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            eof = True
            break
        if not data:
            eof = True
            break
        forward(slot, data)
    if final and slot.stderr_buf:
        forward(slot, b"\n")
    if final or eof:
        try:
            selector.unregister(stream)
        except (KeyError, ValueError):
            pass
    if final:
        stream.close()


# Secret values (from the Kafka settings) to blank out of anything a worker writes.
SECRETS: list[str] = []
# "json" or "text": the supervisor's log format, which forwarded lines keep to.
FORMAT = "json"


def forward(slot: WorkerSlot, data: bytes) -> None:
    """Split ``data`` into lines; only the new data is searched for newlines (linear)."""
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            _keep(slot, data[start:])
            return
        piece = data[start:end]
        start = end + 1
        if slot.stderr_cutting:
            slot.stderr_cutting = False  # the rest of a cut line: dropped up to its newline
            continue
        line, slot.stderr_buf = slot.stderr_buf + piece, b""
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + CUT_MARK
        emit(slot, line)


def _keep(slot: WorkerSlot, rest: bytes) -> None:
    if slot.stderr_cutting or not rest:
        return
    slot.stderr_buf += rest
    if len(slot.stderr_buf) > MAX_LINE:  # a line without end: emit what fits, drop the rest of it
        emit(slot, slot.stderr_buf[:MAX_LINE] + CUT_MARK)
        slot.stderr_buf, slot.stderr_cutting = b"", True


def emit(slot: WorkerSlot, line: bytes) -> None:
    text = line.decode(errors="replace")
    if SECRETS:
        text = redact(text, SECRETS)
    slot.stderr_tail.append(text)
    if FORMAT == "json" and not (text.startswith("{") and text.endswith("}")):
        text = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "level": "INFO", "logger": "ksup.worker.output",
                           "message": text, "role": "worker", "slot": slot.index, "pid": slot.pid})
    out = (text + "\n").encode()
    from supervisor.parent import sink

    if sink.stderr is not None:
        sink.stderr.write(out)
        return
    try:
        sys.stderr.buffer.write(out)
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
