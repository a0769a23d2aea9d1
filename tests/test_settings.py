"""The stages' settings: declared once, checked once, named in each command's own flags."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

import extract_features
import stitch_checkpoint
import train_head
from pipeline import fix as F
from pipeline.cli import setup_logging
from pipeline.errors import DataError, ref, render
from pipeline.settings import ExtractSettings, StitchSettings, TrainSettings

from .conftest import extract_args

SCRIPTS = ((ExtractSettings, extract_features), (TrainSettings, train_head),
           (StitchSettings, stitch_checkpoint))


def help_of(module, capsys) -> str:
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("cls,script", SCRIPTS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_setting_is_a_flag_of_its_script_and_of_quickfix_labels(cls, script, capsys):
    """A field is a flag wherever its stage runs (quickfix-labels sets the stages' paths itself),
    with its declared default."""
    script_help, fix_help = help_of(script, capsys), help_of(F, capsys)
    own = F.build_command().names
    for f in dataclasses.fields(cls):
        if not f.metadata["cli"]:
            continue
        flag = (f.metadata["flags"] or (f"--{f.name.replace('_', '-')}",))[0]
        assert flag in script_help, (cls.__name__, f.name)
        if f.name not in F.SET_HERE[cls.stage]:
            assert own[cls.key(f.name)] in fix_help, (cls.__name__, f.name)
    assert "--fix-epochs EPOCHS" in fix_help and "--extract-batch-size N" in fix_help
    defaults = F.build_parser().parse_args(["--resume", "c", "--data-root", "d"])
    assert getattr(defaults, "train.epochs") == TrainSettings.__dataclass_fields__["epochs"].default


def test_output_key_leaves_out_how_a_stage_runs():
    """quickfix-labels reruns a stage when a setting of its output changes, not otherwise."""
    base = ExtractSettings(checkpoint=Path("c"), data_root=Path("d"), out=Path("o"))
    how = base.replace(batch_size=7, num_threads=1, read_workers=1, progress_every=1.0,
                       verify=True, trust_checkpoint=True, overwrite=True)
    assert how.output_key() == base.output_key()
    for change in ({"crop": 30}, {"decoder": "pil"}, {"float32": True}, {"ema": True},
                   {"chunk_rows": 8}, {"splits": ["val"]}):
        assert base.replace(**change).output_key() != base.output_key(), change
    train = TrainSettings(features=Path("f"), out=Path("o"))
    assert train.replace(stream=True).output_key() == train.output_key()
    assert train.replace(stream_buffer=8.0).output_key() != train.output_key()


@pytest.mark.parametrize("given,message", [
    ({"epochs": -1}, "--epochs -1: must be 0 or more"),
    ({"lr": "0.1,x"}, "--lr '0.1,x': expected numbers separated by commas"),
    ({"weight_decay": "-1"}, "--weight-decay: -1.0 is not a valid value"),
    ({"holdout_fraction": 1.0}, "--holdout-fraction 1.0: must be in [0, 1)"),
    ({"epochs": 0}, "--epochs 0 trains nothing: it needs --checkpoint"),
    ({"stream_buffer": 0.0}, "--stream-buffer 0.0: must be a positive number of MB"),
])
def test_a_bad_value_is_refused_when_the_settings_are_made(given, message):
    with pytest.raises(DataError) as caught:
        TrainSettings(features=Path("f"), out=Path("o"), **given)
    assert message in str(caught.value)


def test_a_reference_reads_as_each_command_s_flag(capsys):
    """The same error, shown by the script and by quickfix-labels, in each one's flags."""
    with pytest.raises(DataError) as caught:
        ExtractSettings(checkpoint=Path("c"), data_root=Path("d"), out=Path("o"), batch_size=0)
    names = F.build_command().names
    assert str(caught.value) == "--batch-size 0: must be at least 1"
    assert caught.value.message(names) == "--extract-batch-size 0: must be at least 1"
    text = f"rerun {ref('cmd.extract')} with {ref('extract.verify')}; {ref('train.epochs', 0)}"
    assert render(text) == "rerun extract_features.py with --verify; --epochs 0"
    assert render(text, names) == "rerun quickfix-labels with --verify; --fix-epochs 0"
    assert render(ref("train.stream_from_store", negate=True)) == "--no-stream-from-store"
    # log lines too: the handler renders them in the running command's names
    setup_logging(names=names)
    logging.getLogger("quickfix").warning("see %s", ref("train.epochs"))
    assert capsys.readouterr().err.strip() == "see --fix-epochs"


def test_a_stage_s_message_names_the_flag_of_the_command_that_ran_it(tmp_path, tree, ckpt,
                                                                      capsys):
    """Stage 1 refuses to replace a folder that is not a store: `--out` to extract_features.py,
    `--features` to quickfix-labels."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a store")
    assert extract_features.main(extract_args(ckpt, tree, folder)) == 2
    err = capsys.readouterr().err
    assert f"error: --out {folder} exists and is not a feature store" in err
    assert F.main(["--resume", str(ckpt), "--data-root", str(tree), "--features", str(folder),
                   "--checkpoint-dir", str(tmp_path / "fx")]) == 2
    err = capsys.readouterr().err
    assert f"error: --features {folder} exists and is not a feature store" in err
    assert "choose another --features" in err and "--out" not in err
    assert "\x1e" not in err and "\x1f" not in err  # no reference left unrendered


def test_what_the_stages_write_holds_plain_text(tmp_path, photos, capsys):
    """Messages kept as data (the store's class audit, head.pt's verdict, the fixed checkpoint's
    record) are written with the flags spelt out, never as references."""
    import json

    import torch

    from .conftest import make_model, make_tree, training_checkpoint

    tree = make_tree(tmp_path / "data", photos, per_class=(4, 0), classes=("c10", "c2", "c3"))
    ckpt = tmp_path / "checkpoint_best.pth"
    torch.save(training_checkpoint(make_model(), "resnet18"), ckpt)
    fixed = tmp_path / "fx"
    assert F.main(["--resume", str(ckpt), "--data-root", str(tree), "--checkpoint-dir",
                   str(fixed), "--splits", "train", "--holdout-fraction", "0", "--lr", "0.1",
                   "--weight-decay", "0", "--fix-epochs", "1", "--resize", "40", "--crop", "32",
                   "--decoder", "pil", "--num-threads", "2"]) == 0
    audit = json.loads((fixed / "features.zarr" / "zarr.json").read_text())["attributes"]
    assert any("pass it as --class-order" in w for w in audit["class_audit"]["warnings"])
    head = torch.load(fixed / "head.pt", weights_only=True)
    assert "(--holdout-fraction 0 and no val/" in head["diagnosis"]["backbone_message"]
    record = torch.load(fixed / "checkpoint_best.pth", weights_only=False)["quickfix"]
    assert record["head"]["diagnosis"]["backbone_message"].startswith("no holdout")

    def texts(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from texts(k)
                yield from texts(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from texts(v)

    written = [head, record, *(json.loads(p.read_text()) for p in fixed.rglob("zarr.json")),
               *(p.read_text() for p in fixed.glob("*.jsonl")), (fixed / F.STATE).read_text()]
    assert not [t for t in texts(written) if "\x1e" in t or "\x1f" in t]
    assert "\x1e" not in capsys.readouterr().err
