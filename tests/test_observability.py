"""Observability on a real run: /metrics values against what was produced and processed, health
endpoints that flip on a stuck handler, lag in ksup status, and secrets that never show."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from supervisor.logs import _Redact, redact, secret_values
from tests.harness import REPO, read_record, wait_until
from tests.kafkautil import committed_offsets, create_topic, end_offsets, free_port_unused, produce_sequence

SECRET = "TopSecret-4242-xyz"


def scrape(port: int) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def endpoint(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(name + "{") or k == name)


@pytest.mark.kafka
def test_metrics_match_what_was_produced_and_processed(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 4)
    produce_sequence(bootstrap, topic, 1200, partitions=4)
    ends = end_offsets(bootstrap, topic, 4)
    port = free_port_unused()
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group, workers=2,
               env={"KSUP_TEST_RECORD": str(tmp_path / "r.txt")}, extra=["--metrics-addr", f"127.0.0.1:{port}"])
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 4) == ends, 60, "all committed", 0.5)

    def caught_up() -> bool:
        try:
            got = scrape(port)
        except OSError:
            return False
        lags = [v for k, v in got.items() if k.startswith("ksup_consumer_lag{")]
        return total(got, "ksup_messages_processed_total") == len(read_record(tmp_path / "r.txt")) >= 1200 \
            and len(lags) == 4 and not any(lags)

    try:
        wait_until(caught_up, 60, "metrics caught up (processed as recorded, lag 0)")
    except AssertionError:
        got = scrape(port)
        raise AssertionError(f"records {len(read_record(tmp_path / 'r.txt'))}; metrics "
                             f"{ {k: v for k, v in got.items() if 'processed' in k or 'lag' in k or 'high' in k} }"
                             ) from None
    got = scrape(port)
    done = Counter(p for p, _, _ in read_record(tmp_path / "r.txt"))
    for p in range(4):
        labels = f'{{partition="{p}",topic="{topic}"}}'
        assert got[f"ksup_messages_processed_total{labels}"] == done[p] >= ends[p]
        assert got[f"ksup_committed_offset{labels}"] == ends[p]
        assert got[f"ksup_high_watermark{labels}"] == ends[p]
    assert got["ksup_handler_seconds_count"] == sum(done.values())
    assert got['ksup_handler_seconds_bucket{le="+Inf"}'] == sum(done.values())
    assert got["ksup_workers"] == 2 and got['ksup_supervisor_state{state="running"}'] == 1
    assert got['ksup_worker_state{slot="0",state="assigned"}'] == 1
    assert got['ksup_worker_rss_bytes{slot="1"}'] > 10 << 20
    # Ready once every worker sees the group settled (librdkafka's statistics, every second): a
    # worker whose last rebalance came after the others had handled everything may need a moment.
    paths = ("/livez", "/readyz", "/healthz")
    try:
        wait_until(lambda: [endpoint(port, p)[0] for p in paths] == [200, 200, 200], 30, "live, ready, healthy")
    except AssertionError:
        raise AssertionError({p: endpoint(port, p) for p in paths}) from None
    status = subprocess.run([sys.executable, "-m", "supervisor", "status", "-g", group], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert "lag 0" in status.stdout and "LAG" in status.stdout, status.stdout
    # Ctrl+C as at a terminal: a suite started in the background of a script inherits SIGINT
    # ignored (POSIX shells do that to background jobs), and Python then installs no handler.
    watch = subprocess.Popen([sys.executable, "-m", "supervisor", "status", "--watch", "-g", group],
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Read until two redraws arrived (bounded), then stop it with Ctrl+C.
    seen = b""
    deadline = time.monotonic() + 30
    while seen.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
        if select.select([watch.stdout], [], [], 0.5)[0]:
            seen += os.read(watch.stdout.fileno(), 65536)
    watch.send_signal(signal.SIGINT)
    rest, _ = watch.communicate(timeout=10)
    out = seen.decode() + rest
    assert out.count("\x1b[H\x1b[2J") >= 2 and out.count("SLOT") >= 2, "redrawn in place every second"
    assert run.stop() == 0


@pytest.mark.kafka
def test_stuck_handler_raises_lag_and_flips_healthz(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20)
    port = free_port_unused()
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(tmp_path / "r.txt"), "KSUP_TEST_HANG_AT": "0:5"},
               extra=["--metrics-addr", f"127.0.0.1:{port}", "--progress-timeout", "3", "--graceful-timeout", "6"])
    def stuck_reported() -> bool:
        if not _up(port):
            return False
        code, body = endpoint(port, "/healthz")
        return code == 503 and any(f"{topic}[0]: lag 15, committed offset stuck at 5" in p for p in body["problems"])

    wait_until(stuck_reported, 60, "/healthz reports the partition whose commits stopped")
    assert scrape(port)[f'ksup_consumer_lag{{partition="0",topic="{topic}"}}'] == 15
    assert endpoint(port, "/livez")[0] == 200, "the supervisor itself is alive"
    run.stop()


def _up(port: int) -> bool:
    try:
        endpoint(port, "/livez")
        return True
    except OSError:
        return False


@pytest.mark.kafka
def test_secrets_never_appear_in_logs_status_or_metrics(ksup, bootstrap, names, tmp_path):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 10)
    port = free_port_unused()
    run = ksup("tests.handlers.recording:process", bootstrap, topic, group,
               env={"KSUP_TEST_RECORD": str(tmp_path / "r.txt")},
               extra=["-X", f"sasl.password={SECRET}", "-X", "sasl.username=svc", "-X", "debug=conf",
                      "--metrics-addr", f"127.0.0.1:{port}", "--log-level", "debug"])
    wait_until(lambda: committed_offsets(bootstrap, group, topic, 1) == {0: 10}, 60, "all committed", 0.5)
    status = subprocess.run([sys.executable, "-m", "supervisor", "status", "--json", "-g", group], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert run.stop() == 0
    text = run.log_text()
    assert "sasl.password" in text, "librdkafka's debug=conf output did go through the logs"
    for where, content in (("logs", text), ("status", status.stdout), ("metrics", metrics),
                           ("receipt", run.receipt_path.read_text())):
        assert SECRET not in content, f"the secret leaked into the {where}"


def test_redaction_helpers():
    secrets = secret_values({"sasl.password": SECRET, "ssl.key.password": "1", "group.id": "g",
                             "sasl.oauthbearer.client.secret": "abcd-efgh"})
    assert secrets == [SECRET, "abcd-efgh", "1"]  # a short secret too (redacted as a whole word)
    assert redact("ssl.key.password=1 on partition 12", secrets) == "ssl.key.password=*** on partition 12"
    assert redact(f"login with {SECRET} failed", secrets) == "login with *** failed"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad %s", (SECRET,), None)
    _Redact(secrets).filter(record)
    assert record.getMessage() == "bad ***"
