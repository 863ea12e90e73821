"""--pidfile: the supervisor's pid, written at start and removed at exit (parent side)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from supervisor.parent.hooks import Hooks


class PidfileHooks(Hooks):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_start(self, sup: Any) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(self.path)


    def on_exit(self, sup: Any, exit_code: int) -> None:
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass
