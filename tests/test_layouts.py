"""Checkpoints as the popular training stacks save them, fixed end to end and loaded back in their
own ecosystem: torchvision's references with --model-ema, PyTorch Lightning, timm's train.py, a bare
safetensors file; models with auxiliary, tied (distilled) and projection heads.

Each checkpoint is written by the stack's own code where it installs here (Lightning's Trainer,
timm's CheckpointSaver and ModelEmaV3, safetensors.torch.save_file); torchvision's references are
not a package, so their 4-line ExponentialMovingAverage is restated below as they define it.
The fixed file is then loaded the way that stack loads it, and its top-1 on the val images must
equal what stage 2 measured on the cached features.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import zarr

import extract_features
import stitch_checkpoint
import train_head
from pipeline import data as D
from pipeline.checkpoint import load_checkpoint, safe_load
from pipeline.models import Preprocess

from .conftest import make_model

ORDER = ["n03", "n01", "n02"]  # the correct order; the folders sort as n01, n02, n03
WRONG = sorted(ORDER)
SMALL = Preprocess(40, 32)


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision references/classification/utils.py, as `train.py --model-ema` uses it."""

    def __init__(self, model, decay, device="cpu"):
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def fix(tmp_path: Path, tree: Path, ckpt: Path, *, extract=(), train=(), stitch=(),
        out: Path | None = None, epochs: str = "5") -> tuple[dict, Path, int]:
    """The three stages; returns (the head file's contents, the fixed file, stitch's exit code)."""
    order = tmp_path / "order.txt"
    order.write_text("\n".join(ORDER) + "\n")
    store, head = tmp_path / "f.zarr", tmp_path / "head.pt"
    out = out or tmp_path / "fixed" / ckpt.name
    assert extract_features.main(["--checkpoint", str(ckpt), "--data-root", str(tree),
                                  "--class-order", str(order), "--out", str(store),
                                  "--decoder", "pil", "--float32", "--chunk-rows", "8",
                                  *extract]) == 0
    assert train_head.main(["--features", str(store), "--checkpoint", str(ckpt), "--out",
                            str(head), "--epochs", epochs, "--lr", "0.1", "--weight-decay", "0",
                            "--holdout-fraction", "0", "--init", "zeros", *train]) == 0
    rc = stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(head), "--out",
                                 str(out), *stitch])
    return torch.load(head, weights_only=True), out, rc


@torch.no_grad()
def val_top1(model: torch.nn.Module, tree: Path, pre: Preprocess = SMALL, transform=None) -> float:
    """The model's top-1 on the val images with the correct labels, through PIL."""
    split = D.scan_split("val", tree / "val", ORDER)
    images = []
    for f in split.files:
        img = D.pil_decode((tree / "val" / f).read_bytes())
        images.append(transform(img) if transform else D.pil_transform(img, pre))
    pred = model.eval()(torch.stack(images)).argmax(1)
    return float((pred == torch.as_tensor(split.labels, dtype=torch.long)).float().mean())


def stage2_val(head: dict) -> float:
    return head["metrics"]["val_top1"]


def assert_verified(capsys, head: dict) -> None:
    """stitch --verify-data ran the fixed model end to end and found stage 2's top-1."""
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("verify:"))
    assert f"top-1 {100 * stage2_val(head):.2f}%" in line, line


# --- torchvision references: train.py --model-ema ------------------------------------------------


