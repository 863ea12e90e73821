"""Pure logic without a broker: wire format, the offset book, config validation, policies."""

from __future__ import annotations

import time

import pytest

from supervisor import config
from supervisor.child.offsets import OffsetBook
from supervisor.child.runner import HandlerRunner, Job
from supervisor.contract import codec
from supervisor.contract import messages as m
from supervisor.contract.exitcodes import ExitCode, WorkerExit, describe_returncode
from supervisor.errors import ConfigError
from supervisor.parent import policy
from supervisor.record import Record


@pytest.mark.parametrize("msg", [
    m.Configure(1, "h:p", ["t"], {"a": "b"}, {"x": 1.5}),
    m.Go(), m.Drain(3.0, "why"), m.Leave(), m.Loaded(5, "h:p", "2.16.1"), m.BootFailed(5, 3, "bad"),
    m.Report(5, "assigned", ["t[0]"], m.InFlight("t", 0, 7, 1.0), 3, 0, {"t[0]": 4}, {"t[0]": 4}, 100),
    m.ReadyToLeave(5),
    m.Exiting(5, 0, "done", [m.PartitionReceipt("t[0]", 6, 7)], m.InFlight("t", 1, 2, 3.0)),
])
def test_codec_round_trip(msg):
    assert codec.decode(codec.encode(msg).rstrip(b"\n")) == msg


@pytest.mark.parametrize("line", [b"not json", b'{"type": "Nope"}', b'{"type": "Drain", "bogus": 1}', b"[]"])
def test_codec_rejects_garbage(line):
    with pytest.raises(codec.CodecError):
        codec.decode(line)


def test_offset_book_stores_only_finished_and_fences_late_completions():
    book = OffsetBook()
    tp = ("t", 0)
    book.acquire([tp])
    e1 = book.epoch_of(tp)
    assert book.mark_done(tp, 5, e1)
    assert book.take_dirty() == {tp: 6}
    assert book.take_dirty() == {}
    book.release([tp])
    assert not book.mark_done(tp, 6, e1), "a completion after revoke must not be stored"
    book.acquire([tp])  # assigned again: a new epoch
    assert not book.mark_done(tp, 7, e1), "nor one from the earlier assignment"
    assert book.mark_done(tp, 7, book.epoch_of(tp))
    assert book.take_dirty() == {tp: 8}
    assert book.fenced == 2
    assert not book.mark_done(tp, 3, book.epoch_of(tp)) or book.take_dirty() == {}, "never backwards"


def _rec(p: int, o: int) -> Record:
    return Record("t", p, o, None, None, [], (0, 0))


def test_runner_stops_after_a_failure_and_keeps_order():
    seen: list[int] = []

    def handler(r: Record) -> None:
        if r.offset == 2:
            raise ValueError("boom")
        seen.append(r.offset)

    runner = HandlerRunner(handler)
    runner.start()
    runner.submit([Job(_rec(0, o), 1) for o in range(5)])
    deadline = time.monotonic() + 5
    while runner.failure is None and time.monotonic() < deadline:
        runner.wait_progress(0.05)
    done = runner.take_done()
    assert [j.record.offset for j, e in done] == [0, 1, 2]
    assert isinstance(done[-1][1], ValueError)
    assert seen == [0, 1]
    assert not runner.busy()


def test_runner_drop_removes_only_queued_work_of_those_partitions():
    runner = HandlerRunner(lambda r: None)  # not started: everything stays queued
    runner.submit([Job(_rec(p, o), 1) for p in (0, 1) for o in range(3)])
    assert runner.drop({("t", 0)}) == 3
    assert runner.backlog_size() == 3


def _settings(**kw):
    base = dict(handler="h:p", topics=("t",), group="g", bootstrap_servers="127.0.0.1:1")
    return config.build({**base, **kw})


def test_config_refuses_offset_unsafe_settings():
    with pytest.raises(ConfigError, match="enable.auto.offset.store=true is refused"):
        _settings(kafka={"enable.auto.offset.store": "true"})
    with pytest.raises(ConfigError, match="enable.auto.commit=false is refused"):
        _settings(kafka={"enable.auto.commit": "false"})
    with pytest.raises(ConfigError, match="cannot be set with --group-protocol consumer"):
        _settings(group_protocol="consumer", kafka={"session.timeout.ms": "6000"})


def test_kafka_config_forces_the_offset_contract():
    s = _settings(kafka={"auto.offset.reset": "latest", "enable.auto.offset.store": "false"})
    conf = config.kafka_config(s, 2)
    assert conf["enable.auto.offset.store"] == "false" and conf["enable.auto.commit"] == "true"
    assert conf["auto.offset.reset"] == "latest"
    assert conf["partition.assignment.strategy"] == "cooperative-sticky"
    assert conf["client.id"].endswith("-g-2")


def test_config_file_unknown_key(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('group = "g"\nwokers = 2\n')
    with pytest.raises(ConfigError, match="unknown config key 'wokers'"):
        config.load_file(str(f))
    f.write_text('topic = "a"\n[kafka]\n"fetch.min.bytes" = 10\n"check.crcs" = true\n')
    assert config.load_file(str(f)) == {"topics": ("a",), "kafka": {"fetch.min.bytes": "10", "check.crcs": "true"}}


def test_restart_backoff_and_crash_loop():
    assert policy.restart_delay([100.0], 100.0, 1.0) == 1.0
    assert policy.restart_delay([97.0, 98.0, 99.0, 100.0], 100.0, 1.0) == 8.0
    assert policy.restart_delay([float(t) for t in range(20)], 20.0, 1.0) == policy.MAX_RESTART_DELAY_S
    assert policy.restart_delay([0.0, 1.0], 500.0, 1.0) == 1.0, "reset after a healthy period"
    assert policy.is_crash_loop([1, 2, 3, 4, 5], 6, 5, 60)
    assert not policy.is_crash_loop([1, 2, 3, 4, 5], 100, 5, 60)


def test_exit_codes():
    assert policy.final_exit_code([0, 0], forced=False) == ExitCode.OK
    assert policy.final_exit_code([0, None], forced=False) == ExitCode.FORCED
    assert policy.final_exit_code([0, WorkerExit.DRAIN_TIMEOUT], forced=False) == ExitCode.FORCED
    assert policy.final_exit_code([0, WorkerExit.COMMIT_FAILED], forced=False) == ExitCode.COMMIT_FAILED
    assert policy.halt_code_for_boot_failure(WorkerExit.CONFIG) == ExitCode.CONFIG
    assert policy.halt_code_for_boot_failure(WorkerExit.BOOT_FAILED) == ExitCode.BOOT_FAILED
    assert describe_returncode(-9).describe() == "killed by SIGKILL"
    assert describe_returncode(10).describe() == "exit 10 (HANDLER_FAILED)"
