"""`quickfix-labels`: the three stages in one command, with the quick-fix mode's command line.

    quickfix-labels --resume ./checkpoints/checkpoint_best.pth --dataset imagenet1k \\
        --data-root /data/imagenet --quick-fix-labels --fix-epochs 5 --lr 0.15 \\
        --checkpoint-dir ./checkpoints/fixed --batch-size 256

The fixed checkpoint lands in --checkpoint-dir under the input's file name, with the feature
store (features.zarr) and the head (head.pt) beside it. Only what is stale reruns: each stage
remembers (in CHECKPOINT_DIR/.quickfix-labels.json) its settings and the identity of its inputs
(size and modification time of the checkpoint and class-order file, the class folders' times),
and a stage runs when they changed, when its output is missing, or when an earlier stage ran.
A new --lr reruns stages 2 and 3 only: seconds, not the backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from . import data as D
from . import dist
from . import store as S
from .cli import log, run_main, script_parser
from .commands import (
    add_extract_flags,
    add_stitch_flags,
    add_train_flags,
    extract_kwargs,
    run_stitch,
    train_backend,
    train_kwargs,
)
from .errors import DataError, StoreError
from .files import atomic_write

STATE = ".quickfix-labels.json"
STAGES = ("extract", "train", "stitch")
TITLES = {"extract": "stage 1 (extract_features)", "train": "stage 2 (train_head)",
          "stitch": "stage 3 (stitch_checkpoint)"}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--resume", "--checkpoint", dest="checkpoint", type=Path, required=True,
                        help="the trained model whose classes are in the wrong order (read only)")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="ImageFolder tree: DATA_ROOT/<split>/<class>/<image>")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="where the fixed checkpoint is written, under the input's file "
                        "name, with features.zarr and head.pt beside it (default: fixed/ "
                        "beside --resume)")
    parser.add_argument("--quick-fix-labels", action="store_true",
                        help="accepted, for the quick-fix mode's command line: it is what this "
                        "command does")
    parser.add_argument("--fix-epochs", dest="epochs", type=int, default=5,
                        help="passes of the head over the cached features")
    parser.add_argument("--features", type=Path,
                        help="the feature store (default: CHECKPOINT_DIR/features.zarr)")
    parser.add_argument("--verify-data", action=argparse.BooleanOptionalAction, default=True,
                        help="run the fixed model end to end on the val images (val/ or "
                        "validation/ under --data-root) and report its top-1")
    parser.add_argument("--force", action="store_true",
                        help="run every stage even if nothing changed (stage 1 then checks "
                        "its store and resumes or keeps it, as a rerun does)")
    add_extract_flags(parser, batch_flag="--extract-batch-size")
    add_train_flags(parser)
    add_stitch_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda args: fix(args, argv), build_parser(), argv)


class Plan:
    """Where everything goes, and what each stage's last run was made from."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.checkpoint: Path = args.checkpoint
        self.dir: Path = args.checkpoint_dir or args.checkpoint.parent / "fixed"
        self.store: Path = args.features or self.dir / "features.zarr"
        self.head = self.dir / "head.pt"
        self.out = self.dir / args.checkpoint.name
        self.state_path = self.dir / STATE
        if not args.checkpoint.is_file():
            what = "a directory, not a file" if args.checkpoint.is_dir() else "no such file"
            raise DataError(f"--resume {args.checkpoint}: {what}")
        if not args.data_root.is_dir():
            raise DataError(f"--data-root {args.data_root} is not a directory")
        if self.dir.exists() and not self.dir.is_dir():
            raise DataError(f"--checkpoint-dir {self.dir} is a file; give a directory")
        if self.out.resolve() == args.checkpoint.resolve():
            raise DataError(f"--checkpoint-dir {self.dir} is the input's own folder: the fixed "
                            f"checkpoint would replace {args.checkpoint}; give another folder")
        splits = D.find_splits(args.data_root, args.splits)
        val = [s for s in ("val", "validation") if s in splits]
        self.verify_data = args.data_root / val[0] if val and args.verify_data else None
        self.keys = {
            "extract": {"settings": _settings(extract_kwargs(args)),
                        "checkpoint": _identity(args.checkpoint),
                        "class_order": _identity(args.class_order),
                        "data": _folders_digest(args.data_root, splits),
                        "store": str(self.store.resolve())},
            "train": {"settings": _settings(train_kwargs(args)),
                      "checkpoint": _identity(args.checkpoint),
                      "store": str(self.store.resolve())},
            "stitch": {"settings": _settings({"aux_heads": args.aux_heads,
                                              "verify_data": self.verify_data,
                                              "verify_batch_size": args.verify_batch_size,
                                              "device": args.device}),
                       "checkpoint": _identity(args.checkpoint)},
        }

    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: every stage is stale
            return {}
        return state if isinstance(state, dict) else {}

    def stale(self, force: bool) -> list[str]:
        """The stages to run, in order: from the first stale one on."""
        state = self.load_state()
        for i, stage in enumerate(STAGES):
            if force or not self._current(stage, state.get(stage)):
                return list(STAGES[i:])
        return []

    def _current(self, stage: str, record) -> bool:
        if not isinstance(record, dict) or record.get("key") != _jsonable(self.keys[stage]):
            return False
        if stage == "extract":
            return _store_usable(self.store)
        output = self.head if stage == "train" else self.out
        return record.get("output") == _identity(output)

    def record(self, stage: str, done: bool) -> None:
        """Before a stage runs: forget it and every later stage (a run killed in between leaves
        them stale). After it ran: remember what it was made from."""
        state = self.load_state()
        for later in STAGES[STAGES.index(stage):]:
            state.pop(later, None)
        if done:
            output = {"extract": None, "train": self.head, "stitch": self.out}[stage]
            state[stage] = {"key": _jsonable(self.keys[stage]),
                            "output": _identity(output) if output else None}
        data = json.dumps(state, indent=1).encode()
        atomic_write(self.state_path, lambda f: f.write(data))


