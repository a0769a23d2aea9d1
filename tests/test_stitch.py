"""Stage 3 and the whole flow: stitch_checkpoint.main, make fix, on real checkpoints and stores."""

import argparse
import copy
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import extract_features
import stitch_checkpoint
import train_head
from pipeline.checkpoint import safe_load

from .conftest import make_model

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["n03", "n01", "n02"]  # the correct order; the folders sort as n01, n02, n03


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def script_checkpoint(model, arch: str, prefix: str = "module.") -> dict:
    """A torchvision-reference-style checkpoint: DDP prefixes, EMA (fp16), optimizer, numpy."""
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    shadow = copy.deepcopy(model)  # the step below must not change the saved weights
    opt = torch.optim.SGD(shadow.parameters(), lr=0.1, momentum=0.9)
    for p in shadow.parameters():  # give every parameter momentum state
        p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    wrong = sorted(ORDER)  # trained with folder order: n01, n02, n03
    return {
        "model": sd,
        # torch.optim.swa_utils.AveragedModel's state dict, as torchvision's references save it
        "model_ema": {**{"module." + k: (v.half() if v.is_floating_point() else v)
                         for k, v in model.state_dict().items()},
                      "n_averaged": torch.tensor(17)},
        "optimizer": opt.state_dict(),
        "lr_scheduler": sched.state_dict(),
        "epoch": 89,
        "best_acc1": np.float64(55.5),
        "args": argparse.Namespace(model=arch, lr=0.1, val_resize_size=40, val_crop_size=32),
        "id_to_class": {str(i): [c, f"name {c}"] for i, c in enumerate(wrong)},
        "class_to_idx": {c: i for i, c in enumerate(wrong)},
    }


def run_stages(tmp_path: Path, tree: Path, arch: str = "resnet18", epochs: str = "5",
               decoder: str = "pil"):
    model = make_model(arch, num_classes=3)
    ckpt = tmp_path / "run" / "checkpoint_best.pth"
    ckpt.parent.mkdir()
    torch.save(script_checkpoint(model, arch), ckpt)
    order = tmp_path / "order.txt"
    order.write_text("\n".join(ORDER) + "\n")
    store, head = tmp_path / "f.zarr", tmp_path / "head.pt"
    assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(tree),
                                  "--class-order", str(order), "--out", str(store),
                                  "--decoder", decoder, "--float32", "--chunk-rows", "8"]) == 0
    assert train_head.main(["--features", str(store), "--checkpoint", str(ckpt), "--out",
                            str(head), "--epochs", epochs, "--lr", "0.1", "--weight-decay", "0",
                            "--holdout-fraction", "0", "--init", "zeros"]) == 0
    return model, ckpt, store, head


def test_stitch_rules(tmp_path, tree, capsys):
    model, ckpt, _, head_path = run_stages(tmp_path, tree)
    before = sha(ckpt)
    out = tmp_path / "fixed" / "checkpoint_best.pth"
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head_path),
                                   "--out", str(out)]) == 0
    assert sha(ckpt) == before
    orig = safe_load(ckpt)
    new = safe_load(out)  # weights_only=True, with the allowlist for numpy and Namespace
    head = torch.load(head_path, weights_only=True)
    assert set(orig) <= set(new) and "quickfix" in new
    for key, dtype in (("model", torch.float32), ("model_ema", torch.float16)):
        assert list(new[key]) == list(orig[key])  # same names, prefixes, order
        for k, v in orig[key].items():
            if k in ("module.fc.weight", "module.fc.bias"):
                assert new[key][k].dtype == dtype
                assert torch.equal(new[key][k], head[k.split(".")[-1]].to(dtype))
            else:
                assert torch.equal(new[key][k], v) and new[key][k].dtype == v.dtype, k
    assert new["id_to_class"] == {str(i): [c, f"name {c}"] for i, c in enumerate(ORDER)}
    assert new["class_to_idx"] == {c: i for i, c in enumerate(ORDER)}
    # optimizer: the head's entries (the last two parameters) are gone, the rest untouched
    n = len(list(model.parameters()))
    assert set(new["optimizer"]["state"]) == set(range(n - 2))
    for i in range(n - 2):
        assert torch.equal(new["optimizer"]["state"][i]["momentum_buffer"],
                           orig["optimizer"]["state"][i]["momentum_buffer"])
    assert new["lr_scheduler"] == orig["lr_scheduler"] and new["epoch"] == 89
    record = new["quickfix"]
    assert record["input"]["sha256"] == before
    assert record["store"]["fingerprint"] == head["store"]["fingerprint"]
    assert "optimizer state" in " ".join(record["notices"])
    assert "dropped" in capsys.readouterr().err
    # a plain torchvision model takes the fixed weights
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict({k.removeprefix("module."): v for k, v in new["model"].items()})


