"""Secret references in librdkafka properties (edge): a value read from a file or from an
environment variable instead of written out, so that a password never has to be on the command
line (every local user can read a process's argv in /proc/<pid>/cmdline and ``ps``).

One syntax, the same in ``-X`` and in the config file's ``[kafka]`` table: a key ending in
``:file`` or ``:env`` names where the value of the key before the colon is::

    -X sasl.password:file=/run/secrets/kafka-password    # the file's content, one trailing newline dropped
    -X sasl.password:env=KAFKA_PASSWORD                  # that environment variable's value
    "sasl.password:file" = "/run/secrets/kafka-password" # the same in [kafka]

Resolved once, in the supervisor, before any worker exists; workers get the resolved value over
their socket pair, like every Kafka property. A variable read by an ``:env`` reference is then
removed from the supervisor's environment (``forget_variables``), so that no process ksup starts
inherits it. librdkafka property names never contain a colon, so a suffix cannot clash with one.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from pathlib import Path

from supervisor.errors import ConfigError


class Source(Enum):
    """Where a reference's value comes from (the key suffix after the colon)."""

    FILE = "file"
    ENV = "env"


def _from_file(key: str, path: str, environ: Mapping[str, str]) -> str:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{key}:file={path}: cannot read it ({exc.strerror or exc}); create the file, "
                          f"make it readable by the user ksup runs as, or fix the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}:file={path}: not UTF-8 text (a password file holds the value as text)") from None
    value = text.removesuffix("\n").removesuffix("\r")  # `echo pw > file` leaves one newline
    if not value:
        raise ConfigError(f"{key}:file={path} is empty (write the value into it, or check that the secret "
                          f"volume or systemd credential is mounted)")
    return value


def _from_env(key: str, name: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if value is None:
        raise ConfigError(f"{key}:env={name}: the environment variable {name} is not set (export it before "
                          f"ksup starts, or use {key}:file=PATH)")
    if not value:
        raise ConfigError(f"{key}:env={name}: the environment variable {name} is empty")
    return value


_READ: dict[Source, Callable[[str, str, Mapping[str, str]], str]] = {Source.FILE: _from_file, Source.ENV: _from_env}


def split_reference(key: str) -> tuple[str, Source | None]:
    """``"sasl.password:file"`` -> ``("sasl.password", Source.FILE)``; a plain key -> ``(key, None)``."""
    base, colon, suffix = key.partition(":")
    if not colon:
        return key, None
    try:
        return base, Source(suffix)
    except ValueError:
        raise ConfigError(f"{key}: unknown reference :{suffix} (a key may end in :file or :env, e.g. "
                          f"{base}:file=/run/secrets/kafka)") from None


def resolve(kafka: Mapping[str, str], environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """The properties with every reference replaced by its value, and the environment variables
    that were read. One source at a time (the file's [kafka] table, then -X), so that -X still
    overrides the file whichever form either uses; a key given both ways in one source is refused."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    variables: list[str] = []
    referenced: set[str] = set()
    for key, value in kafka.items():
        base, source = split_reference(key)
        if source is None:
            if base in referenced:
                raise ConfigError(f"{base} is given twice, as a value and as a reference (keep one)")
            out[base] = value
            continue
        if base in out:
            raise ConfigError(f"{base} is given twice, as a value and as {key} (keep one)")
        out[base] = _READ[source](base, value, environ)
        referenced.add(base)
        if source is Source.ENV:
            variables.append(value)
    return out, variables


def forget_variables(names: list[str]) -> None:
    """Remove the variables an :env reference read from this process's environment: every
    process ksup starts (workers, --on-worker-exit commands) inherits the environment. The
    kernel's copy in /proc/<pid>/environ of ksup itself keeps the value (it is the block the
    process was started with), which is why the README recommends :file."""
    for name in names:
        os.environ.pop(name, None)


def exposure_warnings(secret_key: re.Pattern[str], argv_keys: Iterable[str], config_file: str | None,
                      file_keys: Iterable[str]) -> list[str]:
    """Lines to warn with when a secret-looking property's value is written out where others can
    read it: on the command line, or in a config file readable by every local user."""
    out = [f"-X {key} is on the command line, where every local user can read it (ps, /proc/<pid>/cmdline); "
           f"use -X {key}:file=PATH instead" for key in sorted({k for k in argv_keys if _plain_secret(secret_key, k)})]
    in_file = sorted({k for k in file_keys if _plain_secret(secret_key, k)})
    if config_file and in_file:
        try:
            mode = os.stat(config_file).st_mode
        except OSError:
            return out
        if mode & stat.S_IROTH:
            out.append(f"{config_file} holds {', '.join(in_file)} and every local user can read it "
                       f"(mode {stat.S_IMODE(mode):o}); chmod 600 it, or use \"{in_file[0]}:file\" = PATH")
    return out


def _plain_secret(secret_key: re.Pattern[str], key: str) -> bool:
    return ":" not in key and bool(secret_key.search(key))
