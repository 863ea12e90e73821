"""The control socket against hostile clients (a hostile review of the supervisor side): a
request that is not what it should be, clients that connect and never send or never read.
The real ControlServer on a real Unix socket, served by a selector loop in this process as the
supervisor's loop serves it; the commands behind it are a stand-in that notes what it was asked."""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.adapters.control import ACCEPT_PAUSE_S, MAX_CONNECTIONS, REQUEST_TIMEOUT_S, ControlServer


class _Commands:
    def __init__(self) -> None:
        self.stops: list[float | None] = []

    def status(self) -> dict[str, Any]:
        return {"workers": []}

    def health(self) -> dict[str, Any]:
        return {"healthy": True, "problems": []}

    def ready(self) -> dict[str, Any]:
        return {"ready": True, "problems": []}

    def scale(self, workers: int) -> dict[str, Any]:
        return {"ok": True, "workers": workers}

    def request_stop(self, reason: str, timeout: float | None) -> dict[str, Any]:
        self.stops.append(timeout)
        return {"ok": True, "stopping": True}

    def reload(self) -> dict[str, Any]:
        return {"ok": True, "reloading": True}


@pytest.fixture
def server(tmp_path: Path):
    commands = _Commands()
    srv = ControlServer(str(tmp_path / "ctl.sock"), commands)
    selector = selectors.DefaultSelector()
    srv.open(selector)
    try:
        yield srv, selector, commands
    finally:
        srv.close(0)
        selector.close()


def _serve(selector: selectors.BaseSelector, rounds: int = 20) -> None:
    """What the supervisor's loop does with the control socket's events."""
    for _ in range(rounds):
        for key, _ in selector.select(0.01):
            key.data()


def _ask(srv: ControlServer, selector: selectors.BaseSelector, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(srv.path)
        c.sendall(line)
        _serve(selector)
        reply: dict[str, Any] = json.loads(c.recv(65536).splitlines()[0])
        return reply


def test_a_deeply_nested_request_is_an_error_reply_not_a_crash(server):
    """2,000 '[' (far under the size limit) made json.loads raise RecursionError, which is not a
    ValueError: it left the control server, the supervisor's loop unwound, every worker was
    SIGKILLed without a drain and ksup exited 1 (hostile review, reproduced against a real ksup)."""
    srv, selector, _ = server
    reply = _ask(srv, selector, b"[" * 2000 + b"\n")
    assert reply["ok"] is False and "malformed request" in reply["error"], reply
    assert _ask(srv, selector, b'{"cmd": "status"}\n')["ok"] is True  # and the server goes on


@pytest.mark.parametrize("timeout", ["NaN", "Infinity", "-Infinity", "0", "-5"])
def test_a_stop_timeout_that_is_not_a_positive_finite_number_is_refused(server, timeout):
    """`ksup stop --timeout nan` made the SIGKILL deadline nan, which no time reaches: a worker
    that could not drain by itself was never killed, and no later stop could shorten it."""
    srv, selector, commands = server
    reply = _ask(srv, selector, b'{"cmd": "stop", "timeout": %s}\n' % timeout.encode())
    assert reply["ok"] is False and "timeout" in reply["error"], reply
    assert commands.stops == []
    assert _ask(srv, selector, b'{"cmd": "stop", "timeout": 2.5}\n')["ok"] is True
    assert commands.stops == [2.5]


def _connect(srv: ControlServer) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(srv.path)
    return c


def _closed_by_server(c: socket.socket) -> bool:
    """The server closed it: end of file after whatever it said."""
    c.settimeout(0)
    try:
        while True:
            chunk = c.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False


def test_a_client_that_never_sends_a_request_is_closed_after_the_request_timeout(server):
    """Hostile review: connections that never sent a byte were kept for ever, with no cap; at
    the file limit accept() failed, the loop spun at 100% CPU, and the next worker restart could
    not make its socket pair and crashed the supervisor. The clock is the loop's (tick(now))."""
    srv, selector, _ = server
    idle, patient = _connect(srv), _connect(srv)
    try:
        _serve(selector)
        patient.sendall(b'{"cmd": "stop", "wait": true}\n')  # a waiter: kept until answered
        _serve(selector)
        srv.tick(time.monotonic() + REQUEST_TIMEOUT_S - 1)
        assert not _closed_by_server(idle)
        srv.tick(time.monotonic() + REQUEST_TIMEOUT_S + 0.1)
        assert _closed_by_server(idle)
        assert not _closed_by_server(patient) and srv.waiters
    finally:
        idle.close()
        patient.close()


def test_connections_beyond_the_cap_are_refused_at_once(server):
    srv, selector, _ = server
    clients = []
    try:
        for _ in range(MAX_CONNECTIONS):
            clients.append(_connect(srv))
            _serve(selector, 2)
        assert srv.connections() == MAX_CONNECTIONS
        extra = _connect(srv)
        clients.append(extra)
        _serve(selector, 2)
        assert b"too many control connections" in extra.recv(65536)
        assert _closed_by_server(extra)
        assert srv.connections() == MAX_CONNECTIONS
        clients.pop(0).close()  # one goes away: a new client is served again
        _serve(selector, 2)
        assert _ask(srv, selector, b'{"cmd": "health"}\n')["ok"] is True
    finally:
        for c in clients:
            c.close()


def test_a_reply_the_client_does_not_read_yet_never_blocks_the_loop_and_arrives_whole(server, monkeypatch):
    """A status reply larger than the socket's buffers, to a client that reads only later: the
    server sent it with a blocking sendall and a 2 s timeout, holding the loop and then cutting
    the reply short. Now the loop goes on and the reply goes out as the client takes it."""
    srv, selector, commands = server
    big = {"workers": [{"slot": i, "note": "x" * 1000} for i in range(3000)]}  # ~3 MB
    monkeypatch.setattr(commands, "status", lambda: big)
    c = _connect(srv)
    try:
        c.sendall(b'{"cmd": "status"}\n')
        _serve(selector, 5)  # the request is handled; the client has read nothing
        assert srv.connections() == 1  # its reply is still going out
        data = b""
        c.settimeout(0)
        deadline = time.monotonic() + 30
        while not data.endswith(b"\n"):
            assert time.monotonic() < deadline, f"reply incomplete: {len(data)} bytes"
            _serve(selector, 1)
            try:
                data += c.recv(1 << 20)
            except BlockingIOError:
                pass
        assert json.loads(data) == {"ok": True, **big}
        _serve(selector, 2)
        assert srv.connections() == 0
    finally:
        c.close()


def test_accept_failing_for_want_of_file_descriptors_pauses_listening_instead_of_spinning(server):
    """At the file limit accept() fails (EMFILE) and leaves the connection in the backlog: the
    listening socket stays readable, and the loop woke on it for ever (100% CPU). Now it stops
    listening for ACCEPT_PAUSE_S; the client is served once descriptors are free again."""
    srv, selector, _ = server
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        c.settimeout(5)
        c.connect(srv.path)  # in the backlog until accepted
        lowest_free = os.dup(0)  # a new descriptor gets the lowest free number
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # so accept() gets EMFILE
        try:
            wakes = 0
            for _ in range(20):
                for key, _ in selector.select(0.01):
                    wakes += 1
                    key.data()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert wakes == 1, f"the loop woke {wakes} times on a connection it could not accept"
        assert srv.connections() == 0  # not accepted
        srv.tick(time.monotonic() + ACCEPT_PAUSE_S)
        c.sendall(b'{"cmd": "health"}\n')
        _serve(selector, 5)
        assert json.loads(c.recv(65536).splitlines()[0])["ok"] is True
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        c.close()
