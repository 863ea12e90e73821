"""Releases that change the code must not break a running supervisor: a new release whose
``setup()`` raises, or whose worker speaks a slightly newer wire format, is handled by a real
``ksup reload`` without losing anything and without taking down the old workers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.contract import codec
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import WorkerExit
from tests.harness import REPO, ksup_cli, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, produce_sequence
from tests.test_rolling_reload import HANDLER_CODE, rows

pytestmark = pytest.mark.kafka

CLASS_HANDLER = '''
import os
VERSION = "{version}"
_fd = os.open(os.environ["KSUP_TEST_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

class Versioned:
    def setup(self):
        {setup}

    def process(self, record):
        os.write(_fd, f"{{record.partition}} {{record.offset}} {{os.getpid()}} {{VERSION}}\\n".encode())
'''


def test_reload_whose_setup_raises_stops_the_roll_and_the_old_worker_keeps_consuming(
        ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 100, partitions=2)
    (tmp_path / "versioned.py").write_text(CLASS_HANDLER.format(version="v1", setup="pass"))
    record = tmp_path / "record.txt"
    run = ksup("versioned:Versioned", bootstrap, topic, group, workers=1, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "PYTHONDONTWRITEBYTECODE": "1"})
    wait_until(lambda: len(rows(record)) >= 100, 60, "first batch processed")
    pids_before = set(run.worker_pids())
    (tmp_path / "versioned.py").write_text(CLASS_HANDLER.format(
        version="v2", setup="raise RuntimeError('cannot reach the billing database')"))
    out = ksup_cli("reload", "-g", group, "--wait", timeout=180)
    assert out.returncode != 0, out.stdout + out.stderr + run.tail()
    assert "setup() raised RuntimeError: cannot reach the billing database" in out.stderr, out.stderr
    assert set(run.worker_pids()) == pids_before, "the old worker keeps running"
    # The old worker keeps consuming: the handler's own record grows after the failed reload.
    produce_sequence(bootstrap, topic, 100, start=100, partitions=2)
    wait_until(lambda: len(rows(record)) >= 200, 60, "consumption goes on after the failed reload")
    got = rows(record)
    assert {v for *_, v in got} == {"v1"}
    assert sorted((p, o) for p, o, _, _ in got) == sorted((n % 2, n // 2) for n in range(200)), "nothing lost"
    ends = end_offsets(bootstrap, topic, 2)
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 2) == ends, 60, "all committed", 0.5)
    assert run.stop() == 0, run.tail()


def _release_copy(dest: Path, mark: Path, messages_patch: tuple[str, str]) -> None:
    """A "new ksup release" installed next to the running one: a copy of the supervisor package in
    the supervisor's working directory, which comes first on a *new* worker's import path
    (``python -m`` puts the working directory first), while the running supervisor keeps the
    package it already imported. The copy's messages.py is patched like a real release would
    change it, and writes the importing pid to ``mark`` (so the test knows who runs the copy)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO / "supervisor", dest, ignore=shutil.ignore_patterns("__pycache__"))
    path = dest / "contract" / "messages.py"
    text = path.read_text()
    old, new = messages_patch
    assert old in text
    text = text.replace(old, new)
    text += f"\nimport os as _os\nwith open({str(mark)!r}, 'a') as _f:\n    _f.write(f'{{_os.getpid()}}\\n')\n"
    path.write_text(text)


def _pids(mark: Path) -> set[int]:
    return {int(x) for x in mark.read_text().split()} if mark.exists() else set()


