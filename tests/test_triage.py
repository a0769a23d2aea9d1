"""The triage: a relabel fixed from a class-stratified sample, without training; anything else
falls back to the full pipeline. Real digits, a real ResNet-18 backbone, real stores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_features
import stitch_checkpoint
import train_head
from pipeline import data as D
from pipeline import store as S
from pipeline import triage as T
from pipeline.checkpoint import safe_load
from pipeline.demo import NAMES
from pipeline.train import OLD_HEAD, _best_on_holdout

from .conftest import training_checkpoint

SORTED = sorted(NAMES)  # the digits folders sort as eight, five, four, ...
FAST = ["--resize", "32", "--crop", "32", "--decoder", "pil", "--float32", "--num-threads", "2"]


def command() -> str:
    return str(Path(sys.executable).parent / "quickfix-labels")


@pytest.fixture(scope="module")
def case(digits, tmp_path_factory):
    """The right head for the digits backbone (softmax regression on every train row, in the
    correct order zero..nine), and the class-order file naming that order."""
    root = tmp_path_factory.mktemp("triage")
    fs = S.FeatureStore.open(digits["store"])  # made without --class-order: folder order

    def rows(split):
        ok = fs.read(split, "ok").astype(bool)
        return T.Rows(torch.as_tensor(fs.read(split, "features")[ok]),
                      fs.read(split, "labels")[ok].astype(np.int64))

    tr, va = rows("train"), rows("val")
    w, b = T.fit_reference(tr, 10, iterations=150)
    acc = float(T.top1_of(va, w, b).mean())
    assert acc > 0.85  # a head worth relabelling
    to_correct = [SORTED.index(n) for n in NAMES]  # correct class t = folder-order row
    order = root / "order.txt"
    order.write_text("\n".join(NAMES) + "\n")
    return {"root": root, "w_sorted": w, "b_sorted": b, "w": w[to_correct],
            "b": b[to_correct], "acc": acc, "order": order, "digits": digits, "val": va,
            "train": tr}


def checkpoint(case, path: Path, weight, bias, **extra) -> Path:
    """A training script's checkpoint of the digits backbone with this head."""
    model = case["digits"]["model"]
    ck = training_checkpoint(model, "resnet18", **extra)
    ck["model"]["module.fc.weight"] = weight.clone()
    ck["model"]["module.fc.bias"] = bias.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, path)
    return path


