"""`quickfix-labels` (the installed command), `--dataset imagenet1k`, and the backbone's verdict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_features
import train_head
from pipeline import fix as F
from pipeline import store as S
from pipeline.checkpoint import recorded_accuracy, safe_load
from pipeline.errors import DataError
from pipeline.presets import PRESETS, check_folders, get_preset
from pipeline.train import judge_backbone

from .conftest import SIZE, jpeg_bytes, make_model, photo_patch, training_checkpoint

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["n03", "n01", "n02"]  # the correct order; the folders sort as n01, n02, n03
FAST = ["--resize", SIZE["resize"], "--crop", SIZE["crop"], "--decoder", "pil",
        "--chunk-rows", "8", "--num-threads", "2"]


def command() -> Path:
    """The console script the README's install step (pip install -e .) puts beside python."""
    path = Path(sys.executable).parent / "quickfix-labels"
    assert path.is_file(), f"{path} is missing: install the project (make install, or pip " \
        "install -e .) so that its console script exists"
    return path


def ran(text: str) -> set[str]:
    """The stages whose summary line the output holds ("verify:": stage 3's end-to-end run)."""
    lines = text.splitlines()
    return {s for s, start in (("extract:", "extract: "), ("train_head:", "train_head: "),
                               ("stitch:", "stitch: head replaced"),
                               ("verify:", "verify: the fixed model"))
            if any(ln.startswith(start) for ln in lines)}


def class_index(path: Path, classes: list[str]) -> Path:
    """imagenet_class_index.json form, with names."""
    path.write_text(json.dumps({str(i): [c, f"name of {c}"] for i, c in enumerate(classes)}))
    return path


# --- the installed command -------------------------------------------------------------------

