"""Bad input: one clear line naming the problem and the fix, a distinct non-zero exit code, and
nothing lost or joined. Real ksup processes against the real broker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.harness import REPO
from tests.kafkautil import create_topic, free_port_unused

pytestmark = pytest.mark.kafka

BOOT_FAILED, BROKER_UNREACHABLE, CONFIG = 3, 7, 78


def groups(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    result = admin.list_consumer_groups(request_timeout=10).result()
    return {g.group_id for g in result.valid}


def run_ksup(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "start", "--log-format", "text", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def bad_modules(tmp_path: Path) -> Path:
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('database URL missing')\n")
    (tmp_path / "not_callable.py").write_text("process = 42\n")
    (tmp_path / "imports_missing.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "good.py").write_text("def process(record):\n    pass\n")
    return tmp_path


@pytest.mark.parametrize(("spec", "needle"), [
    ("no_such_module:process", "no module named 'no_such_module'"),
    ("good:missing", "has no attribute 'missing'"),
    ("not_callable:process", "is a int, not a function"),
    ("raises_on_import:process", "raised RuntimeError: database URL missing"),
    ("imports_missing:process", "importing 'imports_missing' failed: No module named 'no_such_dependency_xyz'"),
    ("no-colon-here", "is not of the form module:function"),
])
def test_bad_handler_spec_fails_fast_before_joining(bootstrap, names, bad_modules, spec, needle):
    topic, group = names
    create_topic(bootstrap, topic, 2)
    t0 = time.monotonic()
    proc = run_ksup([spec, "-b", bootstrap, "-t", topic, "-g", group, "-w", "3"], bad_modules)
    assert proc.returncode == BOOT_FAILED, proc.stderr
    line = last_line(proc)
    assert line.startswith("ksup: exit 3 (BOOT_FAILED): ") and needle in line, line
    assert time.monotonic() - t0 < 30
    assert group not in groups(bootstrap), "no worker may join the group with a bad handler"


def test_unknown_kafka_property(bootstrap, names, bad_modules):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    proc = run_ksup(["good:process", "-b", bootstrap, "-t", topic, "-g", group, "-X", "fetch.wait.max.mss=5"],
                    bad_modules)
    assert proc.returncode == CONFIG, proc.stderr
    assert "No such configuration property: \"fetch.wait.max.mss\"" in last_line(proc)
    assert group not in groups(bootstrap)


def test_a_receipt_path_that_cannot_be_written_is_refused_at_start(bootstrap, names, bad_modules):
    """Found at start, not after the whole run when the receipt is due (ksup then exited 0 with no
    receipt): one line naming --receipt, CONFIG, and the group never joined."""
    topic, group = names
    create_topic(bootstrap, topic, 1)
    proc = run_ksup(["good:process", "-b", bootstrap, "-t", topic, "-g", group,
                     "--receipt", str(bad_modules / "missing-dir" / "receipt.json")], bad_modules)
    assert proc.returncode == CONFIG, proc.stderr
    assert "--receipt" in last_line(proc) and "does not exist" in last_line(proc), last_line(proc)
    assert group not in groups(bootstrap)


def test_unknown_config_file_key(bootstrap, names, bad_modules):
    topic, group = names
    cfg = bad_modules / "ksup.toml"
    cfg.write_text(textwrap.dedent(f"""
        bootstrap_servers = "{bootstrap}"
        topics = ["{topic}"]
        group = "{group}"
        wokers = 3
    """))
    proc = run_ksup(["good:process", "--config", str(cfg)], bad_modules)
    assert proc.returncode == CONFIG
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]], "one line only"
    assert "unknown config key 'wokers'" in proc.stderr and "workers" in proc.stderr


@pytest.mark.parametrize("prop", ["enable.auto.offset.store=true", "enable.auto.commit=false"])
def test_offset_unsafe_settings_are_refused(bootstrap, names, bad_modules, prop):
    topic, group = names
    proc = run_ksup(["good:process", "-b", bootstrap, "-t", topic, "-g", group, "-X", prop], bad_modules)
    assert proc.returncode == CONFIG
    assert "is refused: ksup stores an offset only after the handler finished" in proc.stderr


def test_unreachable_broker_is_a_bounded_clear_error(names, bad_modules):
    topic, group = names
    port = free_port_unused()
    t0 = time.monotonic()
    proc = run_ksup(["good:process", "-b", f"127.0.0.1:{port}", "-t", topic, "-g", group,
                     "--broker-timeout", "3", "-w", "2"], bad_modules)
    assert proc.returncode == BROKER_UNREACHABLE, proc.stderr
    assert f"no Kafka broker answered at 127.0.0.1:{port} within 3s" in last_line(proc)
    assert time.monotonic() - t0 < 30


def test_missing_topic(bootstrap, names, bad_modules):
    topic, group = names
    proc = run_ksup(["good:process", "-b", bootstrap, "-t", topic, "-g", group], bad_modules)
    assert proc.returncode == BROKER_UNREACHABLE, proc.stderr
    assert f"topic '{topic}' does not exist" in last_line(proc)


def test_missing_required_options(bad_modules):
    proc = run_ksup(["good:process"], bad_modules)
    assert proc.returncode == CONFIG
    assert "no topic given" in proc.stderr


@pytest.mark.parametrize("option, value", [("--graceful-timeout", "nan"), ("--quick-timeout", "inf"),
                                           ("--revoke-timeout", "-inf"), ("--handler-timeout", "nan"),
                                           ("--batch-timeout", "nan"), ("--restart-delay", "nan")])
def test_a_time_that_is_not_a_finite_number_of_seconds_is_refused(bad_modules, option, value):
    """Hostile review: --graceful-timeout nan passed the "must be positive" check (nan <= 0 is
    false); the SIGKILL deadline became nan, which no time ever reaches, so a worker that could
    not drain by itself was never killed and ksup never exited."""
    proc = run_ksup(["good:process", "-b", "127.0.0.1:1", "-t", "t", "-g", "g", option, value], bad_modules)
    assert proc.returncode == CONFIG, proc.stderr
    line = last_line(proc)
    assert option in line and "finite" in line, line
