"""Exceptions that cross module boundaries on the supervisor side."""

from __future__ import annotations

from supervisor.contract.exitcodes import ExitCode


class ConfigError(Exception):
    """Bad or unsafe configuration: one line naming the problem and the fix."""


class HaltSupervisor(Exception):
    """Raised anywhere in the supervisor loop to stop everything with ``exit_code``; caught only
    by ``Supervisor.run``."""

    def __init__(self, reason: str, exit_code: ExitCode) -> None:
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


class StartupError(Exception):
    """A resource the settings name (control socket, pidfile, metrics port) could not be set
    up: a configuration problem (exit 78), unlike an OS error once running (exit 1)."""
