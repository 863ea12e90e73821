"""HandlerRunner: runs the user's handler on its own thread (child side).

Why a thread: the consumer thread must keep serving the consumer (rebalance callbacks,
``max.poll.interval.ms``, drain requests) while a slow handler runs. The handler thread never
touches the Consumer (confluent-kafka 2.16 serialises calls across threads, and a handler
thread calling it while ``on_revoke`` waits for that thread would deadlock); it only moves
messages from ``backlog`` to ``done``.

Contract with the consumer thread:
- ``submit`` appends work; messages of one partition run in the order submitted.
- ``take_done`` returns finished work: (job, error) with error None on success.
- After a handler raised, the runner stops taking work (policy "stop"): ``failure`` is set.
- ``drop`` removes queued (not started) work for partitions; ``wait_not_running`` waits for the
  message in flight of those partitions to finish.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.record import Record

TP = tuple[str, int]


@dataclass(slots=True)
class Job:
    record: Record
    epoch: int  # OffsetBook epoch of the partition when the message was fetched

    @property
    def tp(self) -> TP:
        return (self.record.topic, self.record.partition)


class HandlerRunner:
    def __init__(self, process: Callable[[Record], Any]) -> None:
        self._process = process
        self._cond = threading.Condition()
        self._backlog: deque[Job] = deque()
        self._done: list[tuple[Job, BaseException | None]] = []
        self.running: Job | None = None
        self.running_since = 0.0  # wall clock, for reports
        self.failure: tuple[Job, BaseException] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ksup-handler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- consumer-thread API ----------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        with self._cond:
            self._backlog.extend(jobs)
            self._cond.notify_all()

    def backlog_size(self) -> int:
        return len(self._backlog)

    def busy(self) -> bool:
        return self.running is not None or bool(self._backlog)

    def take_done(self) -> list[tuple[Job, BaseException | None]]:
        with self._cond:
            done, self._done = self._done, []
        return done

    def wait_progress(self, timeout: float) -> None:
        """Block up to ``timeout`` until something finished (or return at once if it has)."""
        with self._cond:
            if not self._done and (self.running is not None or self._backlog):
                self._cond.wait(timeout)

    def drop(self, tps: set[TP]) -> int:
        """Forget queued work of these partitions; returns how many messages were dropped."""
        with self._cond:
            keep = deque(j for j in self._backlog if j.tp not in tps)
            dropped = len(self._backlog) - len(keep)
            self._backlog = keep
        return dropped

    def wait_not_running(self, tps: set[TP] | None, deadline: float) -> bool:
        """Wait until no message of ``tps`` (None: of any partition) is in the handler, or the
        monotonic ``deadline`` passed. True when nothing of theirs is running."""
        with self._cond:
            while True:
                job = self.running
                if job is None or (tps is not None and job.tp not in tps):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))

    def stop(self) -> None:
        """Take no more work: clear the backlog; the message in flight still finishes."""
        with self._cond:
            self._stopping = True
            self._backlog.clear()
            self._cond.notify_all()

    # ---- handler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        cond, backlog, process = self._cond, self._backlog, self._process
        while True:
            with cond:
                while not self._backlog and not self._stopping:
                    cond.wait()
                if self._stopping:
                    return
                backlog = self._backlog
                job = backlog.popleft()
                self.running, self.running_since = job, time.time()
            error: BaseException | None = None
            try:
                process(job.record)
            except BaseException as exc:  # noqa: BLE001 - the policy decides, not the thread
                error = exc
            with cond:
                self._done.append((job, error))
                self.running = None
                if error is not None:
                    self.failure = (job, error)
                    self._stopping = True
                    self._backlog.clear()
                cond.notify_all()
                if error is not None:
                    return
