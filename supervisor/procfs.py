"""Facts about a process read from /proc (Linux): is it alive, and since when."""

from __future__ import annotations


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is gone for every purpose here)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def start_time(pid: int) -> str | None:
    """When a live process started (clock ticks since boot, field 22 of stat): with the pid,
    it tells the process from a later one that reused the pid. None when not alive."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]
