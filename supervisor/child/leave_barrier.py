"""The supervisor's "nobody leaves before everybody committed" rule, kept by orphans (child side).

A supervisor releases its draining workers together, once each has committed (drain.py, step
6): with the classic protocol a member that leaves, or a static member that closes without a
LeaveGroup, can hold up the group's next rebalance round, and a member that has rejoined cannot
commit until that round ends. Orphans (their supervisor died) have nobody to release them, so
they keep the rule among themselves through marker files in the supervisor's board folder,
which outlives it:

- ``member-<pid>``: written when the worker starts consuming (its content: the process start
  time, so a reused pid is not taken for the worker);
- ``committed-<pid>``: written by an orphan once its final commit is over (confirmed or not);
- an orphan closes only when every other live member has written ``committed-<pid>``, or its
  wait is over. A member that died or exited is not waited for; each removes its own files
  when it exits normally.

Plain files and a directory listing: a handful of siblings, read every 50 ms while draining.
"""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.procfs import start_time


class LeaveBarrier:
    def __init__(self, folder: str, pid: int | None = None) -> None:
        self.folder = Path(folder)
        self.pid = pid if pid is not None else os.getpid()

    def _path(self, kind: str, pid: int | None = None) -> Path:
        return self.folder / f"{kind}-{self.pid if pid is None else pid}"

    def _write(self, kind: str, text: str = "") -> None:
        try:
            self._path(kind).write_text(text)
        except OSError:
            pass  # the folder is gone (the supervisor cleaned up): no sibling can wait on us

    def enter(self) -> None:
        """This worker is a member of the group from now on."""
        self._write("member", start_time(self.pid) or "")

    def committed(self) -> None:
        """This orphan's final commit is over: siblings need not wait for it any more."""
        self._write("committed")

    def leave(self) -> None:
        for kind in ("member", "committed"):
            try:
                self._path(kind).unlink()
            except OSError:
                pass

    def waiting_for(self) -> list[int]:
        """Live sibling members that have not finished their final commit yet."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        done = {name.removeprefix("committed-") for name in names if name.startswith("committed-")}
        out = []
        for name in names:
            if not name.startswith("member-"):
                continue
            pid_text = name.removeprefix("member-")
            if not pid_text.isdigit() or int(pid_text) == self.pid or pid_text in done:
                continue
            try:
                started = (self.folder / name).read_text()
            except OSError:
                continue
            alive = start_time(int(pid_text))
            if alive is not None and (not started or alive == started):
                out.append(int(pid_text))
        return out
