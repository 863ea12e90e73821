"""The supervisor's board folder: where its workers' in-flight boards live (one file per worker
process, removed once read at its exit) and where orphans meet (``child/leave_barrier.py``).

The folder outlives a ksup that is SIGKILLed (or OOM-killed): its orphans still use it. So who
uses a folder is kept by the kernel, not by a file's content: the supervisor holds a shared
``flock`` on the folder itself from its creation, and every worker inherits that open
directory (``pass_fds``), so the lock lasts until the last process of that ksup is gone, however
it ended. (systemd-tmpfiles' age-based cleaning also skips a directory with a BSD lock.) A ksup
that starts removes every folder of this prefix that is its user's, carries the mark file (made
only once the lock is held) and whose lock it can take exclusively: every process of that ksup
is dead. So a ksup crash-looping under systemd does not fill the temporary directory (often RAM)
with folders. A folder without the mark (made by a ksup before these locks, or one being made
right now) is never touched.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile

log = logging.getLogger("ksup.supervisor")

PREFIX = "ksup-inflight-"
MARK = ".ksup-board"  # made after the lock is taken: a folder with it is held or abandoned
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class BoardFolder:
    """A new folder, held (shared lock) until ``remove``; ``hold_fd`` goes to every worker."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root
        self.path = tempfile.mkdtemp(prefix=PREFIX, dir=root)
        self.hold_fd = os.open(self.path, _DIR_FLAGS)
        fcntl.flock(self.hold_fd, fcntl.LOCK_SH)
        os.close(os.open(MARK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=self.hold_fd))

    def ensure(self) -> BoardFolder:
        """This folder, or a new one if it was removed under us (a /tmp cleaner, an rm -rf):
        workers still running keep the old lock; those started from now on use the new folder."""
        if os.path.isdir(self.path):
            return self
        log.warning("the board folder %s was removed while ksup ran: making a new one", self.path)
        os.close(self.hold_fd)
        return BoardFolder(self.root)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.close(self.hold_fd)
        except OSError:
            pass


def remove_abandoned(root: str | None = None) -> list[str]:
    """Remove the folders under ``root`` (the temporary directory) that no process uses any more;
    returns their paths. Never raises and never blocks: a held lock means "in use"; a folder of
    another user, without the mark, or that cannot be opened is left alone."""
    removed = []
    try:
        root = root or tempfile.gettempdir()
        names = [name for name in os.listdir(root) if name.startswith(PREFIX)]
    except OSError:
        return []
    for name in names:
        path = os.path.join(root, name)
        try:
            if _abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.lexists(path):
                    removed.append(path)
        except Exception as exc:  # a folder we cannot judge or remove must not stop ksup
            log.debug("left board folder %s: %r", path, exc)
    if removed:
        log.info("removed %d board folder(s) of ksups that are gone: %s", len(removed), ", ".join(removed))
    return removed


def _abandoned(path: str) -> bool:
    try:
        fd = os.open(path, _DIR_FLAGS)  # not a symlink: O_NOFOLLOW
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.geteuid():  # a directory: O_DIRECTORY
            return False
        try:
            os.stat(MARK, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: a process of that ksup (the supervisor or an orphan) is alive
        return True
    finally:
        os.close(fd)
