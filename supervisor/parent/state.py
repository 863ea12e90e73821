"""The parent's states, as enums (never strings): the supervisor's life cycle, one worker
process's life in its slot, what follows its exit, and the phase of a rolling reload."""

from enum import Enum


class State(Enum):
    """The supervisor: STARTING (workers boot, then wait) -> RUNNING (all loaded, told to join)
    -> STOPPING (told to drain) -> STOPPED."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SlotState(Enum):
    """One worker process, forward only: BOOTING -> LOADED -> RUNNING -> DRAINING -> EXITED."""

    BOOTING = "booting"
    LOADED = "loaded"
    RUNNING = "running"
    DRAINING = "draining"
    EXITED = "exited"

    @property
    def rank(self) -> int:
        return _ORDER.index(self)


_ORDER = list(SlotState)


class After(Enum):
    """What follows when a slot's process exits."""

    RESTART = "restart"    # an unexpected death: restart with backoff (or halt on a crash loop)
    RECYCLE = "recycle"    # --max-messages / --max-memory: start a fresh one at once
    REMOVE = "remove"      # scaled down: the slot goes away
    REPLACED = "replaced"  # rolling reload: the incoming process takes the slot


class RollPhase(Enum):
    """One slot of a rolling reload: BOOT the incoming process next to the old one, DRAIN the
    old one, then the incoming one JOINs; DONE when the roll is over (finished or stopped)."""

    BOOT = "boot"
    DRAIN = "drain"
    JOIN = "join"
    DONE = "done"
