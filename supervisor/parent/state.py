"""The supervisor's life cycle: STARTING (workers boot, then wait) -> RUNNING (all loaded, told
to join) -> STOPPING (told to drain) -> STOPPED."""

from enum import Enum


class State(Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
