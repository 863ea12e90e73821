"""One Arroyo consumer for the peers benchmark, run with the interpreter of Arroyo's own virtual
environment (it brings its own confluent-kafka): ``python peer_arroyo.py MODE BOOTSTRAP TOPIC
COUNT OUT``. MODE is ``run-task`` (RunTask, one process) or ``multiprocessing``
(RunTaskWithMultiprocessing with BENCH_PROCESSES processes). The no-op function does what the
ksup benchmark's handler does; the main process counts what the strategy hands on and writes
"pid first last count cpu librdkafka" to OUT once COUNT messages are through (cpu: this process
and its children, all threads), then shuts down."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import psutil
from arroyo.backends.kafka import KafkaConsumer, KafkaPayload
from arroyo.backends.kafka.configuration import build_kafka_consumer_configuration
from arroyo.processing import StreamProcessor
from arroyo.processing.strategies import CommitOffsets, ProcessingStrategy, ProcessingStrategyFactory, RunTask
from arroyo.processing.strategies.run_task_with_multiprocessing import (
    MultiprocessingPool,
    RunTaskWithMultiprocessing,
)
from arroyo.types import Commit, Message, Topic
from confluent_kafka import libversion


def noop(message: Message[KafkaPayload]) -> None:
    """Module level, so that the multiprocessing pool can pickle it."""
    return None


def tree_cpu() -> float:
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class Count(ProcessingStrategy[Any]):
    """Counts the messages the processing step hands on, then passes them to the commit step."""

    def __init__(self, next_step: ProcessingStrategy[Any], count: int, out: str, stop: Any) -> None:
        self.next_step, self.count, self.out, self.stop = next_step, count, out, stop
        self.seen, self.first, self.first_cpu = 0, 0.0, 0.0

    def submit(self, message: Message[Any]) -> None:
        if self.seen == 0:
            self.first, self.first_cpu = time.monotonic(), tree_cpu()
        self.seen += 1
        if self.seen == self.count:
            with open(self.out, "a") as f:
                f.write(f"{os.getpid()} {self.first} {time.monotonic()} {self.seen} "
                        f"{tree_cpu() - self.first_cpu} {libversion()[0]}\n")
            self.stop()
        self.next_step.submit(message)

    def poll(self) -> None:
        self.next_step.poll()

    def join(self, timeout: float | None = None) -> None:
        self.next_step.join(timeout)

    def close(self) -> None:
        self.next_step.close()

    def terminate(self) -> None:
        self.next_step.terminate()


class Factory(ProcessingStrategyFactory[KafkaPayload]):
    def __init__(self, mode: str, count: int, out: str, stop: Any, pool: MultiprocessingPool | None) -> None:
        self.mode, self.count, self.out, self.stop, self.pool = mode, count, out, stop, pool

    def create_with_partitions(self, commit: Commit, partitions: Any) -> ProcessingStrategy[KafkaPayload]:
        counted = Count(CommitOffsets(commit), self.count, self.out, self.stop)
        if self.pool is not None:
            return RunTaskWithMultiprocessing(noop, counted, max_batch_size=1000, max_batch_time=0.5,
                                              pool=self.pool)
        return RunTask(noop, counted)


def main() -> None:
    mode, bootstrap, topic, count, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    config = build_kafka_consumer_configuration({"bootstrap.servers": bootstrap},
                                                group_id=f"arroyo-{mode}-{time.monotonic_ns()}",
                                                auto_offset_reset="earliest")
    pool = MultiprocessingPool(int(os.environ.get("BENCH_PROCESSES", "4"))) if mode == "multiprocessing" else None
    holder: dict[str, StreamProcessor[KafkaPayload]] = {}
    factory = Factory(mode, count, out, lambda: holder["p"].signal_shutdown(), pool)
    processor = StreamProcessor(KafkaConsumer(config), Topic(topic), factory)
    holder["p"] = processor
    processor.run()
    if pool is not None:
        pool.close()


if __name__ == "__main__":
    main()