def test_installed_command_takes_the_quick_fix_command_line(tmp_path, tree):
    """The quick-fix mode's command line with only the program name changed; the fixed model
    under the input's name in --checkpoint-dir, the store and head beside it; a rerun does
    nothing, a new --lr reruns stages 2 and 3 only."""
    run = tmp_path / "checkpoints"
    run.mkdir()
    ckpt = run / "checkpoint_best.pth"
    torch.save(training_checkpoint(make_model(), "resnet18",
                                   class_to_idx={c: i for i, c in enumerate(sorted(ORDER))}),
               ckpt)
    order = class_index(tmp_path / "imagenet_class_index.json", ORDER)
    base = [str(command()), "--resume", str(ckpt), "--data-root", str(tree),
            "--quick-fix-labels", "--fix-epochs", "2", "--checkpoint-dir", str(run / "fixed"),
            "--batch-size", "64", "--class-order", str(order), *FAST]

    def go(*extra: str) -> tuple[str, str]:
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stdout, proc.stderr

    out, err = go("--lr", "0.15")
    fixed = run / "fixed" / "checkpoint_best.pth"
    assert ran(err) == {"extract:", "train_head:", "stitch:", "verify:"}
    assert out.strip() == f"fixed checkpoint: {fixed}"
    assert (run / "fixed" / "features.zarr").is_dir() and (run / "fixed" / "head.pt").is_file()
    new = safe_load(fixed)
    head = torch.load(run / "fixed" / "head.pt", weights_only=True)
    assert head["config"]["lrs"] == [0.15] and head["config"]["epochs"] == 2
    assert head["config"]["batch_size"] == 64  # the head's batch; stage 1 keeps its own
    store = S.open_store(run / "fixed" / "features.zarr")
    assert store.attrs["record"]["settings"]["batch_size"] == 128
    assert torch.equal(new["model"]["module.fc.weight"], head["weight"])
    # the correct order, with the names the class-order file gives
    assert new["id_to_class"] == [[c, f"name of {c}"] for c in ORDER]
    assert new["class_to_idx"] == {c: i for i, c in enumerate(ORDER)}
    assert "backbone" in head["diagnosis"] and head["diagnosis"]["recorded_top1"] == 0.71

    out, err = go("--lr", "0.15")
    # the triage found no relabel: kept, with stage 2's head.pt, and not decided again
    assert ran(err) == set() and err.count(": up to date") == 4, err
    out, err = go("--lr", "0.3")
    assert ran(err) == {"train_head:", "stitch:", "verify:"}, err
    assert torch.load(run / "fixed" / "head.pt", weights_only=True)["config"]["lrs"] == [0.3]
    assert "stage 1 (extract_features): up to date" in err
    # python -m pipeline is the same command
    proc = subprocess.run([sys.executable, "-m", "pipeline", *base[1:], "--lr", "0.3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and ran(proc.stderr) == set(), proc.stderr


def test_an_ema_copy_with_its_own_backbone_gets_its_own_head(tmp_path, tree, capsys):
    """torchvision references --model-ema: `model_ema` (an AveragedModel's state dict) whose
    backbone differs from the model's. Each copy gets a head trained on its own features; with
    --head-for-every-copy, the model's head goes into both."""
    import stitch_checkpoint

    model = make_model()
    ck = training_checkpoint(model, "resnet18")
    g = torch.Generator().manual_seed(5)
    ema = {f"module.{k}": (v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=g)
                           if v.is_floating_point() else v.clone())
           for k, v in model.state_dict().items()}
    ck["model_ema"] = {**ema, "n_averaged": torch.tensor(17)}
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save(ck, ckpt)
    out = tmp_path / "fx"
    args = ["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir", str(out),
            "--fix-epochs", "2", "--lr", "0.1", "--train", *FAST]
    assert F.main(args) == 0
    err = capsys.readouterr().err
    assert "the checkpoint's EMA copy has a backbone of its own" in err
    head = torch.load(out / "head.pt", weights_only=True)
    own = torch.load(out / "head.ema.pt", weights_only=True)
    assert head["store"]["ema"] is False and own["store"]["ema"] is True
    assert head["store"]["backbone_sha256"] != own["store"]["backbone_sha256"]
    assert S.open_store(out / "features.ema.zarr").attrs["checkpoint"]["ema"] is True
    fixed = safe_load(out / "checkpoint_best.pth")
    assert torch.equal(fixed["model"]["module.fc.weight"], head["weight"])
    assert torch.equal(fixed["model_ema"]["module.fc.weight"], own["weight"])
    assert torch.equal(fixed["model_ema"]["module.fc.bias"], own["bias"])
    assert not torch.equal(head["weight"], own["weight"])
    for key in ("module.conv1.weight", "module.layer1.0.bn1.running_mean"):
        assert torch.equal(fixed["model"][key], ck["model"][key])
        assert torch.equal(fixed["model_ema"][key], ema[key])
    assert fixed["model_ema"]["n_averaged"] == 17
    assert [c["copy"] for c in fixed["quickfix"]["copy_heads"]] == ["model_ema"]
    assert any("each copy got its own fix, found on its own features: model head.pt, "
               "model_ema head.ema.pt" in n for n in fixed["quickfix"]["notices"])
    # a rerun: every stage up to date, the other copy's two included
    assert F.main(args) == 0
    err = capsys.readouterr().err
    assert ran(err) == set() and err.count(": up to date") == 5, err
    # the same by hand: --copy-heads; a head of no other copy is refused in one line
    by_hand = tmp_path / "by-hand.pth"
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(out / "head.pt"),
                                   "--copy-heads", str(out / "head.ema.pt"),
                                   "--out", str(by_hand)]) == 0
    assert torch.equal(safe_load(by_hand)["model_ema"]["module.fc.weight"], own["weight"])
    capsys.readouterr()
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(out / "head.pt"),
                                   "--copy-heads", str(out / "head.pt"), "--out",
                                   str(tmp_path / "no.pth")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained on the features of no other copy" in line
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(out / "head.pt"),
                                   "--out", str(tmp_path / "no.pth")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds other copies whose backbones differ (model_ema)" in line
    assert "--ema" in line and "--copy-heads" in line and "--head-for-every-copy" in line
    assert not (tmp_path / "no.pth").exists()
    # --head-for-every-copy: one head, in both copies; the other copy's stages do not run
    assert F.main([*args, "--head-for-every-copy"]) == 0
    err = capsys.readouterr().err
    assert "has a backbone of its own" not in err and ran(err) == {"stitch:", "verify:"}
    fixed = safe_load(out / "checkpoint_best.pth")
    assert torch.equal(fixed["model_ema"]["module.fc.weight"], head["weight"])