def test_refusals(tmp_path, tree, capsys):
    _, ckpt, store, head = run_stages(tmp_path, tree, epochs="1")
    before = sha(ckpt)

    def refused(out, match, extra=()):
        assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head),
                                       "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and match in err, err

    refused(ckpt, "is the input checkpoint")
    link = tmp_path / "hard.pth"
    os.link(ckpt, link)
    refused(link, "is the input checkpoint", ["--overwrite"])
    sym = tmp_path / "sym.pth"
    sym.symlink_to(ckpt)
    refused(sym, "is the input checkpoint", ["--overwrite"])
    assert sha(ckpt) == before
    exists = tmp_path / "exists.pth"
    exists.write_text("mine")
    refused(exists, "exists; pass --overwrite")
    assert exists.read_text() == "mine"
    other = tmp_path / "other.pth"
    torch.save(script_checkpoint(make_model(seed=9), "resnet18"), other)
    assert stitch_checkpoint.main(["--checkpoint", str(other), "--head", str(head), "--out",
                                   str(tmp_path / "o.pth")]) == 2
    assert "another backbone" in capsys.readouterr().err
    renamed = script_checkpoint(make_model(), "resnet18")
    renamed["id_to_class"] = ["a", "b", "c"]
    torch.save(renamed, other)
    assert stitch_checkpoint.main(["--checkpoint", str(other), "--head", str(head), "--out",
                                   str(tmp_path / "o.pth")]) == 2
    assert "names other classes" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


def test_sigkill_during_save_never_harms(tmp_path, tree):
    _, ckpt, _, head = run_stages(tmp_path, tree, epochs="1")
    before = sha(ckpt)
    out = tmp_path / "fixed" / "checkpoint_best.pth"
    cmd = [sys.executable, str(ROOT / "stitch_checkpoint.py"), "--checkpoint", str(ckpt),
           "--head", str(head), "--out", str(out), "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    reference = safe_load(out)
    out.unlink()
    rng = random.Random(0)
    during_save = 0
    for _ in range(4):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # wait for the temp file (the save has begun), then kill at a random moment
        while proc.poll() is None and not list(out.parent.glob(".checkpoint_best.pth.tmp-*")):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.25))
        during_save += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert sha(ckpt) == before
        if out.exists():  # complete and verified, or absent: never partial
            got = safe_load(out)
            assert torch.equal(got["model"]["module.fc.weight"],
                               reference["model"]["module.fc.weight"])
            out.unlink()
    assert during_save >= 2  # the kills really landed while the file was being written
    assert sha(ckpt) == before
    # a later run clears what killed runs left and succeeds
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert not list(out.parent.glob(".checkpoint_best.pth.tmp-*"))


def test_verify_data_decodes_as_stage1_did_in_batches_with_progress(tmp_path, tree, capsys):
    """A store made with DALI is verified through DALI (here its CPU decoder), batched, with
    progress lines off a terminal, and finds stage 2's top-1 on the cached features."""
    _, ckpt, _, head_path = run_stages(tmp_path, tree, decoder="dali")
    out = tmp_path / "fixed.pth"
    capsys.readouterr()
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head_path), "--out",
                                   str(out), "--verify-data", str(tree), "--device", "cpu",
                                   "--verify-batch-size", "4", "--progress-every", "0"]) == 0
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("verify: the fixed")][0]
    assert "dali decoder" in line and "img/s" in line
    head = torch.load(head_path, weights_only=True)
    e2e = float(line.split("top-1 ")[1].split("%")[0])
    assert abs(e2e - 100 * head["metrics"]["val_top1"]) <= 0.1, line
    n = len(list((tree / "val").rglob("*.*")))
    progress = [ln for ln in err.splitlines() if ln.startswith("verify: ") and "img/s, ETA" in ln]
    assert progress and progress[-1].startswith(f"verify: {n:,}/{n:,} images")


def test_verify_data_needs_nothing_from_the_store(tmp_path, tree, capsys):
    """The head file says how stage 1 read the images: the store may be gone by stage 3."""
    _, ckpt, store, head_path = run_stages(tmp_path, tree, decoder="pil")
    shutil.rmtree(store)
    out = tmp_path / "fixed.pth"
    capsys.readouterr()
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head_path), "--out",
                                   str(out), "--verify-data", str(tree), "--device", "cpu"]) == 0
    line = [ln for ln in capsys.readouterr().err.splitlines()
            if ln.startswith("verify: the fixed")][0]
    head = torch.load(head_path, weights_only=True)
    assert head["store"]["preprocessing"]["crop"] == 32 and head["store"]["decoder"] == "pil"
    assert "pil decoder" in line
    e2e = float(line.split("top-1 ")[1].split("%")[0])
    assert abs(e2e - 100 * head["metrics"]["val_top1"]) <= 0.1, line


