"""One Quix Streams application for the peers benchmark, run with the interpreter of its own
virtual environment (Quix pins an older confluent-kafka): ``python peer_quix.py BOOTSTRAP TOPIC
COUNT OUT``. A no-op ``update`` step counts messages; once COUNT are through it writes
"pid first last count cpu librdkafka" to OUT (cpu: this process, all threads) and stops."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from confluent_kafka import libversion
from quixstreams import Application


def main() -> None:
    bootstrap, topic_name, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    app = Application(broker_address=bootstrap, consumer_group=f"quix-{time.monotonic_ns()}",
                      auto_offset_reset="earliest", auto_create_topics=False)
    topic = app.topic(topic_name, value_deserializer="bytes")
    state = {"seen": 0, "first": 0.0, "first_cpu": 0.0}

    def tick(value: Any) -> None:
        if state["seen"] == 0:
            state["first"], state["first_cpu"] = time.monotonic(), time.process_time()
        state["seen"] += 1
        if state["seen"] == count:
            with open(out, "a") as f:
                f.write(f"{os.getpid()} {state['first']} {time.monotonic()} {count} "
                        f"{time.process_time() - state['first_cpu']} {libversion()[0]}\n")
            app.stop()

    app.dataframe(topic).update(tick)
    app.run()


if __name__ == "__main__":
    main()
