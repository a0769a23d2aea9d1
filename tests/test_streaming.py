"""Stage 2 out of core: features read from the store in chunks, with a bounded buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import extract_features
import train_head
from pipeline import head as H
from pipeline import store as S
from pipeline.streaming import StoreRows, WindowBatches

GRID = ["--lr", "0.01,0.03,0.1", "--weight-decay", "0,0.001"]


@pytest.fixture(scope="session")
def chunked(digits, tmp_path_factory):
    """The digits store again, in chunks of 32 rows (1,438 train rows: 45 chunks)."""
    store = tmp_path_factory.mktemp("chunked") / "features.zarr"
    rc = extract_features.main(["--checkpoint", str(digits["ckpt"]), "--data-root",
                                str(digits["root"] / "data"), "--out", str(store), "--resize",
                                "32", "--crop", "32", "--decoder", "pil", "--float32",
                                "--batch-size", "256", "--chunk-rows", "32"])
    assert rc == 0
    return store


def test_store_rows_are_permuted_so_every_chunk_mixes_classes(chunked):
    """Stage 1 keeps the rows in a fixed permutation of the sorted scan: the chunks that the
    out-of-core path shuffles each hold many classes, not one."""
    g = zarr.open_group(str(chunked), mode="r")
    assert g.attrs["fingerprint"]["components"]["row_order"] == "permuted-v1"
    labels = g["train"]["labels"][:]
    per_chunk = [np.unique(labels[lo:lo + 32]).size for lo in range(0, labels.size - 32, 32)]
    assert min(per_chunk) >= 5  # sorted by folder, nearly every chunk would hold 1 class
    files = g["train"]["files"][:].tolist()
    assert files != sorted(files)


def test_window_batches_cover_every_row_once_per_epoch(chunked):
    group = S.open_store(chunked)
    store = S.FeatureStore(chunked, group)
    ok = group["train"]["ok"][:].astype(bool)
    mask = ok.copy()
    mask[::7] = False  # some rows held out
    rows = StoreRows(store, "train", mask)
    assert len(rows) == int(mask.sum())
    chunk_bytes = rows.chunk_bytes
    batches = WindowBatches(rows, 50, torch.device("cpu"), buffer_bytes=8 * chunk_bytes, seed=0)
    assert batches.window == 3  # (8 chunks - 2 read ahead) / 2: the window is held twice
    feats = group["train"]["features"][:]
    want = sorted(map(bytes, feats[mask]))
    orders = []
    for _ in range(2):
        got, n_batches, order = [], 0, []
        for x, y, m in batches.epoch():
            assert x.shape == (50, rows.dim) and y.shape == (50,) and m.shape == (50,)
            real = m.bool()
            got += [bytes(r) for r in x[real].numpy()]
            order.append(y[real])
            n_batches += 1
        assert n_batches == batches.steps == -(-len(rows) // 50)
        assert sorted(got) == want  # every usable row exactly once, nothing else
        orders.append(torch.cat(order))
    assert not torch.equal(orders[0], orders[1])  # a fresh order each epoch
    again = WindowBatches(rows, 50, torch.device("cpu"), buffer_bytes=8 * chunk_bytes, seed=0)
    assert torch.equal(torch.cat([y[m.bool()] for _, y, m in again.epoch()]), orders[0])


def _train(store, out, *extra):
    assert train_head.main(["--features", str(store), "--out", str(out), "--epochs", "20",
                            *GRID, *extra]) == 0
    return torch.load(out, weights_only=True)


def test_out_of_core_reaches_the_in_memory_accuracy(tmp_path, chunked, capsys):
    """A buffer of 10 chunks (4 in the window: 128 of 1,295 train rows) on real-image features."""
    memory = _train(chunked, tmp_path / "m.pt", "--no-stream-from-store")
    buffer_mb = 10 * 32 * 512 * 4 / 2**20
    ooc = _train(chunked, tmp_path / "o.pt", "--stream-from-store", "--stream-buffer",
                 str(buffer_mb))
    err = capsys.readouterr().err
    assert "out of core: a window of 4 chunks (128 rows)" in err
    assert ooc["config"]["out_of_core"] is True and memory["config"]["out_of_core"] is False
    # val top-1 over the grid's 6 points (one point alone moves by an image or two, 0.3 point
    # each, with any change of batch order): out of core within 0.5 point of in memory
    a = [r["val_top1"] for r in memory["grid"]]
    b = [r["val_top1"] for r in ooc["grid"]]
    print(f"val top-1 over the grid: in memory {np.mean(a):.4f}, out of core {np.mean(b):.4f}")
    assert np.mean(b) >= np.mean(a) - 0.005
    # deterministic for a seed
    again = _train(chunked, tmp_path / "o2.pt", "--stream-from-store", "--stream-buffer",
                   str(buffer_mb))
    assert torch.equal(again["weight"], ooc["weight"])


def test_out_of_core_evaluates_like_in_memory(chunked):
    """Statistics, evaluation and the old-head diagnosis read the store chunk by chunk and give
    what the rows in memory give."""
    group = S.open_store(chunked)
    store = S.FeatureStore(chunked, group)
    ok = group["train"]["ok"][:].astype(bool)
    rows = StoreRows(store, "train", ok)
    mem, _ = rows.load()
    dev = torch.device("cpu")
    for a, b in zip(H.feature_stats(rows, dev), H.feature_stats(mem.x, dev), strict=True):
        torch.testing.assert_close(a, b)
    w = torch.randn(2, 10, rows.dim, generator=torch.Generator().manual_seed(0))
    b = torch.zeros(2, 10)
    for got, want in zip(H.evaluate(rows, w, b, device=dev), H.evaluate(mem, w, b, device=dev),
                         strict=True):
        assert got == pytest.approx(want)
    d1, d2 = H.diagnose(rows, w[0], b[0], device=dev), H.diagnose(mem, w[0], b[0], device=dev)
    assert d1.mapping == d2.mapping and d1.accuracy_after == d2.accuracy_after


def test_bad_buffer_is_refused(tmp_path, chunked, capsys):
    assert train_head.main(["--features", str(chunked), "--out", str(tmp_path / "h.pt"),
                            "--stream-from-store", "--stream-buffer", "0"]) == 2
    assert "--stream-buffer 0.0: must be a positive number of MB" in capsys.readouterr().err
    assert not (tmp_path / "h.pt").exists()


def test_holdout_scored_in_the_training_pass_equals_its_own_pass(chunked):
    """Out of core, the holdout rows are scored as their chunks pass by in the next epoch (the
    store is read once per epoch): the same numbers as scoring them in a pass of their own."""
    group = S.open_store(chunked)
    store = S.FeatureStore(chunked, group)
    ok = group["train"]["ok"][:].astype(bool)
    labels = group["train"]["labels"][:]
    hold = H.holdout_split(np.where(ok, labels, -1), 0.1, 0) & ok
    train = ok & ~hold
    cfg = H.TrainConfig(lrs=[0.03, 0.3], wds=[0.0], epochs=3, batch_size=64,
                        warmup_epochs=1.0, seed=0)
    dev = torch.device("cpu")
    runs = []
    for side in (hold, None):
        src = StoreRows(store, "train", train, side=side)
        batches = WindowBatches(src, 64, dev, buffer_bytes=10 * src.chunk_bytes, seed=0,
                                side_name="holdout")
        runs.append(H.train_heads(StoreRows(store, "train", train), cfg, num_classes=10,
                                  device=dev, evals={"holdout": StoreRows(store, "train", hold)},
                                  batches=batches))
    fused, separate = runs
    assert torch.equal(fused.weight, separate.weight)  # the same batches either way
    assert len(fused.history) == len(separate.history) == 6
    for a, b in zip(fused.history, separate.history, strict=True):
        assert (a["epoch"], a["lr"]) == (b["epoch"], b["lr"])
        assert a["holdout_top1"] == b["holdout_top1"] and a["holdout_top5"] == b["holdout_top5"]
        assert a["holdout_loss"] == pytest.approx(b["holdout_loss"], rel=1e-9)
        assert a["train_loss"] == b["train_loss"]


def test_one_pass_loads_train_and_holdout_as_two_passes_would(chunked):
    group = S.open_store(chunked)
    store = S.FeatureStore(chunked, group)
    ok = group["train"]["ok"][:].astype(bool)
    hold = H.holdout_split(np.where(ok, group["train"]["labels"][:], -1), 0.1, 0) & ok
    train, held = StoreRows(store, "train", ok & ~hold, side=hold).load()
    alone, _ = StoreRows(store, "train", ok & ~hold).load()
    held_alone, _ = StoreRows(store, "train", hold).load()
    assert torch.equal(train.x, alone.x) and torch.equal(train.y, alone.y)
    assert torch.equal(held.x, held_alone.x) and torch.equal(held.y, held_alone.y)
    assert len(held) == int(hold.sum()) > 0