def test_reload_across_wire_format_changes(ksup, bootstrap, names, tmp_path):
    """One supervisor, two releases of the worker code:

    1. the new release adds a field to Loaded and to Report (with a default, as the
       compatibility rule asks): the old supervisor ignores it, the roll completes, and the new
       worker's reports are read (its processed count reaches ``ksup status``);
    2. the next release bumps the protocol version: its worker refuses the old supervisor with
       exit 15 and a reason naming both versions; the roll stops and the running worker keeps
       consuming. Nothing is lost throughout (the handler's own record and the broker's
       committed offsets)."""
    topic, group = names
    create_topic(bootstrap, topic, 2)
    produce_sequence(bootstrap, topic, 100, partitions=2)
    (tmp_path / "versioned.py").write_text(HANDLER_CODE.format(version="v1"))
    record, mark = tmp_path / "record.txt", tmp_path / "copy-importers.txt"
    run = ksup("versioned:process", bootstrap, topic, group, workers=1, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(record), "PYTHONDONTWRITEBYTECODE": "1"})
    wait_until(lambda: len(rows(record)) >= 100, 60, "first batch processed")

    field = "    at: float = 0.0\n"
    _release_copy(tmp_path / "supervisor", mark, (
        "    handler_version: str = \"\"  # the version of the package the handler comes from, when known\n",
        "    handler_version: str = \"\"  # the version of the package the handler comes from, when known\n"
        "    added_in_new_release: str = \"loaded\"\n"))
    text = (tmp_path / "supervisor/contract/messages.py").read_text()
    (tmp_path / "supervisor/contract/messages.py").write_text(
        text.replace(field, field + "    also_added: dict[str, int] = field(default_factory=lambda: {'x': 1})\n", 1))
    out = ksup_cli("reload", "-g", group, "--wait", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr + run.tail()
    new_pid = int(out.stdout.split("->")[1].split(",")[0])
    assert _pids(mark) == {new_pid}, "the new worker, and only it, runs the new release"
    produce_sequence(bootstrap, topic, 100, start=100, partitions=2)
    wait_until(lambda: len(rows(record)) >= 200, 60, "the new release consumes")

    def processed_by_new() -> int:
        st = json.loads(ksup_cli("status", "-g", group, "--json").stdout)
        return sum(w.get("processed", 0) for w in st["workers"] if w.get("pid") == new_pid)

    wait_until(lambda: processed_by_new() >= 100, 30, "the old supervisor reads the new worker's reports")

    _release_copy(tmp_path / "supervisor", mark, (
        "PROTOCOL_VERSION = 1\n", "PROTOCOL_VERSION = 2\n"))
    out = ksup_cli("reload", "-g", group, "--wait", timeout=120)
    assert out.returncode != 0, out.stdout + out.stderr + run.tail()
    assert "supervisor speaks ksup protocol version 1, this worker speaks version 2" in out.stderr, out.stderr
    assert run.worker_pids() == [new_pid], "the running worker is untouched"
    produce_sequence(bootstrap, topic, 100, start=200, partitions=2)
    wait_until(lambda: len(rows(record)) >= 300, 60, "consumption goes on after the refused release")

    got = rows(record)
    assert sorted((p, o) for p, o, _, _ in got) == sorted((n % 2, n // 2) for n in range(300)), "nothing lost"
    ends = end_offsets(bootstrap, topic, 2)
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 2) == ends, 60, "all committed", 0.5)
    assert run.stop() == 0, run.tail()
    assert run.proc.pid not in _pids(mark), "the supervisor never loaded the copy"


def test_worker_refuses_a_configure_of_another_protocol_version_with_exit_15():
    """The worker side of the version check, as a real process on a real socket pair: the
    supervisor's Configure says version 2, the worker answers BootFailed(15, reason) and exits 15."""
    parent, child = socket.socketpair()
    try:
        os.set_inheritable(child.fileno(), True)
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.child", str(child.fileno())],
                                pass_fds=(child.fileno(),), cwd=REPO, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        child.close()
        body = json.loads(codec.encode(m.Configure(0, "h:p", ["t"], {}, {})))
        body["version"] = m.PROTOCOL_VERSION + 1
        parent.sendall(json.dumps(body).encode() + b"\n")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == WorkerExit.INCOMPATIBLE_SUPERVISOR == 15, err
        parent.settimeout(5)
        reply = codec.decode(parent.recv(65536).split(b"\n")[0])
        assert isinstance(reply, m.BootFailed) and reply.exit_code == 15
        assert f"protocol version {m.PROTOCOL_VERSION + 1}, this worker speaks version {m.PROTOCOL_VERSION}" \
            in reply.reason
        assert "same ksup release" in reply.reason
    finally:
        parent.close()
