"""The board folder's life (supervisor/parent/board_folder.py), without a broker: held by any
process that inherited its lock, removed by the next ksup once nobody holds it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor.parent.board_folder import PREFIX, BoardFolder, remove_abandoned


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


def test_a_folder_without_the_mark_is_never_touched(tmp_path):
    """Made by a ksup before these locks (whose workers may still run), or one being made right
    now (the mark comes after the lock): whatever its age."""
    legacy = tmp_path / f"{PREFIX}legacy"
    legacy.mkdir()
    (legacy / "slot-0-1").write_bytes(b"\0" * 256)
    os.utime(legacy, (0, 0))
    (tmp_path / f"{PREFIX}a-file").write_text("not a folder")
    (tmp_path / "elsewhere").mkdir()
    target = BoardFolder(str(tmp_path / "elsewhere"))  # abandoned, but reached through a link only
    os.close(target.hold_fd)
    (tmp_path / f"{PREFIX}a-link").symlink_to(target.path)
    assert remove_abandoned(str(tmp_path)) == []
    assert (legacy / "slot-0-1").exists()
    assert os.path.isdir(target.path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder of another user")
def test_another_users_folder_is_left_alone(tmp_path):
    folder = BoardFolder(str(tmp_path))
    os.close(folder.hold_fd)  # abandoned, but not ours
    os.chown(folder.path, 65534, 65534)
    assert remove_abandoned(str(tmp_path)) == []
    assert os.path.isdir(folder.path)


def test_a_folder_that_cannot_be_removed_does_not_stop_ksup(tmp_path):
    """rmtree recurses: a tree deeper than Python's recursion limit raised RecursionError, which
    ignore_errors does not cover, out of the supervisor's start, on every start."""
    folder = BoardFolder(str(tmp_path))
    os.close(folder.hold_fd)
    deep = folder.path
    for _ in range(1200):
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    try:
        assert remove_abandoned(str(tmp_path)) == []  # not removed: not reported as removed either
    finally:  # bottom-up without recursion, or pytest's own clean-up of old tmp folders trips on it
        while deep != folder.path:
            os.rmdir(deep)
            deep = os.path.dirname(deep)
