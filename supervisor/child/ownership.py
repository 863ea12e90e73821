"""One thread owns every call on a Consumer (child side): an optional check of that rule.

With ``KSUP_CHECK_CONSUMER_THREAD=1`` in its environment, a worker wraps its Consumer so that a
call from any thread but the one that created it is logged as an error (and still made). The
test suite runs drains with it; production workers never pay for it."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger("ksup.worker")

ENV = "KSUP_CHECK_CONSUMER_THREAD"


class OwnedConsumer:
    """A transparent proxy that names any call made from a thread other than its owner's."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self._owner = threading.get_ident()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._consumer, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._owner:
                log.error("Consumer.%s called from thread %s, not the consumer thread", name,
                          threading.current_thread().name)
            return attr(*args, **kwargs)

        return call


def maybe_owned(consumer: Any) -> Any:
    return OwnedConsumer(consumer) if os.environ.get(ENV) == "1" else consumer