def fix(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .extract import run_extract
    from .train import run_train

    grp = dist.join(train_backend(args.device))  # one process group for the whole job
    if not grp.main:
        log.setLevel(max(log.level, logging.WARNING))  # one voice: rank 0's
    try:
        with contextlib.ExitStack() as held:
            plan = grp.share(lambda: _plan(args, held))
            todo = grp.share(lambda: plan.stale(args.force))
            for stage in STAGES:
                if stage not in todo:
                    log.info("%s: up to date", TITLES[stage])
            if "extract" in todo:
                _run(grp, plan, "extract", lambda: run_extract(
                    **extract_kwargs(args), out=plan.store, overwrite=True, group=grp,
                    argv=argv))
            if "train" in todo:
                def train():
                    return run_train(features=plan.store, out=plan.head, **train_kwargs(args),
                                     group=grp, argv=argv)
                try:
                    _run(grp, plan, "train", train)
                except StoreError as exc:
                    if grp.collective:
                        raise
                    # a chunk that fails its checksum shows only as it is read: stage 1
                    # repairs it (--verify reads every chunk), then stage 2 runs again once
                    log.warning("stage 2 found the store damaged (%s): repairing it with stage "
                                "1 --verify, then training again", exc)
                    _run(grp, plan, "extract", lambda: run_extract(
                        **{**extract_kwargs(args), "verify": True}, out=plan.store,
                        overwrite=True, argv=argv))
                    _run(grp, plan, "train", train)
            if "stitch" in todo:
                if plan.verify_data is None and args.verify_data:
                    log.info("no val/ split under %s: the fixed model is not checked end to end",
                             args.data_root)
                grp.agree(lambda: _stitch(args, plan), only_rank0=True)
    finally:
        dist.leave()
    if grp.main:
        print(f"fixed checkpoint: {plan.out}", flush=True)
    return 0


def _plan(args: argparse.Namespace, held: contextlib.ExitStack) -> Plan:
    """Rank 0's plan, under the lock that keeps a second run of the same fix out."""
    plan = Plan(args)
    held.enter_context(S.WriterLock(plan.dir))
    return plan


def _run(grp: dist.Group, plan: Plan, stage: str, fn) -> None:
    if grp.main:
        plan.record(stage, done=False)
    summary = fn()
    if grp.main:
        log.info(summary.line())
        plan.record(stage, done=True)


def _stitch(args: argparse.Namespace, plan: Plan) -> None:
    plan.record("stitch", done=False)
    run_stitch(args, checkpoint=plan.checkpoint, head=plan.head, out=plan.out, overwrite=True,
               verify_data=plan.verify_data)
    plan.record("stitch", done=True)


# --- what a stage's inputs are ---------------------------------------------------------------

def _identity(path: Path | None) -> list | None:
    """A file as its path, size and modification time (None: not given, or not there)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _folders_digest(data_root: Path, splits: list[str]) -> str:
    """The split and class folders with their modification times: adding, removing or renaming
    an image changes its folder's time. (A file rewritten in place does not: --force.)"""
    h = hashlib.sha256()
    for split in splits:
        root = data_root / split
        for name in [".", *D.class_folders(root)]:
            try:
                h.update(f"{split}/{name} {os.stat(root / name).st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{split}/{name} -\n".encode())
    return h.hexdigest()


def _store_usable(store: Path) -> bool:
    """A finished store with every chunk file there (by listing); else stage 1 reruns."""
    try:
        group = S.open_store(store)
        if S.check_store(group):
            return False
        for split in group.attrs["splits"]:
            S.verify_complete(group, split)
        return True
    except Exception:  # noqa: BLE001 - any doubt about the store: stage 1 decides
        return False


# what changes how a stage runs but not what it makes
_COSMETIC = ("progress_every", "trust_checkpoint", "verify", "rank", "world_size")


def _settings(kwargs: dict) -> dict:
    return {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in sorted(kwargs.items())
            if k not in _COSMETIC}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
