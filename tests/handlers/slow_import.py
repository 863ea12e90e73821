"""Test handler: tests/handlers/recording.py behind an import that takes KSUP_TEST_IMPORT_SLEEP
seconds, so a test can watch ksup while its workers are still starting."""

import os
import time

time.sleep(float(os.environ.get("KSUP_TEST_IMPORT_SLEEP", "3")))

from tests.handlers.recording import process  # noqa: E402

__all__ = ["process"]