def test_a_stage_killed_midway_reruns_and_the_later_ones_follow(tmp_path, tree, ckpt, capsys):
    """A stage's record is dropped before it runs: a run killed inside stage 2 leaves it stale,
    and the head it writes makes stage 3 stale; stage 1 stands."""
    args = ["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir",
            str(tmp_path / "fx"), "--fix-epochs", "1", "--lr", "0.1", *FAST]
    assert F.main(args) == 0
    state = json.loads((tmp_path / "fx" / F.STATE).read_text())
    assert set(state) == {"triage", "extract", "train", "stitch"}
    assert state["triage"]["outcome"] == "train"  # a random head: no relabel
    plan = F.Plan(F.build_parser().parse_args(args))
    plan.record("train")  # what a kill inside stage 2 leaves
    assert set(json.loads((tmp_path / "fx" / F.STATE).read_text())) == {"triage", "extract",
                                                                         "stitch"}
    assert [plan.stale(s) for s in F.STAGES] == [False, True, False]
    capsys.readouterr()
    assert F.main(args) == 0
    assert ran(capsys.readouterr().err) == {"train_head:", "stitch:", "verify:"}
    assert [plan.stale(s) for s in F.STAGES] == [False, False, False]
    (tmp_path / "fx" / "checkpoint_best.pth").unlink()  # an output removed: its stage reruns
    assert [plan.stale(s) for s in F.STAGES] == [False, False, True]
    assert F.main(args) == 0
    assert ran(capsys.readouterr().err) == {"stitch:", "verify:"}
    # flags that change how stage 1 runs, not what it makes, leave everything standing
    assert F.main([*args, "--num-threads", "1", "--extract-batch-size", "5"]) == 0
    assert ran(capsys.readouterr().err) == set()
    # --verify reads the whole store: stage 1 runs, finds it sound, the others stand
    assert F.main([*args, "--verify"]) == 0
    assert ran(capsys.readouterr().err) == {"extract:"}
    # a damaged state file: every stage runs again (stage 1 finds its store finished)
    (tmp_path / "fx" / F.STATE).write_text("{not json")
    assert F.main(args) == 0
    assert ran(capsys.readouterr().err) == {"extract:", "train_head:", "stitch:", "verify:"}
    assert plan.stale("extract") is False and F.main([*args, "--force"]) == 0
    assert ran(capsys.readouterr().err) == {"extract:", "train_head:", "stitch:", "verify:"}


def test_new_images_rerun_stage_1(tmp_path, tree, ckpt, photos, capsys):
    args = ["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir",
            str(tmp_path / "fx"), "--fix-epochs", "1", *FAST]
    assert F.main(args) == 0
    capsys.readouterr()
    (tree / "train" / "n02" / "new.JPEG").write_bytes(
        jpeg_bytes(photo_patch(photos, np.random.default_rng(5)), quality=90))
    assert F.main(args) == 0
    assert ran(capsys.readouterr().err) == {"extract:", "train_head:", "stitch:", "verify:"}
    store = S.open_store(tmp_path / "fx" / "features.zarr")
    assert "n02/new.JPEG" in list(S.read_rows(store, "train", "files"))
    # an image in a folder below a class folder (stage 1 walks them too)
    (tree / "train" / "n01" / "more").mkdir()
    assert F.main(args) == 0
    capsys.readouterr()
    (tree / "train" / "n01" / "more" / "deep.JPEG").write_bytes(
        jpeg_bytes(photo_patch(photos, np.random.default_rng(6)), quality=90))
    assert F.main(args) == 0
    assert ran(capsys.readouterr().err) == {"extract:", "train_head:", "stitch:", "verify:"}
    store = S.open_store(tmp_path / "fx" / "features.zarr")
    assert "n01/more/deep.JPEG" in list(S.read_rows(store, "train", "files"))


