"""What produced an output: the command line, settings, package versions, commit, host, time.

Stored where the output lives (Zarr attributes, head file, stitched checkpoint) as plain types,
so `weights_only=True` loading still works.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

_PACKAGES = ("torch", "torchvision", "numpy", "zarr", "nvidia-dali-cuda130", "pillow")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    from . import __version__

    versions["quickfix-labels"] = __version__
    return versions


def git_sha() -> str | None:
    """The project's commit, like dinov2's get_sha; None outside a git checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_record(argv: Sequence[str] | None, settings: dict) -> dict:
    """What produced an output, as plain types (safe for Zarr attributes and weights_only)."""
    return {
        "argv": list(sys.argv[:1]) + list(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "versions": package_versions(),
        "git_sha": git_sha(),
        "host": os.uname().nodename,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
