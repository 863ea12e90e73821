"""The supervisor's board folder: where its workers' in-flight boards live (one file per worker
process, removed once read at its exit) and where orphans meet (``child/leave_barrier.py``).

The folder outlives a ksup that is SIGKILLed (or OOM-killed): its orphans still use it. So who
uses a folder is kept by the kernel, not by a file's content: the supervisor holds a shared
``flock`` on ``.in-use`` in the folder from its creation, and every worker inherits that open
file (``pass_fds``), so the lock lasts until the last process of that ksup is gone, however it
ended. A ksup that starts removes every folder of this prefix whose lock it can take exclusively
(nobody holds it: every process of that ksup is dead), so a ksup crash-looping under systemd
does not fill the temporary directory (often RAM) with folders.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time

log = logging.getLogger("ksup.supervisor")

PREFIX = "ksup-inflight-"
IN_USE = ".in-use"
# A folder without the lock file: made by a ksup before these locks, or by one that died between
# creating the folder and its lock. No orphan of it lives this long (a drain ends within
# --graceful-timeout), and a folder this young may be one a ksup is creating right now.
UNLOCKED_AFTER_S = 3600.0


class BoardFolder:
    """A new folder, held (shared lock) until ``remove``; ``hold_fd`` goes to every worker."""

    def __init__(self, root: str | None = None) -> None:
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=root)
        # Locked before it has its name: a ksup starting at the same moment must never find an
        # unlocked .in-use here and take the folder for an abandoned one.
        making = os.path.join(self.path, IN_USE + ".new")
        self.hold_fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.hold_fd, fcntl.LOCK_SH)
        os.rename(making, os.path.join(self.path, IN_USE))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.close(self.hold_fd)
        except OSError:
            pass


def remove_abandoned(root: str | None = None, now: float | None = None) -> list[str]:
    """Remove the folders under ``root`` (the temporary directory) that no process uses any more;
    returns their paths. Never blocks: a held lock means "in use", and one that cannot be opened
    (another user's folder) is left alone."""
    root = root or tempfile.gettempdir()
    now = time.time() if now is None else now
    removed = []
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(PREFIX)]
    except OSError:
        return []
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            fd = os.open(os.path.join(entry.path, IN_USE), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime > UNLOCKED_AFTER_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a process of that ksup (the supervisor or an orphan) is alive
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d board folder(s) of ksups that are gone: %s", len(removed), ", ".join(removed))
    return removed