def references_checkpoint(model: torch.nn.Module, ema: ExponentialMovingAverage) -> dict:
    """What torchvision's references/classification/train.py saves (model_without_ddp)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 30).state_dict(),
            "epoch": 89, "args": argparse.Namespace(model="resnet18", val_resize_size=40,
                                                    val_crop_size=32, model_ema=True),
            "model_ema": ema.state_dict()}


def _references_run(tmp_path):
    model = make_model("resnet18")
    ema = ExponentialMovingAverage(model, decay=0.5)
    with torch.no_grad():  # the live model moves on, so the EMA differs from it
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update_parameters(model)
    ckpt = tmp_path / "run" / "checkpoint.pth"
    ckpt.parent.mkdir()
    torch.save(references_checkpoint(model, ema), ckpt)
    return model, ema, ckpt


def test_references_ema_checkpoint_is_found_with_n_averaged(tmp_path):
    model, ema, ckpt = _references_run(tmp_path)
    assert "n_averaged" in ema.state_dict()  # what the old fixture lacked
    loaded = load_checkpoint(ckpt, use_ema=True)
    assert loaded.prefix == "module."
    assert set(loaded.state_dict) == set(model.state_dict())
    assert [c.label() for c in loaded.copies] == ["model", "model_ema"]
    assert loaded.copies[1].extra == ("n_averaged",)


def test_references_ema_end_to_end(tmp_path, tree, capsys):
    model, ema, ckpt = _references_run(tmp_path)
    head, out, rc = fix(tmp_path, tree, ckpt, extract=["--ema"],
                        stitch=["--verify-data", str(tree)])
    assert rc == 0, capsys.readouterr().err
    assert head["store"]["ema"] is True
    fixed = safe_load(out)
    # the EMA copy loads back into the references' own wrapper, n_averaged and all
    again = ExponentialMovingAverage(make_model("resnet18"), decay=0.5)
    again.load_state_dict(fixed["model_ema"])
    assert int(again.n_averaged) == int(ema.n_averaged)
    assert torch.equal(again.module.fc.weight, head["weight"])
    assert val_top1(again.module, tree) == pytest.approx(stage2_val(head))
    # the plain copy has the new head too, in the right order
    assert torch.equal(fixed["model"]["fc.weight"], head["weight"])
    # --verify-data ran the EMA copy, the one the head was trained for
    assert_verified(capsys, head)


def test_store_made_with_ema_is_refused_for_other_weights(tmp_path, tree, capsys):
    model, ema, ckpt = _references_run(tmp_path)
    head, out, rc = fix(tmp_path, tree, ckpt, extract=["--ema"])
    other = tmp_path / "other.pth"
    raw = torch.load(ckpt, weights_only=False)
    raw["model_ema"] = {k: (v + 1 if v.is_floating_point() and k != "n_averaged" else v)
                        for k, v in raw["model_ema"].items()}
    torch.save(raw, other)
    capsys.readouterr()
    assert train_head.main(["--features", str(tmp_path / "f.zarr"), "--checkpoint", str(other),
                            "--out", str(tmp_path / "h2.pt")]) == 2
    assert "model_ema weights of" in capsys.readouterr().err


# --- PyTorch Lightning ------------------------------------------------------------------------


def _lightning_module_class():
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self, arch: str = "resnet18", num_classes: int = 3, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.model = torchvision.models.get_model(arch, num_classes=num_classes)
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(num_classes))

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _):
            x, y = batch
            return self.criterion(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 30)]

    return L, Classifier


def test_lightning_checkpoint_end_to_end(tmp_path, tree, capsys):
    L, Classifier = _lightning_module_class()
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=4))
    ckpt = tmp_path / "run" / "epoch=0-step=2.ckpt"
    ckpt.parent.mkdir()
    trainer.save_checkpoint(ckpt)
    original = torch.load(ckpt, weights_only=True)
    assert "model.fc.weight" in original["state_dict"]  # the LightningModule's attribute prefix

    head, out, rc = fix(tmp_path, tree, ckpt, extract=["--resize", "40", "--crop", "32"],
                        stitch=["--verify-data", str(tree)])
    assert rc == 0
    assert_verified(capsys, head)
    fixed = torch.load(out, weights_only=True)
    assert set(fixed["state_dict"]) == set(original["state_dict"])
    assert torch.equal(fixed["state_dict"]["model.fc.weight"], head["weight"])
    assert fixed["id_to_class"] == ORDER
    # optimizer_states: the head's momentum dropped, every other parameter's kept
    params = [n for n, _ in Classifier().named_parameters()]
    head_ids = {i for i, n in enumerate(params) if n.startswith("model.fc.")}
    before, after = original["optimizer_states"][0]["state"], fixed["optimizer_states"][0]["state"]
    assert set(after) == set(before) - head_ids and head_ids <= set(before)
    # Lightning loads it back, and the model gives stage 2's accuracy
    back = Classifier.load_from_checkpoint(out, weights_only=True)
    assert val_top1(back, tree) == pytest.approx(stage2_val(head))


def test_lightning_prefix_with_several_submodules(tmp_path, model):
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    sd["criterion.weight"] = torch.ones(3)
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.6",
                "optimizer_states": []}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.prefix == "model." and ckpt.layout == "lightning"
    assert set(ckpt.state_dict) == set(model.state_dict())
    assert ckpt.copies[0].extra == ("criterion.weight",)
    sd = {f"teacher.{k}": v for k, v in model.state_dict().items()}
    sd.update({f"student.{k}": v for k, v in model.state_dict().items()})
    sd.update({f"other.{k}": v for k, v in model.state_dict().items()})
    torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.6"}, path)
    assert load_checkpoint(path).prefix == "student."
    sd = {f"{a}.{k}": v for a in ("teacher", "other") for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.6"}, path)
    with pytest.raises(Exception, match="several sub-modules \\(teacher, other\\)"):
        load_checkpoint(path)


# --- timm train.py ------------------------------------------------------------------------------


def _timm_checkpoint(tmp_path: Path, name: str, **args) -> tuple[Path, torch.nn.Module]:
    """A checkpoint written by timm's own CheckpointSaver, with a ModelEmaV3, as train.py does."""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, ModelEmaV3

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ema.update(model)
    opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4)
    for p in model.parameters():  # one step, so that every parameter has momentum state
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    folder = tmp_path / "output" / "train" / name
    folder.mkdir(parents=True)
    ns = argparse.Namespace(**{"model": name, "input_size": None, "img_size": None,
                               "crop_pct": None, "mean": None, "std": None, "interpolation": "",
                               **args})
    saver = CheckpointSaver(model, opt, args=ns, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder), decreasing=False, max_history=2)
    saver.save_checkpoint(epoch=0, metric=12.5)
    return folder / "model_best.pth.tar", model


