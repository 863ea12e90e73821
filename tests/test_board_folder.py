"""The board folder's life (supervisor/parent/board_folder.py), without a broker: held by any
process that inherited its lock, removed by the next ksup once nobody holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from supervisor.parent.board_folder import PREFIX, UNLOCKED_AFTER_S, BoardFolder, remove_abandoned


def test_a_folder_is_kept_while_any_holder_lives_and_removed_after(tmp_path):
    folder = BoardFolder(str(tmp_path))
    # A worker inherits the lock; then its supervisor dies (its own copy closed, nothing removed).
    worker = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                              pass_fds=(folder.hold_fd,))
    try:
        os.close(folder.hold_fd)
        assert remove_abandoned(str(tmp_path)) == []
        assert os.path.isdir(folder.path)
    finally:
        worker.kill()
        worker.wait(10)
    assert remove_abandoned(str(tmp_path)) == [folder.path]
    assert not os.path.exists(folder.path)


def test_a_live_supervisors_own_folder_is_never_taken(tmp_path):
    folder = BoardFolder(str(tmp_path))
    try:
        assert remove_abandoned(str(tmp_path)) == []  # the same process, another open: still held
        assert os.path.isdir(folder.path)
    finally:
        folder.remove()
    assert not os.path.exists(folder.path)


def test_a_folder_without_its_lock_goes_only_when_old(tmp_path):
    """Made by a ksup before these locks, or one killed before it locked: kept while it may be
    one being created right now, removed once no orphan of it can be alive."""
    old = tmp_path / f"{PREFIX}old"
    young = tmp_path / f"{PREFIX}young"
    for d in (old, young):
        d.mkdir()
        (d / "slot-0-1").write_bytes(b"\0" * 256)
    past = time.time() - UNLOCKED_AFTER_S - 60
    os.utime(old, (past, past))
    (tmp_path / f"{PREFIX}a-file").write_text("not a folder")
    (tmp_path / "other").mkdir()
    assert remove_abandoned(str(tmp_path)) == [str(old)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{PREFIX}a-file", f"{PREFIX}young", "other"])
