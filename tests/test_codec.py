"""The supervisor <-> worker wire format is evolvable (pure logic, no broker): a peer from a newer
release may add fields to any message and the reader ignores them; a line that is not a ksup
message is logged (rate-limited) and skipped; a Configure from an incompatible protocol version
is recognised as such, so the worker can refuse it with a clear reason."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket

import pytest

from supervisor.contract import codec
from supervisor.contract import messages as m
from supervisor.contract.channel import Channel

EXAMPLES: list[m.Message] = [
    m.Configure(1, "h:p", ["t"], {"a": "b"}, {"x": 1.5}),
    m.Go(), m.Drain(3.0, "why"), m.Leave(), m.Loaded(5, "h:p", "2.16.1"), m.BootFailed(5, 3, "bad"),
    m.Report(5, "assigned", ["t[0]"], m.InFlight("t", 0, 7, 1.0), 3, 0, {"t[0]": 4}, {"t[0]": 4}, 100),
    m.ReadyToLeave(5),
    m.Exiting(5, 0, "done", [m.PartitionReceipt("t[0]", 6, 7)], m.InFlight("t", 1, 2, 3.0)),
]


def _with_extra(msg: m.Message) -> bytes:
    """``msg`` as a newer release would send it: extra fields at top level and in nested objects."""
    body = json.loads(codec.encode(msg))
    body["added_in_a_later_release"] = {"any": ["json"]}
    for nested in ("in_flight", "abandoned"):
        if isinstance(body.get(nested), dict):
            body[nested]["new_nested_field"] = 1
    for r in body.get("receipt", []):
        r["new_receipt_field"] = "x"
    return json.dumps(body).encode()


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_unknown_fields_are_ignored_for_every_message_type(msg):
    assert codec.decode(_with_extra(msg)) == msg


def test_every_message_type_is_covered():
    assert {type(msg) for msg in EXAMPLES} == set(codec._TYPES.values())


def test_a_missing_required_field_is_a_codec_error():
    body = json.loads(codec.encode(m.BootFailed(5, 3, "bad")))
    del body["reason"]
    with pytest.raises(codec.CodecError, match="BootFailed"):
        codec.decode(json.dumps(body).encode())


def test_configure_of_another_protocol_version_is_incompatible_even_when_it_does_not_decode():
    newer = {"type": "Configure", "version": m.PROTOCOL_VERSION + 1, "renamed_slot": 0}
    with pytest.raises(codec.IncompatibleVersion) as info:
        codec.decode(json.dumps(newer).encode())
    assert info.value.theirs == m.PROTOCOL_VERSION + 1
    assert str(m.PROTOCOL_VERSION) in str(info.value) and str(m.PROTOCOL_VERSION + 1) in str(info.value)


def test_compatible_versions_rule():
    assert codec.compatible(m.PROTOCOL_VERSION)
    assert not codec.compatible(m.PROTOCOL_VERSION + 1)
    assert not codec.compatible(None)


def test_channel_logs_undecodable_lines_rate_limited_and_keeps_the_good_ones(caplog):
    a, b = socket.socketpair()
    try:
        chan = Channel(a)
        garbage = b"".join(b"not json %d\n" % i for i in range(50))
        b.sendall(garbage + codec.encode(m.ReadyToLeave(7)) + b'{"type": "Nope"}\n')
        with caplog.at_level(logging.WARNING, logger="ksup.channel"):
            got = chan.read_available()
        assert got == [m.ReadyToLeave(7)]
        warnings = [r for r in caplog.records if r.name == "ksup.channel"]
        assert 1 <= len(warnings) <= 5, [r.getMessage() for r in warnings]
        assert "not json 0" in warnings[0].getMessage()
        assert chan.decode_errors == 51
    finally:
        a.close()
        b.close()


def test_channel_remembers_an_incompatible_configure():
    a, b = socket.socketpair()
    try:
        chan = Channel(a)
        b.sendall(json.dumps({"type": "Configure", "version": 99}).encode() + b"\n")
        assert chan.read_available() == []
        assert chan.incompatible is not None and chan.incompatible.theirs == 99
    finally:
        a.close()
        b.close()


def test_a_field_added_with_a_default_is_additive():
    """The compatibility rule in code: every field added after version 1 has a default, so an
    older peer that omits it still decodes."""
    for cls in codec._TYPES.values():
        for f in dataclasses.fields(cls):
            if f.name in codec.FIELDS_OF_VERSION_1.get(cls.__name__, ()):
                continue
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, \
                f"{cls.__name__}.{f.name} was added without a default: older peers cannot send it"


def test_a_worker_waiting_for_go_keeps_what_came_right_after_it():
    """The worker's wait for Go (child/main.py _wait_for) reads whatever has arrived: a Drain
    sent right behind the Go (the supervisor's 'rejoin only to leave' at a stop) must still be
    read by the consumer loop afterwards, not dropped with the rest of that read."""
    from supervisor.child.liveness import ParentWatch
    from supervisor.child.main import _wait_for

    a, b = socket.socketpair()
    try:
        chan = Channel(a)
        b.sendall(codec.encode(m.Go()) + codec.encode(m.Drain(0.0, "leave", 10.0, leave_group=True)))
        assert _wait_for(chan, (m.Go, m.Drain), 5.0, ParentWatch()) == m.Go()
        assert chan.read_available() == [m.Drain(0.0, "leave", 10.0, leave_group=True)]
        assert chan.read_available() == []
    finally:
        a.close()
        b.close()