def test_timm_checkpoint_end_to_end(tmp_path, tree, capsys):
    import timm
    from timm.data import create_transform, resolve_data_config

    ckpt, _ = _timm_checkpoint(tmp_path, "convnext_atto", crop_pct=0.9)
    # no --arch: the checkpoint's own `arch`; no --resize/--crop: timm's eval transform, with
    # the checkpoint's --crop-pct (224 / 0.9 -> 248) and the model's bicubic interpolation
    head, out, rc = fix(tmp_path, tree, ckpt)
    # the head was trained on the EMA copy's features: not written into the model copy, whose
    # backbone differs, unless asked
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert "holds other copies whose backbones differ (state_dict)" in err[-1], err[-1]
    assert "--head-for-every-copy" in err[-1]
    assert stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(tmp_path / "head.pt"),
                                   "--out", str(out), "--verify-data", str(tree),
                                   "--head-for-every-copy"]) == 0
    assert_verified(capsys, head)
    store = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    pre = store.attrs["fingerprint"]["components"]["preprocessing"]
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (248, 224, "bicubic")
    assert store.attrs["fingerprint"]["components"]["arch"] == "timm:convnext_atto"
    assert store.attrs["fingerprint"]["components"]["head"] == "head.fc"
    # timm's loader takes state_dict_ema when present, so stage 1 used the EMA weights too
    assert head["store"]["ema"] is True
    # timm loads the fixed file itself, both copies, and the model gives stage 2's accuracy
    fixed = timm.create_model("convnext_atto", num_classes=3, checkpoint_path=str(out))
    assert torch.equal(fixed.head.fc.weight, head["weight"])
    plain = timm.create_model("convnext_atto", num_classes=3)
    timm.models.load_checkpoint(plain, str(out), use_ema=False)
    assert torch.equal(plain.head.fc.weight, head["weight"])
    assert not torch.equal(plain.stem[0].weight, fixed.stem[0].weight)
    config = resolve_data_config({"crop_pct": 0.9}, model=fixed)
    assert val_top1(fixed, tree, transform=create_transform(**config)) == pytest.approx(
        stage2_val(head))
    # timm's optimizer has two parameter groups (weight decay or not): all its state goes
    assert torch.load(ckpt, weights_only=False)["optimizer"]["state"]
    assert torch.load(out, weights_only=False)["optimizer"]["state"] == {}


def test_timm_distilled_heads_are_tied(tmp_path, tree, capsys):
    import timm
    ckpt, model = _timm_checkpoint(tmp_path, "deit_tiny_distilled_patch16_224")
    head, out, rc = fix(tmp_path, tree, ckpt, extract=["--resize", "256", "--crop", "224"],
                        stitch=["--verify-data", str(tree), "--head-for-every-copy"])
    assert rc == 0
    assert_verified(capsys, head)
    assert head["store"]["other_heads"] == {"tied": ["head_dist"]}
    fixed = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=3,
                              checkpoint_path=str(out))
    # both heads hold the new head, so the model's averaged logits are the new linear head's
    assert torch.equal(fixed.head.weight, head["weight"])
    assert torch.equal(fixed.head_dist.weight, head["weight"])
    assert val_top1(fixed, tree, Preprocess(256, 224, "bicubic")) == pytest.approx(
        stage2_val(head))


