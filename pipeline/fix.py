"""`quickfix-labels`: the three stages in one command, with the quick-fix mode's command line.

    quickfix-labels --resume ./checkpoints/checkpoint_best.pth --dataset imagenet1k \\
        --data-root /data/imagenet --quick-fix-labels --fix-epochs 5 --lr 0.15 \\
        --checkpoint-dir ./checkpoints/fixed --batch-size 256

The fixed checkpoint lands in --checkpoint-dir under the input's file name, with the feature
store (features.zarr) and the head (head.pt) beside it. Only what is stale reruns: each stage
remembers (in CHECKPOINT_DIR/.quickfix-labels.json) its settings and the identity of what it
read (the checkpoint's and class-order file's size and modification time, the image folders'
times, the store's fingerprint, the head file), and runs again when they changed or its output
is missing or changed. A new --lr reruns stage 2 (the head: seconds, not the backbone) and
stage 3 (which checks the fixed model on the val images unless --no-verify-data).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from pathlib import Path

from . import data as D
from . import dist
from . import store as S
from . import triage as T_
from .cli import Command, in_job, log, train_backend
from .errors import DataError, QuickFixError, StoreDamaged
from .files import atomic_write
from .settings import ExtractSettings, StitchSettings, TrainSettings

STATE = ".quickfix-labels.json"
TRIAGE_MODES = ("auto", "only", "off")
STAGES = ("extract", "train", "stitch")
TITLES = {"extract": "stage 1 (extract_features)", "train": "stage 2 (train_head)",
          "stitch": "stage 3 (stitch_checkpoint)",
          "extract-copy": "stage 1 on the other copy's weights (extract_features)",
          "train-copy": "stage 2 on the other copy's features (train_head)"}
# The stages' settings this command sets itself (Plan): the paths, from its own flags above,
# and replacing its own store and fixed checkpoint.
SET_HERE = {"extract": ("checkpoint", "data_root", "out", "overwrite", "per_class"),
            "train": ("features", "out", "checkpoint", "relabel"),
            "stitch": ("checkpoint", "head_file", "out", "overwrite", "verify_data",
                       "copy_heads")}
# What the stages' messages call what this command names otherwise, or sets itself.
NAMES = {"cmd.extract": "quickfix-labels", "cmd.train": "quickfix-labels",
         "cmd.stitch": "quickfix-labels",
         **{f"{stage}.checkpoint": "--resume" for stage in STAGES},
         "extract.data_root": "--data-root", "extract.out": "--features",
         "train.features": "--features", "train.out": "--checkpoint-dir",
         "stitch.head_file": "--checkpoint-dir", "stitch.out": "--checkpoint-dir",
         "stitch.verify_data": "--verify-data",
         # the store is this command's own: a stage 1 run of it replaces it when it must
         "extract.overwrite": "--force"}


def build_command() -> Command:
    cmd = Command(__doc__, NAMES, prog="quickfix-labels")
    parser = cmd.parser
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
    parser.add_argument("--features", type=Path,
                        help="the feature store (default: CHECKPOINT_DIR/features.zarr)")
    parser.add_argument("--verify-data", action=argparse.BooleanOptionalAction, default=None,
                        help="run the fixed model end to end on the val images (val/ or "
                        "validation/ under --data-root) and report its top-1 (default: after "
                        "training; a relabel is verified on the triage's own val sample)")
    parser.add_argument("--triage", choices=TRIAGE_MODES, default="auto", help=(
        "auto: decide from a class-stratified sample whether the old head is a relabel "
        "(a permutation, an offset, a superset's rows, or its mapping only) and fix it without "
        "training, else run the full pipeline; only: the relabel, or an error; off: the full "
        "pipeline (stage 1 on every image, stages 2 and 3)"))
    parser.add_argument("--train", dest="triage", action="store_const", const="off",
                        help="the full pipeline, without a triage (--triage off)")
    parser.add_argument("--triage-per-class", type=int, default=2, metavar="K", help=(
        "the triage's first sample: K train and K val images of each class (doubled while "
        "the decision is open)"))
    parser.add_argument("--triage-max-per-class", type=int, default=32, metavar="K",
                        help="the largest sample the triage grows to before it gives up")
    parser.add_argument("--force", action="store_true",
                        help="run every stage even if nothing changed (stage 1 then checks "
                        "its store and resumes it, keeps it, or makes it anew when files under "
                        "it changed)")
    # the stages' own flags, but what this command sets itself; --batch-size is the head's
    cmd.add(ExtractSettings, skip=SET_HERE["extract"],
            rename={"batch_size": ("--extract-batch-size",)})
    cmd.add(TrainSettings, skip=SET_HERE["train"], rename={"epochs": ("--fix-epochs",)})
    cmd.add(StitchSettings, skip=SET_HERE["stitch"])
    return cmd


def build_parser() -> argparse.ArgumentParser:
    return build_command().parser


def main(argv: list[str] | None = None) -> int:
    return build_command().main(lambda args: fix(args, argv), argv)


class Plan:
    """Where everything goes, each stage's settings, and whether each stage's last run still
    stands.

    A stage's key is its settings that change what it makes and the identity of what it reads:
    stage 1 the checkpoint, the class-order file and the image folders; stage 2 the checkpoint
    and the store (its fingerprint and creation time); stage 3 the checkpoint and the head
    file. A stage reruns when its key changed or its output is missing or changed; keys are
    computed when the stage is reached, so a stage 1 that found nothing to do leaves stages 2
    and 3 standing. Every setting of every stage is checked when the plan is made, before any
    stage runs (a bad --lr found after hours of stage 1 is no use)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.checkpoint: Path = args.checkpoint
        self.dir: Path = args.checkpoint_dir or args.checkpoint.parent / "fixed"
        self.store: Path = args.features or self.dir / "features.zarr"
        self.head = self.dir / "head.pt"
        self.out = self.dir / args.checkpoint.name
        self.state_path = self.dir / STATE
        _check_paths(args, self)
        # RANK/WORLD_SIZE set by hand (not torchrun) do not apply: this command does the whole
        # job; the store is its own, replaced when made from other inputs
        self.extract = ExtractSettings.from_args(
            args, checkpoint=args.checkpoint, data_root=args.data_root, out=self.store,
            overwrite=True)
        self.train = TrainSettings.from_args(args, features=self.store, out=self.head,
                                             checkpoint=args.checkpoint)
        self.splits = D.find_splits(args.data_root, self.extract.splits)
        val = [s for s in ("val", "validation") if s in self.splits]
        self.val = val[0] if val else None
        self.verify_data = args.data_root / val[0] if val and args.verify_data is not False \
            else None
        # the triage's sample store, and its report beside the fixed checkpoint
        self.sample = self.dir / "triage" / "sample.zarr"
        self.report = self.out.with_name(self.out.stem + ".triage.json")
        if not 1 <= args.triage_per_class <= args.triage_max_per_class:
            raise DataError(f"--triage-per-class {args.triage_per_class}: must be at least 1 "
                            f"and at most --triage-max-per-class ({args.triage_max_per_class})")
        self.relabel = self.train.replace(features=self.sample, relabel=True)
        self.stitch = StitchSettings.from_args(args, checkpoint=args.checkpoint,
                                               head_file=self.head, out=self.out,
                                               overwrite=True, verify_data=self.verify_data)
        # a copy of the model whose backbone differs (an EMA copy): its own store and head
        self.copy_store: Path | None = None
        self.copy_head: Path | None = None

    def other_copy(self) -> bool | None:
        """After stage 1: the --ema value that reads the model's other copy when its backbone
        differs from the one stage 1 read (an EMA copy of a model trained further), so that it
        gets a head trained on its own features. None: no copy differs, --head-for-every-copy,
        or more than one differs (stage 3 refuses, naming them)."""
        from .checkpoint import load_checkpoint
        from .stitch import differing_copies

        if self.stitch.head_for_every_copy:
            return None
        store = S.FeatureStore.open(self.store)
        trust = self.extract.trust_checkpoint
        ckpt = load_checkpoint(self.checkpoint, trust=trust, use_ema=store.ema)
        differ = differing_copies(ckpt, store.components["head"],
                                  store.components.get("other_heads") or {})
        if len(differ) != 1:
            return None
        try:
            other = load_checkpoint(self.checkpoint, trust=trust, use_ema=not store.ema)
        except QuickFixError:
            return None
        if other.source_key is None or tuple(other.source_key.split(".")) != differ[0].path:
            return None
        return not store.ema

    def with_copy(self, ema: bool) -> None:
        """Stages 1 and 2 once more, on the other copy's weights (`ema`), beside the first's:
        features.ema.zarr and head.ema.pt (or .model); stage 3 writes each head into its copy."""
        tag = "ema" if ema else "model"
        self.copy_store = self.store.with_name(f"{self.store.stem}.{tag}{self.store.suffix}")
        self.copy_head = self.head.with_name(f"{self.head.stem}.{tag}{self.head.suffix}")
        self.copy_extract = self.extract.replace(out=self.copy_store, ema=ema)
        self.copy_train = self.train.replace(features=self.copy_store, out=self.copy_head)
        self.stitch = self.stitch.replace(copy_heads=[self.copy_head])

    def key(self, stage: str) -> dict:
        args = self.args
        if stage == "triage":
            return _jsonable({"extract": self.key("extract"),
                              "relabel": {k: getattr(self.relabel, k) for k in (
                                  "seed", "relabel_confidence", "relabel_tolerance")},
                              "sizes": [args.triage_per_class, args.triage_max_per_class]})
        copy = stage.endswith("-copy")
        if stage in ("extract", "extract-copy"):
            settings = self.copy_extract if copy else self.extract
            return _jsonable({"settings": settings.output_key(),
                              "checkpoint": _identity(args.checkpoint),
                              "class_order": _identity(self.extract.class_order),
                              "data": _folders_digest(args.data_root, self.splits)})
        if stage in ("train", "train-copy"):
            settings = self.copy_train if copy else self.train
            return _jsonable({"settings": settings.output_key(),
                              "checkpoint": _identity(args.checkpoint),
                              "store": _store_identity(settings.features)})
        return _jsonable({"settings": self.stitch.output_key(),
                          "checkpoint": _identity(args.checkpoint),
                          "head": _identity(self.head),
                          "copy_heads": [_identity(h) for h in self.stitch.copy_heads or []]})

    def load_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: every stage is stale
            return {}
        return state if isinstance(state, dict) else {}

    def stale(self, stage: str, key: dict | None = None) -> bool:
        """Whether `stage` must run; `key`: its key, when already computed."""
        if self.args.force or (stage.startswith("extract") and self.extract.verify):
            return True
        record = self.load_state().get(stage)
        key = key if key is not None else self.key(stage)
        if not isinstance(record, dict) or record.get("key") != key:
            return True
        output = self._output(stage)
        return output is None or record.get("output") != output

    def _output(self, stage: str, outcome: str | None = None) -> list | None:
        """The stage's output as it is now (None: missing, or a store not finished). The
        triage's: its report, and the head it wrote when its `outcome` was a relabel (after
        any other, stage 2 writes head.pt)."""
        if stage == "extract":
            return _store_identity(self.store)
        if stage == "extract-copy":
            return _store_identity(self.copy_store)
        if stage == "train-copy":
            return _identity(self.copy_head)
        if stage == "triage":
            return [_identity(self.report)] + ([_identity(self.head)]
                                               if outcome == "relabel" else [])
        return _identity(self.head if stage == "train" else self.out)

    def record(self, stage: str, key: dict | None = None, **extra) -> None:
        """Before a stage runs (no `key`): forget its record (a run killed inside it leaves it
        stale). After it ran: remember `key`, taken before it ran (an image added meanwhile is
        not in the store), and its output (and `extra`: the triage's outcome)."""
        state = self.load_state()
        state.pop(stage, None)
        if key is not None:
            state[stage] = {"key": key, "output": self._output(stage, extra.get("outcome")),
                            **extra}
        data = json.dumps(state, indent=1).encode()
        atomic_write(self.state_path, lambda f: f.write(data))


