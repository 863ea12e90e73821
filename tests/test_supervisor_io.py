"""The supervisor's I/O edges (issue 13 findings 5, 8; issue 12 logs and secrets): signals are
never lost, worker output is bounded and linear, a stderr nobody reads never stalls the loop,
worker stdout is routed like stderr (redacted, JSON lines), tracebacks survive redaction."""

from __future__ import annotations

import sys
import threading

from supervisor.parent.signals import SignalQueue


def test_no_signal_is_lost_while_the_loop_takes_them():
    """Finding 5: the pending list was read and cleared in two steps; a signal recorded in
    between was lost. Signal handlers run between bytecodes of the main thread; a thread
    calling the recorder under a tiny switch interval interleaves the same way."""
    q = SignalQueue()
    total, got = 200_000, []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        def fire() -> None:
            for _ in range(total):
                q._record(15, None)

        t = threading.Thread(target=fire)
        t.start()
        while t.is_alive():
            got += q.take()
        t.join()
        got += q.take()
    finally:
        sys.setswitchinterval(old)
        q.uninstall()
    assert len(got) == total, f"{total - len(got)} signals lost"