def test_timm_checkpoint_defaults_to_its_ema_like_timm(tmp_path):
    ckpt, model = _timm_checkpoint(tmp_path, "convnext_atto")
    auto, plain = load_checkpoint(ckpt, use_ema=None), load_checkpoint(ckpt, use_ema=False)
    assert (auto.layout, auto.arch, auto.use_ema, auto.source_key) == (
        "timm", "timm:convnext_atto", True, "state_dict_ema")
    assert plain.source_key == "state_dict" and not plain.use_ema
    assert torch.equal(plain.state_dict["stem.0.weight"], model.stem[0].weight)
    assert not torch.equal(auto.state_dict["stem.0.weight"], model.stem[0].weight)
    assert [c.label() for c in auto.copies] == ["state_dict", "state_dict_ema"]


def test_timm_arch_flag_and_unknown_names(tmp_path, tree, capsys):
    ckpt, _ = _timm_checkpoint(tmp_path, "convnext_atto")
    sd = tmp_path / "sd.pth"
    torch.save(torch.load(ckpt, weights_only=False)["state_dict"], sd)
    out = tmp_path / "f.zarr"
    base = ["--checkpoint", str(sd), "--data-root", str(tree), "--out", str(out), "--decoder",
            "pil", "--resize", "40", "--crop", "32"]
    assert extract_features.main(base + ["--arch", "timm:convnext_nosuch"]) == 2
    assert "timm has no model 'convnext_nosuch'" in capsys.readouterr().err
    assert extract_features.main(base + ["--arch", "timm:convnext_atto"]) == 0


# --- safetensors --------------------------------------------------------------------------------


def test_safetensors_in_safetensors_out(tmp_path, tree, capsys):
    from safetensors.torch import load_file, save_file

    model = make_model("resnet18")
    ckpt = tmp_path / "run" / "model.safetensors"
    ckpt.parent.mkdir()
    save_file(model.state_dict(), str(ckpt), metadata={"format": "pt",
                                                       "id_to_class": json.dumps(WRONG)})
    head, out, rc = fix(tmp_path, tree, ckpt, extract=["--resize", "40", "--crop", "32"],
                        stitch=["--verify-data", str(tree)])
    assert rc == 0 and out.name == "model.safetensors"
    assert_verified(capsys, head)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["id_to_class"]) == ORDER
    assert json.loads(meta["quickfix"])["input"]["layout"] == "safetensors"
    tensors = load_file(str(out))
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(tensors)
    assert torch.equal(plain.fc.weight, head["weight"])
    assert val_top1(plain, tree) == pytest.approx(stage2_val(head))
    assert load_checkpoint(out).classes == ORDER
    # a full disk (a file-size limit) while safetensors writes: one line, nothing left behind
    root = Path(__file__).resolve().parent.parent
    full = tmp_path / "full" / "model.safetensors"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
            "import stitch_checkpoint; sys.exit(stitch_checkpoint.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(ckpt), "--head",
                           str(tmp_path / "head.pt"), "--out", str(full)], cwd=root,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"cannot write {full}" in errors[0]
    assert not full.exists() and not list(full.parent.glob(".*tmp-*"))


def test_damaged_safetensors_is_one_line(tmp_path, tree, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(make_model("resnet18").state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    rc = extract_features.main(["--checkpoint", str(path), "--data-root", str(tree), "--out",
                                str(tmp_path / "f.zarr")])
    err = capsys.readouterr().err
    assert rc == 2 and "damaged safetensors file" in err and "Traceback" not in err


# --- auxiliary heads, 1x1-convolution heads, --head ----------------------------------------------


def _aux_checkpoint(tmp_path: Path, arch: str) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=3, aux_logits=True,
                                         init_weights=False)
    ema = ExponentialMovingAverage(model, decay=0.5)
    with torch.no_grad():  # an EMA copy whose values differ from the model's
        for p in ema.parameters():
            p.add_(0.01)
    ckpt = tmp_path / "run" / "checkpoint_best.pth"
    ckpt.parent.mkdir(exist_ok=True)
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(),
                "args": argparse.Namespace(model=arch)}, ckpt)
    return ckpt


