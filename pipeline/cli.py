"""The command lines: the three stage scripts, and the error boundary every command shares.

A `Command` is a parser whose stage flags come from the settings' declarations
(`pipeline.settings`), the names it gives each setting (so its messages say its own flags), and
the error boundary: a user's or the machine's error is one line and an exit code, never a
traceback. `quickfix-labels` (`pipeline.fix`) is a Command over the three stages' settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

from . import dist
from .errors import QuickFixError, render
from .files import explain
from .settings import ExtractSettings, StitchSettings, TrainSettings, add_options

log = logging.getLogger("quickfix")
T = TypeVar("T")

EXTRACT_DOC = """Stage 1: run the frozen backbone once and cache pooled features in a Zarr store.

    python extract_features.py --checkpoint checkpoint_best.pth --data-root /data/imagenet \\
        --dataset imagenet1k --out features.zarr

Rerunning the same command resumes an interrupted run, and is a no-op on a finished store.
"""

TRAIN_DOC = """Stage 2: train only the classification head on the cached features (seconds).

    python train_head.py --features features.zarr --checkpoint checkpoint_best.pth --out head.pt

Every --lr x --weight-decay combination trains together in one pass; the best on a holdout
carved from train is kept, and val top-1/top-5 is reported for every point. With --checkpoint,
the old head is diagnosed first: if its rows are a permutation of the right head, --init auto
starts from the permuted rows; the permuted old head is also a candidate of its own (epoch 0),
chosen when it wins on the holdout, and --epochs 0 makes it the fix with no training. The
backbone is judged too (ok, weak, untrained) against the accuracy the checkpoint records.
"""

STITCH_DOC = """Stage 3: write the new head and the correct class order into a copy of the model.

    python stitch_checkpoint.py --checkpoint checkpoint_best.pth --head head.pt \\
        --out fixed/checkpoint_best.pth --verify-data /data/imagenet/val

The original is never modified. The copy keeps every key; only the head (in every copy of the
model, EMA included) and the class mapping change, and every backbone tensor is verified
bit-identical before the file is moved into place.
"""


class _TqdmHandler(logging.Handler):
    """Log through tqdm.write so that progress bars survive log lines; settings named in a
    line read as the running command's flags."""

    def __init__(self, names: dict[str, str]):
        super().__init__()
        self.names = names

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(render(self.format(record), self.names), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False, names: dict[str, str] | None = None) -> None:
    handler = _TqdmHandler(names or {})
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in --help, unless there is none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "(default:" in text:
            return text
        return super()._get_help_string(action)


class Command:
    """A command line: its parser, and its names for the settings and stages it speaks of."""

    def __init__(self, doc: str, names: dict[str, str] | None = None, prog: str | None = None):
        self.parser = argparse.ArgumentParser(
            prog=prog, description=doc.split("\n\n")[0], formatter_class=_HelpFormatter)
        self.parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        self.names: dict[str, str] = dict(names or {})

    def add(self, settings: type, **kw: Any) -> Command:
        """The flags of a stage's settings (see settings.add_options for `skip`, `rename`)."""
        add_options(self.parser, settings, self.names, **kw)
        return self

    def main(self, body: Callable[[argparse.Namespace], int], argv: Sequence[str] | None
             ) -> int:
        """Parse, set up logging, run `body`, and turn errors into one line and an exit code:
        the user's (QuickFixError, in this command's names) and the machine's (OSError)."""
        args = self.parser.parse_args(argv)
        setup_logging(args.verbose, self.names)
        try:
            return body(args)
        except QuickFixError as exc:
            if not getattr(exc, "silent", False):  # a torchrun rank whose error rank 0 reports
                print(f"error: {exc.message(self.names)}", file=sys.stderr)
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


def in_job(backend: str, run: Callable[[dist.Group], T]) -> tuple[dist.Group, T]:
    """`run(group)` in this torchrun job's process group (alone without torchrun), with one
    voice, rank 0's; the group is left however it ends. Returns the group and run's value."""
    group = dist.join(backend)
    if not group.main:
        log.setLevel(max(log.level, logging.WARNING))
    try:
        return group, run(group)
    finally:
        dist.leave()


def _report(job: tuple[dist.Group, Any]) -> int:
    """Rank 0 logs the stage's summary line."""
    group, summary = job
    if group.main:
        log.info(summary.line())
    return 0


def train_backend(device: str) -> str:
    """The process group's backend under torchrun: NCCL for the gradients on GPUs (the device
    itself is checked in run_train, where an error stops every rank with one line)."""
    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "cuda" if cuda else "gloo"


# --- the stage scripts -------------------------------------------------------------------------

def extract_command() -> Command:
    return Command(EXTRACT_DOC).add(ExtractSettings)


def extract_main(argv: list[str] | None = None) -> int:
    from .extract import run_extract

    def body(args: argparse.Namespace) -> int:
        def run(group: dist.Group):
            # a user error on any rank stops every rank, with one line (rank 0's)
            settings = group.agree(lambda: ExtractSettings.from_args(
                args, **ExtractSettings.hand_share()))
            return run_extract(settings, group=group, argv=argv)

        return _report(in_job("gloo", run))

    return extract_command().main(body, argv)


def train_command() -> Command:
    return Command(TRAIN_DOC).add(TrainSettings)


def train_main(argv: list[str] | None = None) -> int:
    from .train import run_train

    def body(args: argparse.Namespace) -> int:
        def run(group: dist.Group):
            settings = group.agree(lambda: TrainSettings.from_args(args))
            return run_train(settings, group=group, argv=argv)

        return _report(in_job(train_backend(args.device), run))

    return train_command().main(body, argv)


def stitch_command() -> Command:
    return Command(STITCH_DOC).add(StitchSettings)


def stitch_main(argv: list[str] | None = None) -> int:
    from .stitch import run_stitch

    def body(args: argparse.Namespace) -> int:
        run_stitch(StitchSettings.from_args(args))
        return 0

    return stitch_command().main(body, argv)


def extract_parser() -> argparse.ArgumentParser:
    return extract_command().parser


def train_parser() -> argparse.ArgumentParser:
    return train_command().parser


def stitch_parser() -> argparse.ArgumentParser:
    return stitch_command().parser