def test_a_store_replaced_by_hand_is_made_again(tmp_path, tree, ckpt, capsys):
    """The store in --checkpoint-dir is the command's: rebuilt by hand from other inputs (another
    class order), it is made again from the command's before stage 2 trains on it."""
    args = ["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir",
            str(tmp_path / "fx"), "--fix-epochs", "1", *FAST]
    assert F.main(args) == 0
    order = tmp_path / "order.txt"
    order.write_text("\n".join(ORDER) + "\n")
    store = tmp_path / "fx" / "features.zarr"
    assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(tree),
                                  "--class-order", str(order), "--out", str(store),
                                  "--overwrite", *FAST]) == 0
    capsys.readouterr()
    assert F.main([*args, "--lr", "0.2"]) == 0
    assert ran(capsys.readouterr().err) == {"extract:", "train_head:", "stitch:", "verify:"}
    assert list(S.open_store(store).attrs["classes"]) == sorted(ORDER)


def test_class_names_follow_the_latest_run(tmp_path, tree, ckpt):
    """Names are not an input of the features: a rerun in the same order with other names (or
    none) changes the store's names, never its features."""
    store = tmp_path / "f.zarr"
    named = class_index(tmp_path / "named.json", ORDER)
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(ORDER) + "\n")
    odd = tmp_path / "odd.json"  # a name that is not text: no names at all
    odd.write_text(json.dumps([[c, None] for c in ORDER]))
    want = [f"name of {c}" for c in ORDER]
    for order, names in ((named, want), (plain, None), (named, want), (odd, None)):
        assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(tree),
                                      "--class-order", str(order), "--out", str(store),
                                      *FAST]) == 0
        assert S.open_store(store).attrs.get("class_names") == names


def test_a_damaged_store_is_repaired_by_the_next_run(tmp_path, tree, ckpt, capsys):
    """A features chunk whose bytes changed passes the listing; stage 2 finds it by its
    checksum, and the command repairs the store (stage 1 --verify) and trains again."""
    args = ["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir",
            str(tmp_path / "fx"), "--fix-epochs", "1", *FAST]
    assert F.main(args) == 0
    store = tmp_path / "fx" / "features.zarr"
    chunk = S.chunk_path(S.open_store(store), "train", "features", 0)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert F.main([*args, "--lr", "0.2"]) == 0
    err = capsys.readouterr().err
    assert "stage 2 found the store damaged" in err and "repairing it" in err
    assert not S.verify_store(S.open_store(store))  # repaired: every chunk reads back clean
    assert torch.load(tmp_path / "fx" / "head.pt", weights_only=True)["config"]["lrs"] == [0.2]


