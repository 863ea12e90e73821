"""Load the user's handler from a ``module:attribute`` spec (child side).

The working directory is put first on ``sys.path``, as gunicorn does, so ``ksup start
handler:process`` finds ``./handler.py``. A class is instantiated once per worker; its
``process`` method is the handler and ``setup``/``teardown`` are called around the worker's life.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor.record import Record


class HandlerLoadError(Exception):
    """One line naming what is wrong with the spec and how to fix it."""


class HandlerDidNotRun(TypeError):
    """The handler returned a coroutine, generator or other awaitable: its body did not run, so
    the message is not done (an error for the --on-error policy, never a success)."""


# ---- handler shapes: the one place that decides them ---------------------------------------------
# Accepted: a plain function (``def``), a coroutine function (``async def``, awaited on the handler
# thread's event loop), either taking one record or, with --batch-size, a list; or a class whose
# ``process`` is one of those. Refused at boot: generator and async generator functions, whose body
# runs only when something iterates them. Refused at run time: a return value that is itself
# unrun work (a coroutine or generator returned by a plain ``def``).

def shape_problem(fn: Any) -> str | None:
    """Why ``fn`` cannot be a handler (its shape), or None."""
    target = fn if inspect.isroutine(fn) or isinstance(fn, functools.partial) else getattr(fn, "__call__", fn)  # noqa: B004
    if inspect.isasyncgenfunction(target):
        return ("is an async generator function (it contains `yield`): its body would run only if something "
                "iterated it, so no message would be processed; remove the `yield` (an `async def` that "
                "returns is awaited)")
    if inspect.isgeneratorfunction(target):
        return ("is a generator function (it contains `yield`): its body would run only if something iterated "
                "it, so no message would be processed; remove the `yield` and return instead")
    return None


def check_returned(value: object) -> None:
    """Raise HandlerDidNotRun when a handler's return value is work that did not run. Called
    with every non-None return value, on every path that calls the handler."""
    kind = ("coroutine" if inspect.iscoroutine(value) else
            "generator" if inspect.isgenerator(value) else
            "async generator" if inspect.isasyncgen(value) else
            "awaitable" if inspect.isawaitable(value) else None)
    if kind is None:
        return
    close = getattr(value, "close", None) if kind != "async generator" else None
    if callable(close):
        close()  # no "never awaited" warning: the error below says it
    raise HandlerDidNotRun(f"the handler returned a {kind} instead of running it, so the message was not "
                           f"processed (declare the handler `async def` to have it awaited, or run the "
                           f"{kind} inside the handler)")


@dataclass
class LoadedHandler:
    spec: str
    process: Callable[[Record], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None
    version: str = ""
    instance: Any = None  # the class form's instance: optional on_assign(tps) / on_revoke(tps)


def handler_version(module_name: str) -> str:
    """``__version__`` of the handler's top-level package, else its distribution's version: what
    a rolling upgrade script checks to know the new code is the one running."""
    top = module_name.split(".")[0]
    version = getattr(sys.modules.get(top), "__version__", None)
    if isinstance(version, str):
        return version
    try:
        import importlib.metadata as md

        dists = md.packages_distributions().get(top)
        return md.version(dists[0]) if dists else ""
    except Exception:
        return ""


def _import_module(name: str, spec: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == name or name.startswith(exc.name + ".")):
            raise HandlerLoadError(
                f"handler {spec!r}: no module named {exc.name!r} "
                f"(run ksup from the folder that holds it, or install its package; cwd is {os.getcwd()})"
            ) from None
        raise HandlerLoadError(
            f"handler {spec!r}: importing {name!r} failed: {exc} (install the missing package)"
        ) from None
    except BaseException as exc:  # noqa: BLE001 - any error in user module code is a load error
        raise HandlerLoadError(
            f"handler {spec!r}: importing {name!r} raised {type(exc).__name__}: {exc} "
            f"(fix the module so that it imports cleanly)"
        ) from None


def load_handler(spec: str) -> LoadedHandler:
    """Import and validate the handler. Raises ``HandlerLoadError`` with a one-line reason."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerLoadError(
            f"handler {spec!r} is not of the form module:function (for example handler:process)"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module = _import_module(module_name, spec)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerLoadError(
                f"handler {spec!r}: module {module_name!r} has no attribute {attr!r} "
                f"(check the name after the colon)"
            ) from None
    if inspect.isclass(obj):
        try:
            instance = obj()
        except Exception as exc:
            raise HandlerLoadError(
                f"handler {spec!r}: creating {attr}() raised {type(exc).__name__}: {exc}"
            ) from None
        process = getattr(instance, "process", None)
        if not callable(process):
            raise HandlerLoadError(f"handler {spec!r}: class {attr} has no process(record) method")
        problem = shape_problem(process)
        if problem:
            raise HandlerLoadError(f"handler {spec!r}: {attr}.process {problem}")
        return LoadedHandler(spec, process, getattr(instance, "setup", None),
                             getattr(instance, "teardown", None), handler_version(module_name), instance)
    if not callable(obj):
        raise HandlerLoadError(
            f"handler {spec!r}: {attr!r} is a {type(obj).__name__}, not a function "
            f"(point at a function taking one record)"
        )
    problem = shape_problem(obj)
    if problem:
        raise HandlerLoadError(f"handler {spec!r}: {attr} {problem}")
    return LoadedHandler(spec, obj, version=handler_version(module_name))