def test_inception_aux_head_refused_then_permuted(tmp_path, tree, capsys):
    ckpt = _aux_checkpoint(tmp_path, "inception_v3")
    size = ["--resize", "90", "--crop", "80"]
    head, out, rc = fix(tmp_path, tree, ckpt, extract=size, stitch=["--head-for-every-copy"])
    err = capsys.readouterr().err
    # random weights: the old head is no permutation, so re-ordering AuxLogits is a guess
    assert rc == 2 and "AuxLogits.fc" in err and "--aux-heads permute" in err
    assert not out.exists()
    rc = stitch_checkpoint.main(["--checkpoint", str(ckpt), "--head", str(tmp_path / "head.pt"),
                                 "--out", str(out), "--aux-heads", "permute", "--verify-data",
                                 str(tree), "--head-for-every-copy"])
    assert rc == 0
    assert_verified(capsys, head)
    fixed, old = torch.load(out, weights_only=False), torch.load(ckpt, weights_only=False)
    mapping = torch.as_tensor(head["diagnosis"]["mapping"])
    for key in ("AuxLogits.fc.weight", "AuxLogits.fc.bias"):
        assert torch.equal(fixed["model"][key], old["model"][key][mapping])
        # each copy's own rows: the EMA copy keeps its values, re-ordered
        ema_key = f"module.{key}"
        assert torch.equal(fixed["model_ema"][ema_key], old["model_ema"][ema_key][mapping])
        assert not torch.equal(fixed["model_ema"][ema_key], fixed["model"][key])
    assert torch.equal(fixed["model"]["fc.weight"], head["weight"])
    model = torchvision.models.inception_v3(num_classes=3, aux_logits=True, init_weights=False)
    model.load_state_dict(fixed["model"])
    assert val_top1(model, tree, Preprocess(90, 80)) == pytest.approx(stage2_val(head))


def test_googlenet_aux_heads_follow_a_clean_permutation(tmp_path, tree):
    """A head whose rows are the right head's, permuted: --aux-heads auto re-orders aux1/aux2."""
    ckpt = _aux_checkpoint(tmp_path, "googlenet")
    size = ["--resize", "72", "--crop", "64"]
    right, _, rc = fix(tmp_path, tree, ckpt, extract=size, epochs="40",
                       stitch=["--aux-heads", "keep", "--head-for-every-copy"])
    assert rc == 0
    # the same backbone with the right head's rows in the wrong (sorted) order
    raw = torch.load(ckpt, weights_only=False)
    perm = [ORDER.index(c) for c in WRONG]  # wrong index i holds the right row perm[i]
    raw["model"]["fc.weight"] = right["weight"][perm].clone()
    raw["model"]["fc.bias"] = right["bias"][perm].clone()
    wrong = tmp_path / "run" / "wrong.pth"
    torch.save(raw, wrong)
    head = tmp_path / "head2.pt"
    assert train_head.main(["--features", str(tmp_path / "f.zarr"), "--checkpoint", str(wrong),
                            "--out", str(head), "--epochs", "0", "--lr", "0.1",
                            "--weight-decay", "0", "--holdout-fraction", "0"]) == 0
    diagnosis = torch.load(head, weights_only=True)["diagnosis"]
    assert diagnosis["is_permutation"] and diagnosis["classes_moved"] == 3
    out = tmp_path / "fixed2.pth"
    assert stitch_checkpoint.main(["--checkpoint", str(wrong), "--head", str(head), "--out",
                                   str(out)]) == 0
    fixed = torch.load(out, weights_only=False)["model"]
    mapping = diagnosis["mapping"]  # true class t is predicted at old index mapping[t]
    assert mapping == [perm.index(t) for t in range(3)]
    for name in ("aux1.fc2", "aux2.fc2"):
        old = raw["model"][f"{name}.weight"]
        assert torch.equal(fixed[f"{name}.weight"], old[torch.as_tensor(mapping)])
        assert not torch.equal(fixed[f"{name}.weight"], old)
    # the permuted old head is a relabel: the EMA copy, whose backbone differs, gets its own
    # rows re-ordered (no --head-for-every-copy needed), head and aux heads alike
    ema = torch.load(out, weights_only=False)["model_ema"]
    for name in ("fc", "aux1.fc2", "aux2.fc2"):
        old = raw["model_ema"][f"module.{name}.weight"]
        assert torch.equal(ema[f"module.{name}.weight"], old[torch.as_tensor(mapping)])
        assert not torch.equal(ema[f"module.{name}.weight"], fixed[f"{name}.weight"])
    # the fixed head is the right head again: the permuted-back rows
    torch.testing.assert_close(fixed["fc.weight"], right["weight"])


