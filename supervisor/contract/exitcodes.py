"""Exit codes of the supervisor and of a worker, and decoding of wait statuses.

One table each, documented in the README; scripts act on these numbers.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """``ksup start`` / ``ksup stop`` exit codes."""

    OK = 0                  # every worker drained: finished in flight, committed, closed
    INTERNAL = 1            # a bug in ksup; the log has a traceback
    USAGE = 2               # bad command line (click's own code)
    BOOT_FAILED = 3         # the handler could not be imported or is not callable
    FORCED = 4              # graceful timeout hit: a worker was killed or abandoned a message
    COMMIT_FAILED = 5       # a worker's final synchronous commit failed (duplicates follow)
    CRASH_LOOP = 6          # workers kept dying; supervisor stopped instead of spinning
    BROKER_UNREACHABLE = 7  # no broker answered within --broker-timeout, or no such topic
    FENCED = 8              # another process uses our group.instance.id (same --instance-id-prefix in one group)
    BROKER_UNSUPPORTED = 9  # the broker lacks a feature the settings ask for (e.g. KIP-848 on Kafka 3.x)
    AUTH_FAILED = 13        # the broker refused ksup's credentials (SASL / TLS)
    CONFIG = 78             # EX_CONFIG: unknown or unsafe setting


class WorkerExit(IntEnum):
    """A worker process's exit codes (what the supervisor sees from waitpid)."""

    OK = 0
    INTERNAL = 70           # EX_SOFTWARE: a bug in the worker loop
    BOOT_FAILED = 3
    COMMIT_FAILED = 5
    BROKER_UNREACHABLE = 7
    HANDLER_FAILED = 10     # the handler raised; its message was not stored
    DRAIN_TIMEOUT = 11      # the handler did not finish within the drain timeout; not stored
    FENCED = 8              # the broker fenced this static member: another process has its group.instance.id
    BROKER_UNSUPPORTED = 9  # the broker lacks a feature the settings ask for (e.g. KIP-848 on Kafka 3.x)
    KAFKA_FATAL = 12        # librdkafka raised another fatal error
    AUTH_FAILED = 13        # the broker refused the worker's credentials (SASL / TLS)
    HANDLER_CRASHED = 14    # a handler thread died of an exception outside the handler (a policy or ksup bug)
    INCOMPATIBLE_SUPERVISOR = 15  # the supervisor speaks another wire-protocol version (mixed releases)
    INSTANCE_ID_HELD = 16   # KIP-848: the broker still holds our group.instance.id for another member
    #                         (UNRELEASED_INSTANCE_ID): a predecessor that died without leaving, until
    #                         its session expires, or another consumer using it
    NOT_STARTED = 71        # EX_OSERR: never ran; the supervisor could not start it (out of file
    #                         descriptors, processes or memory). Said by the supervisor, not by a worker
    CONFIG = 78


@dataclass(frozen=True)
class ExitReport:
    """How a process ended: ``code`` >= 0 for an exit, ``signal`` set when it was killed."""

    code: int | None
    signal: int | None

    def describe(self) -> str:
        if self.signal is not None:
            name = signal.Signals(self.signal).name if self.signal in _SIGNUMS else str(self.signal)
            return f"killed by {name}"
        try:
            return f"exit {self.code} ({WorkerExit(self.code).name})"  # type: ignore[arg-type]
        except ValueError:
            return f"exit {self.code}"


_SIGNUMS = {int(s) for s in signal.Signals}


def describe_returncode(returncode: int) -> ExitReport:
    """Decode a ``Popen.returncode`` (negative means killed by that signal)."""
    if returncode < 0:
        return ExitReport(code=None, signal=-returncode)
    return ExitReport(code=returncode, signal=None)


class VerifyExit(IntEnum):
    """``ksup verify``'s own exit codes (not ksup start's table: a verify that could not run is
    not a broker verdict)."""

    PROVED = 0          # nothing lost, every committed offset matches what was processed
    FAILED = 1          # a message lost, a committed offset ahead of processing, or a bound violated
    USAGE = 2
    COULD_NOT_RUN = 20  # broker, topic, its ksup or its producer failed, or it was interrupted: no verdict
