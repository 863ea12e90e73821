"""Start one worker as a fresh interpreter (parent side).

``python -m supervisor.child`` is exec'd, never forked from a process holding a Kafka handle,
so it also imports whatever code is installed *now* (a rolling reload picks up new code).
The worker runs in its own session: a terminal's Ctrl+C reaches only the supervisor, which
drains every worker exactly once.
"""

from __future__ import annotations

import subprocess
import sys

from supervisor.contract import messages as m
from supervisor.contract.channel import Channel, socket_pair


def spawn_worker(configure: m.Configure, hold_fd: int | None = None) -> tuple[subprocess.Popen[bytes], Channel]:
    """``hold_fd``: the board folder's lock (``board_folder.py``), held by the worker for its
    whole life by inheriting it, so that no gap exists in which its folder looks unused."""
    channel, child_sock = socket_pair()
    fd = child_sock.fileno()
    held = () if hold_fd is None else (hold_fd,)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.child", str(fd), *map(str, held)],
            pass_fds=(fd, *held),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # read by the supervisor: forwarded, and kept for death reports
            start_new_session=True,
        )
    except BaseException:
        channel.close()  # no worker: the caller gets the error, and no descriptor is left open
        raise
    finally:
        child_sock.close()
    channel.send(configure)
    return proc, channel