def test_squeezenet_conv_head_is_refused_clearly(tmp_path, tree, capsys):
    path = tmp_path / "sq.pth"
    torch.save(torchvision.models.squeezenet1_0(num_classes=3).state_dict(), path)
    rc = extract_features.main(["--checkpoint", str(path), "--data-root", str(tree), "--out",
                                str(tmp_path / "f.zarr"), "--decoder", "pil"])
    err = capsys.readouterr().err
    assert rc == 2 and "1x1 convolution (classifier.1, 3 outputs)" in err
    assert "Traceback" not in err


def test_head_flag_names_the_classifier(tmp_path, tree, capsys):
    from .factories import projected_net

    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "checkpoint_best.pth"
    ckpt.parent.mkdir()
    torch.save({"state_dict": projected_net().state_dict()}, ckpt)
    arch = ["--arch", "tests.factories:projected_net", "--resize", "40", "--crop", "32"]
    # the last linear layer is the projector's: bad names are one line listing the layers
    base = ["--checkpoint", str(ckpt), "--data-root", str(tree), "--out", str(tmp_path / "x")]
    assert extract_features.main(base + arch + ["--head", "projector.1"]) == 2
    assert "the checkpoint has no 2-d projector.1.weight" in capsys.readouterr().err
    assert extract_features.main(base + arch + ["--head", "nosuch"]) == 2
    assert "projector.2" in capsys.readouterr().err
    head, out, rc = fix(tmp_path, tree, ckpt, extract=[*arch, "--head", "head"])
    assert rc == 0 and head["store"]["head"] == "head"
    fixed = torch.load(out, weights_only=True)["state_dict"]
    assert torch.equal(fixed["head.weight"], head["weight"])
    assert torch.equal(fixed["projector.2.weight"],
                       torch.load(ckpt, weights_only=True)["state_dict"]["projector.2.weight"])


# --- --verify-data honours --trust-checkpoint -----------------------------------------------------


class RunConfig:
    """A training script's own config object, pickled into its checkpoint."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_verify_data_with_trust_checkpoint(tmp_path, tree, capsys):
    ckpt = tmp_path / "run" / "checkpoint_best.pth"
    ckpt.parent.mkdir()
    torch.save({"model": make_model("resnet18").state_dict(),
                "config": RunConfig(arch="resnet18", lr=0.1)}, ckpt)
    trust = ["--trust-checkpoint"]
    head, out, rc = fix(tmp_path, tree, ckpt, extract=[*trust, "--resize", "40", "--crop", "32"],
                        train=trust, stitch=[*trust, "--verify-data", str(tree)])
    assert rc == 0
    assert_verified(capsys, head)


def test_make_fix_keeps_a_lightning_file_name(tmp_path, tree):
    """Lightning names its files epoch=N-step=M.ckpt: `=` must survive make, and the fixed file
    keeps the input's name."""
    root = Path(__file__).resolve().parent.parent
    model = make_model("resnet18")
    ckpt = tmp_path / "lightning_logs" / "epoch=3-step=120.ckpt"
    ckpt.parent.mkdir()
    # the keys Trainer.save_checkpoint writes (test_lightning_checkpoint_end_to_end uses the
    # Trainer itself); what this test is about is the file name
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.6",
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [], "lr_schedulers": [],
                "hyper_parameters": {"arch": "resnet18", "num_classes": 3}}, ckpt)
    proc = subprocess.run(["make", "-C", str(root), "fix", f"PY={sys.executable}",
                           f"CHECKPOINT={ckpt}", f"DATA={tree}", "EPOCHS=2",
                           "EXTRACT_FLAGS=--decoder pil --resize 40 --crop 32"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fixed = ckpt.parent / "fixed" / "epoch=3-step=120.ckpt"
    head = torch.load(ckpt.parent / "fixed" / "head.pt", weights_only=True)
    assert torch.equal(torch.load(fixed, weights_only=True)["state_dict"]["model.fc.weight"],
                       head["weight"])
    assert f"fixed checkpoint: {fixed}" in proc.stdout