def _check_paths(args: argparse.Namespace, plan: Plan) -> None:
    """The command's own paths, checked before any stage runs."""
    if not args.checkpoint.is_file():
        what = "a directory, not a file" if args.checkpoint.is_dir() else "no such file"
        raise DataError(f"--resume {args.checkpoint}: {what}")
    if not args.data_root.is_dir():
        raise DataError(f"--data-root {args.data_root} is not a directory")
    if plan.dir.exists() and not plan.dir.is_dir():
        raise DataError(f"--checkpoint-dir {plan.dir} is a file; give a directory")
    if not plan.dir.resolve().name:
        raise DataError(f"--checkpoint-dir {plan.dir}: give a folder of its own, not the root")
    if plan.out.resolve() == args.checkpoint.resolve():
        raise DataError(f"--checkpoint-dir {plan.dir} is the input's own folder: the fixed "
                        f"checkpoint would replace {args.checkpoint}; give another folder")


def fix(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .extract import run_extract
    from .train import run_train

    def job(grp: dist.Group) -> Path:
        with contextlib.ExitStack() as held:
            plan = grp.share(lambda: _plan(args, held))

            def extract(verify: bool = plan.extract.verify, copy: str = ""):
                settings = plan.copy_extract if copy else plan.extract
                return run_extract(settings.replace(verify=verify), group=grp, argv=argv)

            def train(copy: str = ""):
                return run_train(plan.copy_train if copy else plan.train, group=grp, argv=argv)

            def stages_1_and_2(copy: str = "") -> None:
                _stage(grp, plan, f"extract{copy}", lambda: extract(copy=copy))
                _repairing(grp, "stage 2", "training again",
                           lambda: _stage(grp, plan, f"train{copy}", lambda: train(copy)),
                           lambda: _run(grp, plan, f"extract{copy}",
                                        lambda: extract(verify=True, copy=copy)),
                           lambda: _run(grp, plan, f"train{copy}", lambda: train(copy)))

            if plan.args.triage != "off" and _triage(grp, plan, argv):
                # a relabel: head.pt is the old head's rows, re-ordered; stage 3 writes them
                _stage(grp, plan, "stitch", lambda: _stitch(plan), only_rank0=True)
                return plan.out
            stages_1_and_2()
            other = grp.share(plan.other_copy)
            if other is not None:  # each copy of the model gets a head trained on its features
                plan.with_copy(other)
                if grp.main:
                    log.info("the checkpoint's %s copy has a backbone of its own: stages 1 and 2 "
                             "run on its weights too (%s and %s), and stage 3 writes each head "
                             "into its own copy", "EMA" if other else "model",
                             plan.copy_store.name, plan.copy_head.name)
                stages_1_and_2("-copy")
            _stage(grp, plan, "stitch", lambda: _stitch(plan), only_rank0=True)
        return plan.out

    grp, out = in_job(train_backend(args.device), job)  # one process group for the whole job
    if grp.main:
        print(f"fixed checkpoint: {out}", flush=True)
    return 0


def _plan(args: argparse.Namespace, held: contextlib.ExitStack) -> Plan:
    """Rank 0's plan, under the lock that keeps a second run of the same fix out."""
    plan = Plan(args)
    held.enter_context(S.WriterLock(plan.dir.resolve()))
    return plan


def _stage(grp: dist.Group, plan: Plan, stage: str, fn, *, only_rank0: bool = False) -> None:
    """Run `stage` if it is stale (rank 0 decides for every rank); its key is computed once."""
    def check() -> tuple[bool, dict]:
        key = plan.key(stage)
        return plan.stale(stage, key), key

    stale, key = grp.share(check)
    if stale:
        _run(grp, plan, stage, fn, key, only_rank0=only_rank0)
    else:
        log.info("%s: up to date", TITLES[stage])


def _run(grp: dist.Group, plan: Plan, stage: str, fn, key: dict | None = None, *,
         only_rank0: bool = False) -> None:
    """Run `stage` (on every rank, or on rank 0 only): its record is dropped before and written
    after, with `key` taken before it ran (an image added meanwhile is not in the store). The
    record is rank 0's file; a failure to write it stops every rank with one line."""
    def start() -> None:
        nonlocal key
        key = key if key is not None else plan.key(stage)
        plan.record(stage)

    grp.agree(start, only_rank0=True)
    summary = grp.agree(fn, only_rank0=True) if only_rank0 else fn()
    if grp.main and summary is not None:
        log.info(summary.line())
    grp.agree(lambda: plan.record(stage, key), only_rank0=True)


def _triage(grp: dist.Group, plan: Plan, argv: list[str] | None) -> bool:
    """Decide from a class-stratified sample whether the old head is a relabel, growing the
    sample while the decision is open. True: it is one, and head.pt holds it (the stitch
    follows, checked on the sample's val rows, not every val image, unless --verify-data). A
    head that is not one: the full pipeline (--triage only: an error, in one line)."""
    from .extract import run_extract
    from .train import run_relabel

    args = plan.args
    key = grp.share(lambda: plan.key("triage"))
    record = grp.share(lambda: plan.load_state().get("triage"))
    if (not args.force and isinstance(record, dict) and record.get("key") == key
            and grp.share(lambda: record.get("output") == plan._output("triage",
                                                                      record.get("outcome")))):
        if grp.main:
            log.info("triage: up to date (%s)", record.get("line", record.get("outcome")))
        decision = record
    else:
        grp.agree(lambda: plan.record("triage"), only_rank0=True)
        decision = _grow(grp, plan, argv, run_extract, run_relabel)
        # kept whatever it found: a rerun with the same inputs decides nothing again
        grp.agree(lambda: plan.record("triage", key, outcome=decision["outcome"],
                                      line=decision["line"], error=decision["error"]),
                  only_rank0=True)
    relabel = decision.get("outcome") == "relabel"
    if not relabel and args.triage == "only":
        def refuse():  # one line, rank 0's
            raise DataError(str(decision.get("error") or decision.get("line")))
        grp.agree(refuse, only_rank0=True)
    if not relabel and grp.main and decision is not record:
        log.warning("%s: running the full pipeline (stage 1 on every image, then stages 2 and "
                    "3)", decision.get("line"))
    if relabel and args.verify_data is None:
        plan.stitch = plan.stitch.replace(verify_data=None)
    return relabel


def _grow(grp: dist.Group, plan: Plan, argv, run_extract, run_relabel) -> dict:
    """The triage's rounds: a sample of K images per class (train, and val when there is one),
    decided; K doubled while the decision is open and the sample can grow."""
    args = plan.args
    k, images, decoded = args.triage_per_class, -1, 0
    while True:
        sizes = f"train={k}" + (f",{plan.val}={k}" if plan.val else "")
        summary = run_extract(plan.extract.replace(out=plan.sample, per_class=sizes,
                                                   verify=False), group=grp, argv=argv)
        # a larger sample is a store of its own: its images are decoded again
        decoded += 0 if summary.no_op else summary.images
        if grp.main:
            log.info("triage: sample of %d per class: %s", k, summary.line())

        def decide(k: int = k, decoded: int = decoded) -> dict:
            result = run_relabel(plan.relabel.replace(out=plan.head), argv)
            d = result.decision
            out = {"outcome": d.outcome, "line": d.line(), "images": sum(d.images.values()),
                   "error": _refusal(result)}
            store = S.FeatureStore.open(plan.sample)
            report = T_.report(d, store.classes, store.class_names, result.head_classes)
            report["sample_per_class"] = k
            report["images_decoded"] = decoded  # every round's sample
            data = json.dumps(report, indent=1, default=str).encode()
            atomic_write(plan.report, lambda f: f.write(data))
            log.info(d.line())
            return out

        decision = _repairing(
            grp, "the triage", "deciding again", lambda: grp.share(decide),
            lambda sizes=sizes: run_extract(plan.extract.replace(
                out=plan.sample, per_class=sizes, verify=True), group=grp, argv=argv),
            lambda: grp.share(decide))
        grown = decision["images"] > images
        images = decision["images"]
        if decision["outcome"] != "grow":
            return decision
        if 2 * k > args.triage_max_per_class or not grown:
            decision["outcome"] = "train"
            why = ("the sample no longer grows" if not grown else
                   f"--triage-max-per-class {args.triage_max_per_class} reached")
            decision["error"] = f"{decision['error']} ({why})"
            decision["line"] = f"{decision['line']}; {why}"
            return decision
        k *= 2


def _repairing(grp: dist.Group, who: str, again: str, attempt, repair, retry):
    """`attempt()`; when it finds a store damaged (a chunk that fails its checksum shows only as
    it is read), `repair()` (stage 1 --verify reads every chunk and recomputes the bad ones),
    then `retry()`, once. Any other error, and a store other than damaged, is the user's."""
    try:
        return attempt()
    except QuickFixError as exc:
        if not (isinstance(exc, StoreDamaged) or getattr(exc, "kind", "") == "StoreDamaged"):
            raise
        if grp.main:
            log.warning("%s found the store damaged (%s): repairing it with stage 1 --verify, "
                        "then %s", who, exc.raw, again)
    repair()
    return retry()


def _refusal(result) -> str:
    """The one line `--triage only` ends with when the triage found no relabel."""
    d = result.decision
    if d.outcome == "grow":
        return (f"the sample is too small to decide: {d.reason}; the smallest class, "
                f"{d.smallest_class}, has {d.smallest_count} image(s) in the sample")
    return f"not a relabel: {d.reason}"


def _stitch(plan: Plan) -> None:
    from .stitch import run_stitch

    if plan.stitch.verify_data is None and plan.args.verify_data is not False:
        if plan.verify_data is None:
            log.info("no val/ split under %s: the fixed model is not checked end to end",
                     plan.args.data_root)
        else:
            log.info("the relabel was verified on the triage's val sample, not end to end on "
                     "every val image (--verify-data does that)")
    run_stitch(plan.stitch)


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
    """Every folder of the splits (split, class and deeper: stage 1 walks them all) with its
    modification time: adding, removing or renaming an image changes its folder's. One listing
    per folder; a file rewritten in place changes no folder (--force)."""
    h = hashlib.sha256()
    for split in splits:
        todo = [data_root / split]
        while todo:
            folder = todo.pop()
            try:
                h.update(os.fsencode(folder) + b" %d\n" % os.stat(folder).st_mtime_ns)
                with os.scandir(folder) as entries:
                    todo += sorted((Path(e.path) for e in entries
                                    if not e.name.startswith(".") and e.is_dir()), reverse=True)
            except OSError:
                h.update(os.fsencode(folder) + b" -\n")
    return h.hexdigest()


def _store_identity(store: Path) -> list | None:
    """A finished store with every chunk file there (by listing), as its fingerprint digest and
    creation time (a store made anew, even from the same inputs, is another); else None."""
    try:
        features = S.FeatureStore.open(store)
        if features.check():
            return None
        for split in features.splits:
            features.complete(split)
        return [features.digest, features.created_utc]
    except Exception:  # noqa: BLE001 - any doubt about the store: it is not there
        return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
