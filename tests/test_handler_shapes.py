"""Handler shapes that would commit messages whose handler never ran (issue 12): a generator
function (its body runs only when iterated), an async generator, a plain ``def`` that returns a
coroutine or a generator. Generator shapes are refused at boot (exit 3, one line naming the
shape and the fix); a returned coroutine/generator is a handler error, never a success. Oracle:
the broker's committed offsets and the handler's own record."""

from __future__ import annotations

import pytest

from tests.harness import wait_until
from tests.kafkautil import committed_offsets, create_topic, produce_sequence

pytestmark = pytest.mark.kafka

BOOT_FAILED = 3

SHAPES = '''
import asyncio
import os


def _note(record):
    with open(os.environ["KSUP_TEST_RECORD"], "a") as f:
        f.write(f"{record.partition} {record.offset}\\n")


def gen(record):
    _note(record)
    yield


async def agen(record):
    _note(record)
    yield


async def _body(record):
    _note(record)


def returns_coroutine(record):
    return _body(record)


def returns_generator(record):
    return (x for x in [_note(record)])


class GenClass:
    def process(self, record):
        _note(record)
        yield
'''


@pytest.mark.parametrize("attr,shape", [("gen", "generator function"), ("agen", "async generator function"),
                                        ("GenClass", "generator function")])
def test_generator_handlers_are_refused_at_boot(ksup, bootstrap, names, tmp_path, attr, shape):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20)
    (tmp_path / "shapes.py").write_text(SHAPES)
    record = tmp_path / "record.txt"
    run = ksup(f"shapes:{attr}", bootstrap, topic, group, cwd=tmp_path, env={"KSUP_TEST_RECORD": str(record)})
    assert run.wait(60) == BOOT_FAILED, run.tail()
    last = [line for line in run.log_text().splitlines() if line.strip()][-1]
    assert shape in last and "yield" in last, last
    assert committed_offsets(bootstrap, group, topic, 1) == {0: -1001}, "nothing committed"
    assert not record.exists()


@pytest.mark.parametrize("attr,what", [("returns_coroutine", "coroutine"), ("returns_generator", "generator")])
def test_a_returned_coroutine_or_generator_is_an_error_never_a_success(ksup, bootstrap, names, tmp_path,
                                                                        attr, what):
    topic, group = names
    create_topic(bootstrap, topic, 1)
    produce_sequence(bootstrap, topic, 20)
    (tmp_path / "shapes.py").write_text(SHAPES)
    run = ksup(f"shapes:{attr}", bootstrap, topic, group, cwd=tmp_path,
               env={"KSUP_TEST_RECORD": str(tmp_path / "record.txt")}, extra=["--restart-delay", "30"])
    wait_until(lambda: f"returned a {what}" in run.log_text(), 60, "the handler error logged")
    run.wait_for_log("restarts in", 30)  # the worker stopped (--on-error stop) and committed what it finished
    assert committed_offsets(bootstrap, group, topic, 1) == {0: -1001}, "nothing committed"
    run.stop()