def quickfix(case, ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([command(), "--checkpoint", str(ckpt), "--data-root",
                           str(case["digits"]["root"] / "data"), "--class-order",
                           str(case["order"]), *FAST, *extra],
                          capture_output=True, text=True)


def fixed_head(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ck = safe_load(path)
    return ck["model"]["module.fc.weight"], ck["model"]["module.fc.bias"], ck


# --- relabels: fixed without training, from a sample ------------------------------------------

def test_a_name_sorted_head_is_relabelled_from_a_sample(case):
    """The demo's bug: rows in the folder (name) order, the checkpoint's class_to_idx saying
    so. Fixed with the right head's rows exactly, from a few images per class, no full store."""
    ckpt = checkpoint(case, case["root"] / "byname" / "checkpoint_best.pth", case["w_sorted"],
                      case["b_sorted"], class_to_idx={n: i for i, n in enumerate(SORTED)},
                      best_acc1=np.float64(100 * case["acc"]))
    proc = quickfix(case, ckpt)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("triage: a permutation"))
    assert "(the checkpoint's own class mapping)" in line and "9 of 10 classes moved" in line
    fixed = ckpt.parent / "fixed"
    w, b, ck = fixed_head(fixed / "checkpoint_best.pth")
    assert torch.equal(w, case["w"]) and torch.equal(b, case["b"])  # the old rows, moved
    assert ck["class_to_idx"] == {n: i for i, n in enumerate(NAMES)}
    assert not (fixed / "features.zarr").exists()  # no pass over every image
    report = json.loads((fixed / "checkpoint_best.triage.json").read_text())
    assert report["outcome"] == "relabel" and report["kind"] == "permutation"
    assert [(c["class"], c["old_index"], c["old_label"]) for c in report["classes"]] == \
        [(n, SORTED.index(n), n) for n in NAMES]
    sample = S.FeatureStore.open(fixed / "triage" / "sample.zarr")
    decoded = sum(len(sample.read(s, "labels")) for s in sample.splits)
    assert decoded == sum(report["images"].values()) < 0.25 * 1797
    k = report["sample_per_class"]
    assert sample.per_class == {"train": k, "val": k}
    for split in ("train", "val"):
        assert np.bincount(sample.read(split, "labels"), minlength=10).tolist() == [k] * 10
    # a rerun: nothing to do
    again = quickfix(case, ckpt)
    assert again.returncode == 0, again.stderr
    assert "triage: up to date" in again.stderr and "extract:" not in again.stderr
    # a sample chunk damaged on disk: found as the decision reads it, repaired, decided again
    chunk = fixed / "triage" / "sample.zarr" / "train" / "features" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    k = json.loads((fixed / "checkpoint_best.triage.json").read_text())["sample_per_class"]
    again = quickfix(case, ckpt, "--triage-per-class", str(k))  # that sample, at once
    assert again.returncode == 0, again.stderr
    assert "the triage found the store damaged" in again.stderr
    assert torch.equal(fixed_head(fixed / "checkpoint_best.pth")[0], case["w"])
    # the same sample, by hand: a head whose checkpoint records no mapping is named by its order
    plain = checkpoint(case, case["root"] / "byname" / "plain.pth", case["w_sorted"],
                       case["b_sorted"])
    head = case["root"] / "byname" / "plain-head.pt"
    assert train_head.main(["--features", str(fixed / "triage" / "sample.zarr"),
                            "--checkpoint", str(plain), "--relabel", "--out", str(head)]) == 0
    record = torch.load(head, weights_only=True)
    assert record["diagnosis"]["relabel"]["named"] == "sorted by class id (folder name)"
    assert torch.equal(record["weight"], case["w"])


def test_an_offset_head_loses_its_background_row(case):
    """TF-slim style: 11 outputs, a background class at 0, the rest in the right order."""
    g = torch.Generator().manual_seed(3)
    w = torch.cat([torch.randn(1, case["w"].shape[1], generator=g) * 0.01, case["w"]])
    b = torch.cat([torch.tensor([-5.0]), case["b"]])
    ckpt = checkpoint(case, case["root"] / "offset" / "checkpoint_best.pth", w, b)
    proc = quickfix(case, ckpt, "--triage", "only")
    assert proc.returncode == 0, proc.stderr
    assert "triage: a constant offset (a background class at 0); 10 of 10 classes moved" \
        in proc.stderr
    fw, fb, _ = fixed_head(ckpt.parent / "fixed" / "checkpoint_best.pth")
    assert fw.shape == (10, w.shape[1]) and torch.equal(fw, case["w"])
    assert torch.equal(fb, case["b"])


def test_a_superset_head_and_a_metadata_only_fix_by_hand(case, tmp_path):
    """Stage 1 --per-class, train_head.py --relabel and stitch_checkpoint.py by hand: a head
    over 13 classes (3 this dataset lacks), its rows shuffled, its class_to_idx right; and a
    right head whose recorded mapping is wrong."""
    gen = torch.Generator().manual_seed(5)
    extra = torch.randn(3, case["w"].shape[1], generator=gen) * 0.05
    labels = list(NAMES) + ["ten", "eleven", "twelve"]
    perm = torch.randperm(13, generator=gen)  # row perm[i] holds class labels[i]
    w = torch.zeros(13, case["w"].shape[1])
    b = torch.full((13,), -3.0)
    w[perm] = torch.cat([case["w"], extra])
    b[perm[:10]] = case["b"]
    big = checkpoint(case, tmp_path / "big.pth", w, b,
                     class_to_idx={labels[i]: int(perm[i]) for i in range(13)},
                     best_acc1=np.float64(100 * case["acc"]))
    store = tmp_path / "sample.zarr"
    assert extract_features.main(["--checkpoint", str(big), "--data-root",
                                  str(case["digits"]["root"] / "data"), "--out", str(store),
                                  "--class-order", str(case["order"]), "--per-class",
                                  "train=16,val=16", *FAST]) == 0
    head = tmp_path / "head.pt"
    assert train_head.main(["--features", str(store), "--checkpoint", str(big), "--relabel",
                            "--out", str(head)]) == 0
    record = torch.load(head, weights_only=True)
    relabel = record["diagnosis"]["relabel"]
    assert (relabel["kind"], relabel["named"]) == ("subset",
                                                    "the checkpoint's own class mapping")
    assert relabel["mapping"] == perm[:10].tolist()
    out = tmp_path / "fixed.pth"
    assert stitch_checkpoint.main(["--checkpoint", str(big), "--head", str(head), "--out",
                                   str(out)]) == 0
    fw, fb, ck = fixed_head(out)
    assert torch.equal(fw, case["w"]) and torch.equal(fb, case["b"])
    assert ck["class_to_idx"] == {n: i for i, n in enumerate(NAMES)}

    # metadata only: the rows are right, the class_to_idx recorded with them is not
    meta = checkpoint(case, tmp_path / "meta.pth", case["w"], case["b"],
                      class_to_idx={n: i for i, n in enumerate(SORTED)},
                      best_acc1=np.float64(100 * case["acc"]))
    head2 = tmp_path / "head2.pt"
    assert train_head.main(["--features", str(store), "--checkpoint", str(meta), "--relabel",
                            "--out", str(head2)]) == 0
    relabel = torch.load(head2, weights_only=True)["diagnosis"]["relabel"]
    assert relabel["kind"] == "metadata" and relabel["moved"] == 0
    out2 = tmp_path / "fixed2.pth"
    assert stitch_checkpoint.main(["--checkpoint", str(meta), "--head", str(head2), "--out",
                                   str(out2)]) == 0
    fw, fb, ck = fixed_head(out2)
    assert torch.equal(fw, case["w"]) and torch.equal(fb, case["b"])
    assert ck["class_to_idx"] == {n: i for i, n in enumerate(NAMES)}


# --- not relabels: the full pipeline, or one line ---------------------------------------------

def test_a_random_head_is_not_a_relabel(case):
    ckpt = checkpoint(case, case["root"] / "random" / "checkpoint_best.pth",
                      torch.randn(10, case["w"].shape[1]) * 0.05, torch.zeros(10))
    proc = quickfix(case, ckpt, "--triage", "only")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: not a relabel: the old head's rows do not follow the classes")
    assert "Traceback" not in proc.stderr
    assert not (ckpt.parent / "fixed" / "checkpoint_best.pth").exists()
    # the decision is kept: --triage only again refuses with the same line, deciding nothing
    again = quickfix(case, ckpt, "--triage", "only")
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == last
    assert "triage: up to date" in again.stderr and "extract_features: " not in again.stderr
    assert not (ckpt.parent / "fixed" / "features.zarr").exists()  # no full pipeline
    proc = quickfix(case, ckpt, "--fix-epochs", "3")
    assert proc.returncode == 0, proc.stderr
    # the kept decision, then the full pipeline
    assert "triage: up to date (triage: not a relabel: " in proc.stderr
    assert "extract: " in proc.stderr and "train_head: " in proc.stderr
    state = json.loads((ckpt.parent / "fixed" / ".quickfix-labels.json").read_text())
    assert state["triage"]["outcome"] == "train" and "stitch" in state
    # stage 2 rewrote head.pt, which is no output of a triage that found no relabel: a rerun
    # finds everything up to date
    proc = quickfix(case, ckpt, "--fix-epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "triage: up to date" in proc.stderr
    assert "triage: sample of" not in proc.stderr and "train_head: " not in proc.stderr
    # --triage only after that: the same refusal, the fixed checkpoint left as it was
    proc = quickfix(case, ckpt, "--triage", "only")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == last


def test_a_head_trained_on_noisy_labels_falls_back_and_trains(case, tmp_path):
    """A head from labels where three classes were merged into others: right in order for the
    rest, but no relabel of a right head. The triage falls back; the fixed head is the one the
    full pipeline makes without it."""
    tr = case["train"]
    y = tr.y.copy()
    merge = {0: 1, 2: 3, 4: 5}  # in the store's (folder) order
    for a, into in merge.items():
        y[y == a] = into
    w, b = T.fit_reference(T.Rows(tr.x, y), 10, iterations=100)
    noisy_acc = float(T.top1_of(case["val"], w, b).mean())
    to_correct = [SORTED.index(n) for n in NAMES]
    w, b = w[to_correct], b[to_correct]
    results = {}
    for mode in ("auto", "off"):
        ckpt = checkpoint(case, tmp_path / mode / "checkpoint_best.pth", w, b,
                          best_acc1=np.float64(100 * noisy_acc))
        proc = quickfix(case, ckpt, "--triage", mode, "--fix-epochs", "4", "--seed", "1")
        assert proc.returncode == 0, proc.stderr
        results[mode] = torch.load(ckpt.parent / "fixed" / "head.pt", weights_only=True)
        if mode == "auto":
            assert "running the full pipeline" in proc.stderr
            assert "triage: a " not in proc.stderr  # never accepted
            assert "relabel" not in results[mode]["diagnosis"]
    for mode in results:
        assert results[mode]["metrics"]["val_top1"] > noisy_acc + 0.1
    assert results["auto"]["metrics"]["val_top1"] == results["off"]["metrics"]["val_top1"]


def test_each_copy_keeps_its_own_rows_when_stage_2_chooses_them(case, tmp_path):
    """An EMA copy whose backbone differs a little, both copies with the name-sorted head: the
    full pipeline (--train) runs stages 1 and 2 on each copy; where stage 2 chooses a copy's own
    permuted old head, that copy gets its own rows re-ordered, not the other copy's head."""
    ckpt = checkpoint(case, tmp_path / "ema" / "checkpoint_best.pth", case["w_sorted"],
                      case["b_sorted"])
    ck = torch.load(ckpt, weights_only=False)
    g = torch.Generator().manual_seed(1)
    ck["model_ema"] = {k: (v + 0.02 * v.abs().mean() * torch.randn(v.shape, generator=g)
                           if v.is_floating_point() and not k.startswith("module.fc.") else
                           v.clone()) for k, v in ck["model"].items()}
    ck["model_ema"]["module.fc.weight"] = ck["model"]["module.fc.weight"] * 0.9
    ck["model_ema"]["n_averaged"] = torch.tensor(3)
    torch.save(ck, ckpt)
    proc = quickfix(case, ckpt, "--train", "--fix-epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "the checkpoint's EMA copy has a backbone of its own" in proc.stderr
    out = ckpt.parent / "fixed"
    fixed = safe_load(out / "checkpoint_best.pth")
    to_correct = torch.as_tensor([SORTED.index(n) for n in NAMES])
    chosen = []
    for key, head in (("model", "head.pt"), ("model_ema", "head.ema.pt")):
        record = torch.load(out / head, weights_only=True)
        w = fixed[key]["module.fc.weight"]
        assert torch.equal(w, record["weight"])
        chosen.append(record["metrics"]["candidate"])
        if chosen[-1] == OLD_HEAD:  # its own rows, re-ordered
            assert torch.equal(w, ck[key]["module.fc.weight"][to_correct])
    assert OLD_HEAD in chosen, chosen
    assert not torch.equal(fixed["model"]["module.fc.weight"],
                           fixed["model_ema"]["module.fc.weight"])
    assert any("each copy got its own fix" in n for n in fixed["quickfix"]["notices"])


def test_relabel_by_hand_on_a_full_store_and_a_non_finite_head(case, tmp_path, capsys):
    """Stage 2 --relabel on a store of every image decides on at most TRIAGE_ROWS_PER_CLASS rows
    per class and split; a head holding NaN is no relabel (one line, no traceback)."""
    from pipeline.train import TRIAGE_ROWS_PER_CLASS

    store = case["digits"]["store"]
    ckpt = checkpoint(case, tmp_path / "by-hand.pth", case["w_sorted"], case["b_sorted"])
    head = tmp_path / "head.pt"
    assert train_head.main(["--features", str(store), "--checkpoint", str(ckpt), "--relabel",
                            "--out", str(head)]) == 0
    relabel = torch.load(head, weights_only=True)["diagnosis"]["relabel"]
    fs = S.FeatureStore.open(store)
    per_class = {s: np.bincount(fs.read(s, "labels")[fs.read(s, "ok").astype(bool)],
                                minlength=10) for s in ("train", "val")}
    assert per_class["train"].min() > TRIAGE_ROWS_PER_CLASS  # the cap applies to train
    assert relabel["images"] == {
        "diagnosis": 10 * TRIAGE_ROWS_PER_CLASS,
        "verification": int(np.minimum(per_class["val"], TRIAGE_ROWS_PER_CLASS).sum())}
    assert relabel["outcome"] == "relabel" and relabel["mapping"] == list(range(10))
    capsys.readouterr()
    w = case["w_sorted"].clone()
    w[3, 5] = float("nan")
    bad = checkpoint(case, tmp_path / "nan.pth", w, case["b_sorted"])
    assert train_head.main(["--features", str(store), "--checkpoint", str(bad), "--relabel",
                            "--out", str(tmp_path / "nan-head.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: not a relabel: the old head's weights hold NaN or inf")
    assert not (tmp_path / "nan-head.pt").exists()


def test_decisions_that_cannot_be_taken_are_one_line(case):
    # a sample too small to decide, its smallest class named
    ckpt = checkpoint(case, case["root"] / "small" / "checkpoint_best.pth", case["w_sorted"],
                      case["b_sorted"], best_acc1=np.float64(100 * case["acc"]))
    proc = quickfix(case, ckpt, "--triage", "only", "--triage-per-class", "1",
                    "--triage-max-per-class", "1")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the sample is too small to decide: ")
    assert "has 1 image(s) in the sample" in last and "Traceback" not in proc.stderr
    # a head with fewer outputs than classes: the ones it cannot predict named
    few = checkpoint(case, case["root"] / "few" / "checkpoint_best.pth", case["w"][:8],
                     case["b"][:8])
    proc = quickfix(case, few, "--triage", "only")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "the head has 8 outputs for 10 classes: it cannot predict 2 of them (eight, nine)" \
        in last
    assert not (few.parent / "fixed" / "checkpoint_best.pth").exists()


# --- units ------------------------------------------------------------------------------------

def test_the_per_class_sample_is_stratified_and_nested(tmp_path):
    files = [f"c{c}/{i:03d}.jpg" for c in range(4) for i in range(10 if c else 3)]
    labels = np.asarray([int(f[1]) for f in files], dtype=np.int32)
    split = D.Split("train", tmp_path, files, labels)
    small, large = D.sample_per_class(split, 2), D.sample_per_class(split, 5)
    assert np.bincount(small.labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(large.labels).tolist() == [3, 5, 5, 5]  # class 0 has 3 files
    assert set(small.files) < set(large.files)
    shuffled = D.Split("train", tmp_path, files[::-1], labels[::-1])
    assert set(D.sample_per_class(shuffled, 2).files) == set(small.files)


@pytest.mark.parametrize("text, message", [
    ("0", "expected a count of images per class"),
    ("train=x", "expected a count of images per class"),
    ("2,train=2", "give one K for every split"),
    ("test=2", "test"),
])
def test_per_class_errors_are_one_line(tmp_path, digits, capsys, text, message):
    rc = extract_features.main(["--checkpoint", str(digits["ckpt"]), "--data-root",
                                str(digits["root"] / "data"), "--out", str(tmp_path / "s.zarr"),
                                "--per-class", text, *FAST])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def synthetic(c=20, d=32, per=12, seed=0, noise=0.6):
    """Features in clusters, the right head for them."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d)) * 2
    y = np.repeat(np.arange(c), per)
    x = centers[y] + rng.normal(size=(y.size, d)) * noise
    w = torch.as_tensor(centers, dtype=torch.float32)
    b = -0.5 * (w * w).sum(1)
    return T.Rows(torch.as_tensor(x, dtype=torch.float32), y), w, b


def test_an_unnamed_permutation_needs_every_class_clear_and_a_bad_one_fails():
    rows, w, b = synthetic()
    diag, verify = T.split_for_verification(rows)
    classes = [f"c{i:02d}" for i in range(20)]
    perm = torch.as_tensor(np.random.default_rng(1).permutation(20))
    old_w, old_b = torch.zeros_like(w), torch.zeros_like(b)
    old_w[perm], old_b[perm] = w, b  # class t at row perm[t]
    d = T.decide(diag, verify, old_w, old_b, classes=classes, names=None, head_classes=None,
                 recorded=None)
    assert d.outcome == "relabel" and d.named is None and d.mapping == perm.tolist()
    # the verification contradicts the diagnosis: right rows on the diagnosis rows only
    bad_verify = T.Rows(verify.x, (verify.y + 1) % 20)
    d = T.decide(diag, bad_verify, old_w, old_b, classes=classes, names=None,
                 head_classes=None, recorded=None)
    assert d.outcome == "train" and "verification contradicts the diagnosis" in d.reason
    # a recorded top-1 the relabelled head is far below
    d = T.decide(diag, verify, old_w * 0.02, old_b * 0.02 + torch.randn(20), classes=classes,
                 names=None, head_classes=None, recorded=1.0)
    assert d.outcome in ("train", "grow") and d.outcome != "relabel"


def test_a_superset_head_with_rows_after_the_classes_and_a_class_without_rows():
    rows, w, b = synthetic()
    diag, verify = T.split_for_verification(rows)
    classes = [f"c{i:02d}" for i in range(20)]
    # 22 outputs: the classes' rows first, two others after them (a head for a superset)
    g = torch.Generator().manual_seed(0)
    old_w = torch.cat([w, torch.randn(2, w.shape[1], generator=g) * 0.01])
    old_b = torch.cat([b, torch.full((2,), -50.0)])
    d = T.decide(diag, verify, old_w, old_b, classes=classes, names=None, head_classes=None,
                 recorded=None)
    assert d.outcome == "relabel" and d.kind == "subset" and d.mapping == list(range(20))
    assert d.named == "the first 20 of 22 outputs" and d.moved == 0
    assert "a superset head (22 outputs)" in d.line()
    # a class none of whose sampled images is usable: a larger sample may hold some
    keep = diag.y != 7
    d = T.decide(T.Rows(diag.x[torch.as_tensor(keep)], diag.y[keep]), verify, w, b,
                 classes=classes, names=None, head_classes=None, recorded=None)
    assert d.outcome == "grow" and "1 class(es) have no usable images" in d.reason
    assert "c07" in d.reason


def test_a_tie_on_the_holdout_goes_to_the_old_head():
    records = [{"candidate": "lr=1", "holdout_top1": 1.0, "holdout_loss": 0.01},
               {"candidate": OLD_HEAD, "holdout_top1": 1.0, "holdout_loss": 0.2},
               {"candidate": "lr=0.1", "holdout_top1": 0.9, "holdout_loss": 0.001}]
    assert _best_on_holdout(records) == 1
    records[1]["holdout_top1"] = 0.99
    assert _best_on_holdout(records) == 0
    records[0]["holdout_loss"] = float("nan")
    assert _best_on_holdout(records) == 1
