"""A minimal wheel for the upgrade tests: an installable package written as a zip, no build
step and no index (a rolling reload's new release, pip-installed into a venv)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def write_wheel(folder: Path, module: str, package: str, version: str, code: str) -> Path:
    """``<module>-<version>-py3-none-any.whl`` in ``folder`` with ``<module>/__init__.py`` =
    ``code``; the distribution is named ``package``."""
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": code,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path