def test_verify_data_refusals_come_before_any_write(tmp_path, tree, capsys):
    _, ckpt, _, head_path = run_stages(tmp_path, tree, epochs="1")
    out = tmp_path / "fixed.pth"
    for flags, match in ((["--verify-data", str(tmp_path / "nowhere")], "is not a directory"),
                         (["--verify-data", str(tree), "--verify-batch-size", "0"],
                          "must be at least 1")):
        capsys.readouterr()
        assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head_path),
                                       "--out", str(out), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0]
        assert not out.exists()
    if not torch.cuda.is_available():
        assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head_path),
                                       "--out", str(out), "--verify-data", str(tree),
                                       "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_end_to_end_accuracy_equals_stage2(tmp_path, tree, capsys, arch):
    _, ckpt, _, head_path = run_stages(tmp_path, tree, arch=arch)
    out = tmp_path / "fixed.pth"
    capsys.readouterr()
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head_path), "--out",
                                   str(out), "--verify-data", str(tree)]) == 0
    err = capsys.readouterr().err
    head = torch.load(head_path, weights_only=True)
    line = [ln for ln in err.splitlines() if ln.startswith("verify:")][0]
    e2e = float(line.split("top-1 ")[1].split("%")[0])
    assert abs(e2e - 100 * head["metrics"]["val_top1"]) <= 0.1, line
    # the fixed checkpoint loads into a plain torchvision model and is otherwise unchanged
    fixed = safe_load(out)
    plain = torchvision.models.get_model(arch, num_classes=3)
    plain.load_state_dict({k.removeprefix("module."): v for k, v in fixed["model"].items()})
    head_key = "module.fc.weight" if arch == "resnet18" else "module.classifier.1.weight"
    assert torch.equal(fixed["model"][head_key], head["weight"])


def test_make_fix_reruns_only_stale_stages(tmp_path, tree):
    model = make_model("resnet18", num_classes=3)
    ckpt = tmp_path / "run" / "checkpoint_best.pth"
    ckpt.parent.mkdir()
    torch.save(script_checkpoint(model, "resnet18"), ckpt)
    base = ["make", "-C", str(ROOT), "fix", f"PY={sys.executable}", f"CHECKPOINT={ckpt}",
            f"DATA={tree}", "EPOCHS=2", "EXTRACT_FLAGS=--decoder pil"]

    def run(*extra):
        out = subprocess.run(base + list(extra), capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout + out.stderr
        return {s for s in ("extract:", "train_head:", "stitch:") if f"\n{s}" in "\n" + text}

    assert run() == {"extract:", "train_head:", "stitch:"}
    fixed = ckpt.parent / "fixed" / "checkpoint_best.pth"
    assert fixed.is_file() and (ckpt.parent / "fixed" / "features.zarr").is_dir()
    assert run() == set()
    assert run("LR=0.05") == {"train_head:", "stitch:"}
    assert torch.load(ckpt.parent / "fixed" / "head.pt",
                      weights_only=True)["config"]["lrs"] == [0.05]
    assert run("LR=0.05") == set()
    time.sleep(1.1)
    ckpt.touch()  # a new checkpoint: everything is stale
    assert run("LR=0.05") == {"extract:", "train_head:", "stitch:"}
    shutil.rmtree(ckpt.parent / "fixed")


def test_a_write_that_fails_is_one_line_and_leaves_nothing(tmp_path, tree):
    """A file-size limit (RLIMIT_FSIZE) makes the write fail as a full disk does: one error
    line, exit code 2, no output and no temp file; the original untouched."""
    _, ckpt, _, head = run_stages(tmp_path, tree, epochs="1")
    before = sha(ckpt)
    out = tmp_path / "fixed" / "checkpoint_best.pth"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "import stitch_checkpoint; sys.exit(stitch_checkpoint.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(ckpt), "--head",
                           str(head), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # the system's reason and what to do, not torch's "[enforce fail at inline_container.cc]"
    assert errors == [f"error: cannot write {out}: File too large; the file system or this "
                      "process's file-size limit (ulimit -f) does not allow a file this large: "
                      "write it elsewhere, or raise the limit; the original is untouched"], \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(out.parent.glob(".*tmp-*"))
    assert sha(ckpt) == before
