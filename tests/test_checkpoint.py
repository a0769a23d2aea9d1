import argparse
import builtins
from pathlib import Path

import numpy as np
import pytest
import torch

import extract_features
from pipeline.checkpoint import hash_tensors, load_checkpoint, strip_prefixes
from pipeline.errors import CheckpointError

from .conftest import make_model, training_checkpoint


def _same(sd_a, sd_b):
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def _layouts(sd):
    return {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {}},
        "model": {"model": sd, "arch": "resnet18"},
        "net": {"net": sd, "acc": 0.5},
        "nested": {"model": {"state_dict": sd}},
        "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        "orig_mod_prefix": {"state_dict": {"_orig_mod." + k: v for k, v in sd.items()}},
        "both_prefixes": {"model": {"module._orig_mod." + k: v for k, v in sd.items()}},
    }


@pytest.mark.parametrize("layout", list(_layouts({"a.weight": torch.zeros(1)})))
def test_every_layout_yields_the_model_weights(tmp_path, model, layout):
    sd = model.state_dict()
    path = tmp_path / f"{layout}.pth"
    torch.save(_layouts(sd)[layout], path)
    ckpt = load_checkpoint(path)
    _same(ckpt.state_dict, sd)


def test_training_script_checkpoint_with_namespace_and_numpy(tmp_path, model):
    path = tmp_path / "ckpt.pth"
    torch.save(training_checkpoint(model, "resnet18", id_to_class=["b", "a", "c"]), path)
    ckpt = load_checkpoint(path)
    _same(ckpt.state_dict, model.state_dict())
    assert ckpt.prefix == "module."
    assert ckpt.arch == "resnet18"
    assert ckpt.args["epochs"] == 90
    assert ckpt.classes == ["b", "a", "c"]
    assert float(ckpt.raw["best_acc1"]) == pytest.approx(0.71)


def test_ema_copy_is_chosen_on_request(tmp_path, model):
    sd = model.state_dict()
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "model_ema": {**{"module." + k: v for k, v in ema.items()},
                                                "n_averaged": torch.tensor(3)}}, path)
    _same(load_checkpoint(path).state_dict, sd)
    _same(load_checkpoint(path, use_ema=True).state_dict, ema)


def test_numpy1_names_and_legacy_format_load(tmp_path, model):
    """A checkpoint pickled under numpy 1.x names numpy.core.multiarray.scalar."""
    path = tmp_path / "legacy.pth"
    obj = {"state_dict": model.state_dict(), "best_acc1": np.float64(0.75),
           "arr": np.arange(3), "args": argparse.Namespace(arch="resnet18")}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ckpt = load_checkpoint(path)
    assert float(ckpt.raw["best_acc1"]) == 0.75
    assert ckpt.raw["arr"].tolist() == [0, 1, 2]
    _same(ckpt.state_dict, model.state_dict())


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_without_running(tmp_path, model, tree):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": model.state_dict(), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    rc = extract_features.main(["--checkpoint", str(path), "--data-root", str(tree),
                                "--out", str(tmp_path / "f.zarr")])
    assert rc == 2
    assert not marker.exists()
    assert not (tmp_path / "f.zarr").exists()


def test_trust_checkpoint_unpickles_fully(tmp_path, model):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": model.state_dict(), "payload": _Evil(marker)}, path)
    load_checkpoint(path, trust=True)
    assert marker.read_text() == "pwned"  # the flag really means "run the pickle"


@pytest.mark.parametrize("kind", ["truncated", "empty", "jpeg", "text", "missing"])
def test_unreadable_files_give_one_clear_error(tmp_path, model, tree, capsys, kind):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "jpeg":
        path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    elif kind == "text":
        path.write_text("hello, not a checkpoint\n")
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    rc = extract_features.main(["--checkpoint", str(path), "--data-root", str(tree),
                                "--out", str(tmp_path / "f.zarr")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: ") and str(path) in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_no_weights_inside_is_explained(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="found no model weights.*optimizer, epoch"):
        load_checkpoint(path)


def test_strip_prefixes_only_when_shared():
    sd = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert strip_prefixes(sd) == (sd, "")


def test_backbone_hash_ignores_the_head_only():
    sd = make_model().state_dict()
    base = hash_tensors(sd, exclude_prefixes=("fc.",))
    new_head = dict(sd, **{"fc.weight": sd["fc.weight"] * 2})
    assert hash_tensors(new_head, exclude_prefixes=("fc.",)) == base
    changed = dict(sd, **{"conv1.weight": sd["conv1.weight"].clone()})
    changed["conv1.weight"][0, 0, 0, 0] += 1e-3
    assert hash_tensors(changed, exclude_prefixes=("fc.",)) != base
