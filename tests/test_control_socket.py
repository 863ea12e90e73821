"""The control socket against hostile clients (a hostile review of the supervisor side): a
request that is not what it should be, clients that connect and never send or never read.
The real ControlServer on a real Unix socket, served by a selector loop in this process as the
supervisor's loop serves it; the commands behind it are a stand-in that notes what it was asked."""

from __future__ import annotations

import json
import selectors
import socket
from pathlib import Path
from typing import Any

import pytest

from supervisor.adapters.control import ControlServer


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
