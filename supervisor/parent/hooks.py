"""Hooks: how adapters (control socket, pidfile, systemd, metrics) follow the supervisor without
the loop knowing them. Every hook is called from the loop thread and must not block or raise."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervisor.contract.exitcodes import ExitReport
    from supervisor.parent.slots import WorkerSlot

log = logging.getLogger("ksup.supervisor")


class Hooks:
    """No-op base; adapters override what they need. ``sup`` is the Supervisor."""

    def on_start(self, sup: Any) -> None: ...
    def on_tick(self, sup: Any) -> None: ...
    def on_worker_exit(self, sup: Any, slot: WorkerSlot, report: ExitReport) -> None: ...
    def on_stopping(self, sup: Any) -> None: ...
    def on_reload_start(self, sup: Any) -> None: ...
    def on_reload_done(self, sup: Any, summary: dict[str, Any]) -> None: ...
    def on_exit(self, sup: Any, exit_code: int) -> None: ...


NullHooks = Hooks


class AllHooks(Hooks):
    """Fans each call out to several adapters; one adapter's failure is logged, not raised."""

    def __init__(self, *hooks: Hooks) -> None:
        self.hooks = hooks

    def _each(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, name)(*args)
            except Exception:
                log.exception("%s.%s failed", type(hook).__name__, name)

    def on_start(self, sup: Any) -> None:
        # Start-up failures (a socket already in use) must stop ksup, so these are not swallowed.
        for hook in self.hooks:
            hook.on_start(sup)

    def on_tick(self, sup: Any) -> None:
        self._each("on_tick", sup)

    def on_worker_exit(self, sup: Any, slot: WorkerSlot, report: ExitReport) -> None:
        self._each("on_worker_exit", sup, slot, report)

    def on_stopping(self, sup: Any) -> None:
        self._each("on_stopping", sup)

    def on_reload_start(self, sup: Any) -> None:
        self._each("on_reload_start", sup)

    def on_reload_done(self, sup: Any, summary: dict[str, Any]) -> None:
        self._each("on_reload_done", sup, summary)

    def on_exit(self, sup: Any, exit_code: int) -> None:
        self._each("on_exit", sup, exit_code)
