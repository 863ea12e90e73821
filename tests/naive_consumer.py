"""The consumer many users run today, for the loss test: librdkafka's default automatic offset
store (``enable.auto.offset.store=true``) with batch consumption, and a SIGTERM handler that
stops at the next message and closes cleanly. Not part of ksup.

usage: naive_consumer.py BOOTSTRAP GROUP TOPIC RECORD_FILE SLEEP_S
"""

from __future__ import annotations

import os
import signal
import sys
import time

from confluent_kafka import Consumer


def main() -> None:
    bootstrap, group, topic, record, sleep_s = sys.argv[1:6]
    running = True

    def stop(signum: int, frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                  "enable.auto.commit": True, "enable.auto.offset.store": True,  # the naive part
                  "partition.assignment.strategy": "cooperative-sticky"})
    c.subscribe([topic])
    idle_since = time.monotonic()
    while running:
        msgs = c.consume(num_messages=100, timeout=0.5)
        if msgs:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > 8:
            break  # caught up
        for m in msgs:
            if not running:
                break  # "stop quickly": the rest of the batch was already stored
            if m.error():
                continue
            time.sleep(float(sleep_s))
            os.write(fd, f"{m.partition()} {m.offset()} {os.getpid()}\n".encode())
    c.close()  # commits the stored offsets, including the unprocessed part of the batch


if __name__ == "__main__":
    main()
