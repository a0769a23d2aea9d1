"""Pieces shared by the three scripts: logging, the error boundary, and the run record."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from .errors import QuickFixError
from .files import explain

log = logging.getLogger("quickfix")

_PACKAGES = ("torch", "torchvision", "numpy", "zarr", "nvidia-dali-cuda130", "pillow")


class _TqdmHandler(logging.Handler):
    """Log through tqdm.write so that progress bars survive log lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def common_parser() -> argparse.ArgumentParser:
    """Flags every stage takes; compose with `parents=[common_parser()]`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to compute; auto picks cuda when available (default: %(default)s)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="allow full (unsafe) unpickling of the checkpoint; only for files you trust "
        "(default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A stage script's parser: the first paragraph of its docstring, the shared flags, defaults
    shown in --help."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        parents=[common_parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse, set up logging, and turn user errors into one line and exit code 2."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        return body(args)
    except QuickFixError as exc:
        if not getattr(exc, "silent", False):  # a torchrun rank whose error rank 0 reports
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # the machine's, not the project's: a full disk, a read-only mount
        print(f"error: {environment_message(exc)}", file=sys.stderr)
        return 2


def environment_message(exc: OSError) -> str:
    """One line for an error of the machine: what happened, on which path, and what to do."""
    folder = os.path.dirname(exc.filename) if isinstance(exc.filename, str) else None
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{explain(exc, folder)}{where}"


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