def test_user_errors_are_one_line(tmp_path, tree, ckpt, capsys):
    base = ["--resume", str(ckpt), "--data-root", str(tree), *FAST]
    cases = [
        (["--checkpoint-dir", str(ckpt.parent)], "is the input's own folder"),
        (["--checkpoint-dir", str(ckpt)], "is a file; give a directory"),
        (["--checkpoint-dir", str(tmp_path / "d"), "--dataset", "imagenet22k"],
         "--dataset imagenet22k: not a known dataset (known: imagenet1k)"),
        (["--checkpoint-dir", str(tmp_path / "d"), "--dataset", "imagenet1k"],
         "--dataset imagenet1k: the class folders do not match its 1000 classes"),
        (["--checkpoint-dir", "/"], "give a folder of its own, not the root"),
        # the later stages' flags are checked before stage 1 runs, in this command's names
        (["--checkpoint-dir", str(tmp_path / "d"), "--lr", "abc"], "--lr"),
        (["--checkpoint-dir", str(tmp_path / "d"), "--fix-epochs", "-1"],
         "--fix-epochs -1: must be 0 or more"),
        (["--checkpoint-dir", str(tmp_path / "d"), "--extract-batch-size", "0"],
         "--extract-batch-size 0: must be at least 1"),
        (["--checkpoint-dir", str(tmp_path / "d"), "--verify-batch-size", "0"],
         "--verify-batch-size 0: must be at least 1"),
        (["--checkpoint-dir", str(tmp_path / "d"), "--holdout-fraction", "1.5"],
         "--holdout-fraction 1.5"),
    ]
    for extra, message in cases:
        assert F.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "d" / "features.zarr").exists()  # refused before stage 1
    assert F.main(["--resume", str(tmp_path / "nope.pth"), "--data-root", str(tree)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_checkpoint_dir_dot_and_a_hand_set_rank(tmp_path, tree, ckpt, monkeypatch):
    """--checkpoint-dir . works from any folder; RANK/WORLD_SIZE set by hand (no torchrun) do
    not make the command extract a share only: it does the whole job."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert F.main(["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir", ".",
                   "--fix-epochs", "1", *FAST]) == 0
    assert (work / "checkpoint_best.pth").is_file()
    assert not S.check_store(S.open_store(work / "features.zarr"))


def test_every_folder_counts_whatever_its_name(tmp_path):
    """A folder name that is not UTF-8 is hashed as its bytes; a file added below it changes
    the digest."""
    root = tmp_path / "data"
    odd = Path(os.fsdecode(os.fsencode(str(root / "train" / "n01")) + b"/caf\xe9"))
    odd.mkdir(parents=True)
    before = F._folders_digest(root, ["train"])
    os.utime(odd, ns=(1, 1))
    (odd / "x.JPEG").write_bytes(b"x")
    assert F._folders_digest(root, ["train"]) != before


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, tree, ckpt, capsys):
    with S.WriterLock(tmp_path / "fx"):
        rc = F.main(["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir",
                     str(tmp_path / "fx"), *FAST])
    assert rc == 2
    assert "is being written by another run" in capsys.readouterr().err


def test_the_wheel_ships_the_preset_table_and_the_command(tmp_path):
    """Built from a copy of the sources (a build in the checkout would leave build/ behind,
    and a stale build/ could hide a missing package-data entry)."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pipeline", src / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("quickfix_labels-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert "pipeline/datasets/imagenet1k.tsv" in z.namelist()
        entry = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
        assert "quickfix-labels = pipeline.fix:main" in z.read(entry).decode()


# --- --dataset imagenet1k --------------------------------------------------------------------

def test_the_imagenet1k_table_is_the_standard_order():
    preset = get_preset("imagenet1k")
    ids, names = preset.classes, preset.names
    assert len(ids) == len(set(ids)) == 1000
    assert ids == sorted(ids)  # ILSVRC 2012's index order is its synsets sorted
    assert ids[0] == "n01440764" and names[0] == "tench"
    assert ids[1] == "n01443537" and names[1] == "goldfish"
    assert ids[281] == "n02123045" and names[281] == "tabby"
    assert ids[999] == "n15075141" and names[999] == "toilet tissue"
    import torchvision

    assert names == torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert PRESETS["imagenet1k"] is preset and get_preset("ImageNet1K") is preset


def test_the_preset_names_missing_extra_and_misnamed_folders():
    ids = get_preset("imagenet1k").classes
    folders = [c for c in ids if c not in ("n01440764", "n01443537", "n01484850")]
    folders += ["tench", "N01443537 ", "n99999999"]
    with pytest.raises(DataError) as info:
        check_folders(get_preset("imagenet1k"), {"train": folders, "val": ids})
    message = str(info.value)
    assert "\n" not in message
    assert "train/ has misnamed folders: 'N01443537 ' should be n01443537, 'tench' should be " \
        "n01440764" in message
    assert "train/ lacks 1 of the 1000 class folders (n01484850)" in message
    assert "train/ has 1 folder(s) that are not imagenet1k classes (n99999999)" in message
    assert "val/" not in message  # val matches
    check_folders(get_preset("imagenet1k"), {"train": ids, "val": ids})  # no error
    with pytest.raises(DataError, match=r"test/ has no class folders \(leave it out: --splits "
                       r"train val\)"):
        check_folders(get_preset("imagenet1k"), {"train": ids, "val": ids, "test": []})


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory, photos):
    """ImageNet's 1000 wnid folders, one real-photo crop each, and a ResNet-18 with 1000
    outputs; and a copy of the tree with one folder misnamed."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for wnid in get_preset("imagenet1k").classes:
        d = root / "data" / "train" / wnid
        d.mkdir(parents=True)
        for k in range(2):
            (d / f"{wnid}_{k}.JPEG").write_bytes(
                jpeg_bytes(photo_patch(photos, rng, 40, 40), quality=85))
    ckpt = root / "checkpoint_best.pth"
    torch.save(training_checkpoint(make_model(num_classes=1000), "resnet18"), ckpt)
    return root, ckpt


def test_dataset_imagenet1k_end_to_end(imagenet_tree, tmp_path):
    """The labels follow the standard order and id_to_class gets [wnid, name] pairs."""
    root, ckpt = imagenet_tree
    out = tmp_path / "fx"
    assert F.main(["--resume", str(ckpt), "--data-root", str(root / "data"), "--dataset",
                   "imagenet1k", "--checkpoint-dir", str(out), "--fix-epochs", "1",
                   "--holdout-fraction", "0.5", "--lr", "0.1", *FAST,
                   "--chunk-rows", "512", "--extract-batch-size", "250"]) == 0
    preset = get_preset("imagenet1k")
    store = S.open_store(out / "features.zarr")
    assert list(store.attrs["classes"]) == preset.classes
    assert list(store.attrs["class_names"]) == preset.names
    fixed = safe_load(out / "checkpoint_best.pth")
    assert fixed["id_to_class"][0] == ["n01440764", "tench"]
    assert fixed["id_to_class"] == [[c, n] for c, n in zip(preset.classes, preset.names,
                                                           strict=True)]


def test_dataset_imagenet1k_refuses_a_missing_wnid_folder(imagenet_tree, tmp_path, capsys):
    root, ckpt = imagenet_tree
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for wnid in get_preset("imagenet1k").classes[1:]:  # n01440764 is missing
        (data / "train" / wnid).symlink_to(root / "data" / "train" / wnid)
    rc = extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(data),
                                "--dataset", "imagenet1k", "--out", str(tmp_path / "f.zarr"),
                                *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == ["error: --dataset imagenet1k: the class folders do not match its 1000 "
                      "classes: train/ lacks 1 of the 1000 class folders (n01440764)"], err
    assert not (tmp_path / "f.zarr").exists()
    (data / "train" / "tench").symlink_to(root / "data" / "train" / "n01440764")
    assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(data),
                                  "--dataset", "imagenet1k", "--out",
                                  str(tmp_path / "f.zarr"), *FAST]) == 2
    assert "'tench' should be n01440764" in capsys.readouterr().err


def test_dataset_imagenet1k_refuses_a_head_of_other_size(imagenet_tree, tmp_path, capsys):
    root, _ = imagenet_tree
    ckpt = tmp_path / "three.pth"
    torch.save(training_checkpoint(make_model(), "resnet18"), ckpt)
    assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(root / "data"),
                                  "--dataset", "imagenet1k", "--out", str(tmp_path / "f.zarr"),
                                  *FAST]) == 2
    assert "--dataset imagenet1k has 1000 classes but the checkpoint's head fc has 3 " \
        "outputs" in capsys.readouterr().err


def test_dataset_and_class_order_are_exclusive(tree, ckpt, tmp_path, capsys):
    order = class_index(tmp_path / "order.json", ORDER)
    assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(tree),
                                  "--dataset", "imagenet1k", "--class-order", str(order),
                                  "--out", str(tmp_path / "f.zarr"), *FAST]) == 2
    assert "give --dataset or --class-order, not both" in capsys.readouterr().err


# --- the backbone's verdict ------------------------------------------------------------------

@pytest.mark.parametrize("value,key,want", [
    (torch.tensor(76.13), "best_acc1", 0.7613),  # pytorch/examples: a tensor, in percent
    (np.float64(0.71), "best_acc1", 0.71),
    (80, "acc1", 0.80),
    (0.5, "val_acc", 0.5),
    (True, "best_acc1", None),  # not a number
    ("high", "best_acc1", None),
    (float("nan"), "best_acc1", None),
    (250.0, "best_acc1", None),  # not an accuracy
])
def test_recorded_accuracy_of_training_scripts(value, key, want):
    got = recorded_accuracy({"model": {}, key: value}, "training-script", {})
    assert (got is None) if want is None else (got[1] == key and abs(got[0] - want) < 1e-6)


def test_recorded_accuracy_of_timm_and_lightning():
    assert recorded_accuracy({"metric": 79.5}, "timm", {"eval_metric": "top1"}) == \
        (0.795, "metric")
    assert recorded_accuracy({"metric": 0.9}, "timm", {"eval_metric": "loss"}) is None
    cb = {"ModelCheckpoint{'monitor': 'val_acc'}": {"monitor": "val_acc",
                                                     "best_model_score": torch.tensor(0.9)}}
    got = recorded_accuracy({"callbacks": cb}, "lightning", {})
    assert got is not None and abs(got[0] - 0.9) < 1e-6 and got[1].startswith("val_acc")
    loss = {"ModelCheckpoint{'monitor': 'val_loss'}": {"monitor": "val_loss",
                                                        "best_model_score": torch.tensor(0.3)}}
    assert recorded_accuracy({"callbacks": loss}, "lightning", {}) is None
    assert recorded_accuracy({"conv.weight": torch.zeros(1)}, "state-dict", {}) is None


def test_the_verdict_rules():
    rows = {"holdout": np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]), "val": np.array([0, 1, 2])}
    # chance is the most common class's share of the pooled rows: 5/13; untrained below +10%
    v = judge_backbone({"holdout_top1": 0.4, "val_top1": 0.4}, rows, (0.76, "acc1"), 3)
    assert v.backbone == "untrained" and "barely above chance (38.5%" in v.message
    v = judge_backbone({"holdout_top1": 0.9, "val_top1": 0.6}, rows, (0.76, "acc1"), 3)
    assert v.backbone == "weak" and "0.6" not in v.message and "60.0% val top-1" in v.message
    assert "another eval transform" in v.message
    v = judge_backbone({"holdout_top1": 0.9, "val_top1": 0.7}, rows, (0.76, "acc1"), 3)
    assert v.backbone == "ok" and v.recorded_top1 == 0.76 and v.message is None
    v = judge_backbone({"holdout_top1": 0.9, "val_top1": 0.7}, rows, None, 3)
    assert v.backbone == "ok" and v.recorded_top1 is None
    # a record near chance beside a probe that passes: the record was scored in another order
    v = judge_backbone({"holdout_top1": 0.9}, rows, (0.001, "best_acc1"), 3)
    assert v.backbone == "ok"
    v = judge_backbone({}, {}, (0.30, "best_acc1"), 3)  # nothing to probe: the record decides
    assert v.backbone == "untrained" and "never converged" in v.message
    v = judge_backbone({}, {}, None, 3)
    assert v.backbone == "unknown"
    assert recorded_accuracy({"best_acc1": 10**400}, "training-script", {}) is None


def verdict_run(tmp_path, data: Path, ckpt: Path, capsys) -> tuple[dict, str]:
    """quickfix-labels on `data`; the head's diagnosis and what was logged."""
    capsys.readouterr()
    rc = F.main(["--resume", str(ckpt), "--data-root", str(data), "--checkpoint-dir",
                 str(tmp_path / "fx"), "--fix-epochs", "5", "--holdout-fraction", "0.3",
                 "--resize", "32", "--crop", "32", "--decoder", "pil", "--float32"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert (tmp_path / "fx" / ckpt.name).is_file()  # stage 3 writes it whatever the verdict
    return torch.load(tmp_path / "fx" / "head.pt", weights_only=True)["diagnosis"], err


def write_tree(root: Path, source, per_class=(30, 10), classes=("n01", "n02", "n03")) -> Path:
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                (root / split / c / f"{k}.JPEG").write_bytes(source(i, rng))
    return root


def test_verdict_ok_on_digits(digits, tmp_path, capsys):
    """A backbone whose features separate the digits, and a checkpoint that records less than
    the fix reaches."""
    diagnosis, err = verdict_run(tmp_path, digits["root"] / "data", digits["ckpt"], capsys)
    assert diagnosis["backbone"] == "ok" and diagnosis["recorded_top1"] == 0.71
    assert diagnosis["backbone_message"] is None
    assert "WARNING" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("train_head:"))
    assert "; recorded top-1 71.00%; backbone ok;" in line


def noisy_digits(root: Path, classes: int = 5, noise: float = 0.4) -> Path:
    """scikit-learn's digits 0..classes-1 as 32-pixel JPEGs, with a share `noise` of the
    files (train and val alike) in the folder of another class: a probe cannot pass about
    1 - noise, however good the backbone."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits(n_class=classes)
    rng = np.random.default_rng(0)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if rng.random() < noise:
            label = (label + rng.integers(1, classes)) % classes
        split = "val" if i % 4 == 0 else "train"
        folder = root / split / f"d{label}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L")
        img.resize((32, 32), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=95)
    return root


def test_verdict_weak_when_the_fix_lands_far_below_the_record(tmp_path, capsys):
    """Features that separate the digits, labels of which 40% are wrong: the fix lands near
    60% while the checkpoint records 99%."""
    data = noisy_digits(tmp_path / "data")
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save(training_checkpoint(make_model(num_classes=5), "resnet18",
                                   best_acc1=np.float64(99.0)), ckpt)
    diagnosis, err = verdict_run(tmp_path, data, ckpt, capsys)
    assert diagnosis["backbone"] == "weak" and diagnosis["recorded_top1"] == 0.99, diagnosis
    assert "far below the 99.0% the checkpoint records (best_acc1)" in \
        diagnosis["backbone_message"]
    # a loud warning in stage 2, and again in stage 3 (which still writes the file)
    assert "train_head: WARNING: the backbone is WEAK: the fix reaches" in err
    assert "stitch: WARNING: the backbone is WEAK: the fix reaches" in err
    line = next(ln for ln in err.splitlines() if ln.startswith("train_head:") and "chosen" in ln)
    assert "; recorded top-1 99.00%; backbone weak;" in line


def test_verdict_untrained_when_the_features_do_not_separate_the_classes(tmp_path, photos,
                                                                        capsys):
    """Every image is the same photo: no feature can tell the classes apart."""
    same = jpeg_bytes(photo_patch(photos, np.random.default_rng(1)), quality=90)
    data = write_tree(tmp_path / "data", lambda i, rng: same, per_class=(12, 4))
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save(training_checkpoint(make_model(), "resnet18"), ckpt)
    diagnosis, err = verdict_run(tmp_path, data, ckpt, capsys)
    assert diagnosis["backbone"] == "untrained", diagnosis
    assert "barely above chance" in diagnosis["backbone_message"]
    assert "train_head: WARNING: the backbone is UNTRAINED" in err
    assert "stitch: WARNING: the backbone is UNTRAINED" in err


def test_train_head_without_a_checkpoint_judges_on_the_features_alone(digits, tmp_path):
    out = tmp_path / "head.pt"
    assert train_head.main(["--features", str(digits["store"]), "--out", str(out),
                            "--epochs", "2"]) == 0
    diagnosis = torch.load(out, weights_only=True)["diagnosis"]
    assert diagnosis["backbone"] == "ok" and diagnosis["recorded_top1"] is None
    assert "mapping" not in diagnosis
