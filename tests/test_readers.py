"""Stage 1's input paths: the batch plan, DALI's pipelined reader, its recovery, its workers."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import extract_features
from pipeline import data as D
from pipeline import imagefile as F
from pipeline import readers as R
from pipeline.errors import SetupError
from pipeline.models import Preprocess

from .conftest import SIZE, extract_args, make_tree, write_bad

ROOT = Path(__file__).resolve().parent.parent
PRE = Preprocess(int(SIZE["resize"]), int(SIZE["crop"]))


def test_plan_covers_every_row_once_and_never_crosses_a_chunk():
    sizes = {0: 10, 1: 7}
    chunks = [(0, 0, 10), (0, 2, 10), (1, 0, 7), (1, 1, 7)]
    plan = R.plan_batches(chunks, chunk_rows=4, batch_size=3)
    rows = [(int(s), r) for s, lo, n in plan for r in range(lo, lo + n)]
    assert rows == [(0, r) for r in (0, 1, 2, 3, 8, 9)] + [(1, r) for r in range(7)]
    for s, lo, n in plan:
        assert lo // 4 == (lo + n - 1) // 4 and lo + n <= sizes[int(s)]
    # a chunk is cut the same way whatever else is in the run (a resumed run forms the same
    # batches as an uninterrupted one)
    alone = R.plan_batches([(1, 1, 7)], chunk_rows=4, batch_size=3)
    assert alone.tolist() == [p for p in plan.tolist() if p[0] == 1 and p[1] >= 4]


def _split(tree: Path, name="train") -> D.Split:
    root = tree / name
    return D.scan_split(name, root, D.class_folders(root))


def _reader(split: D.Split, batch_size=3, chunk_rows=4, **kw) -> R.DaliReader:
    n = len(split.files)
    plan = R.plan_batches([(0, c, n) for c in range(-(-n // chunk_rows))], chunk_rows,
                          batch_size)
    return R.DaliReader([split.root], [split.files], plan, PRE, device="cpu",
                        batch_size=batch_size, num_threads=2, workers=1, **kw)


def _decode_alone(split: D.Split, rows) -> list:
    """The synchronous decoder on one file at a time: what each row must equal."""
    decoder = R.DaliDecoder(PRE, device="cpu", max_batch=1, num_threads=1)
    out = []
    for r in rows:
        encoded, roi, reason, usable = F.prepare(split.root / split.files[r], PRE.resize,
                                                 PRE.crop)
        assert usable, reason
        images, errors = decoder.decode([encoded], [roi])
        out.append(images[0])
    return out


def test_dali_reader_gives_every_row_in_order_without_copies(tmp_path, photos):
    tree = make_tree(tmp_path / "data", photos, per_class=(4, 0))
    for kind in ("html", "zero_bytes", "gif", "cmyk"):
        write_bad(tree / "train" / "n02" / f"x_{kind}.JPEG", kind, photos)
    split = _split(tree)
    reader = _reader(split)
    seen, good = [], []
    try:
        for batch in reader:
            assert batch.images.shape == (batch.n, 3, PRE.crop, PRE.crop)
            # the model gets DALI's own output buffer: no cat/stack of decoded images
            assert batch.images.data_ptr() == batch.keep[0].as_tensor().data_ptr()
            for i in range(batch.n):
                row = batch.lo + i
                seen.append(row)
                if batch.ok[i]:
                    good.append((row, batch.images[i].clone()))
                else:
                    assert batch.reasons[i]
    finally:
        reader.close()
    assert seen == list(range(len(split.files)))
    bad = {split.files[r] for r in seen} - {split.files[r] for r, _ in good}
    assert bad == {"n02/x_html.JPEG", "n02/x_zero_bytes.JPEG"}
    # every usable row (a GIF converted to raw RGB, a CMYK JPEG included) is exactly what DALI
    # gives for that file alone
    expected = _decode_alone(split, [r for r, _ in good])
    for (row, got), want in zip(good, expected, strict=True):
        assert torch.equal(got, want), split.files[row]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_a_folder_named_like_an_image_is_quarantined_not_waited_on(tmp_path, tree,
                                                                             ckpt):
    os.mkfifo(tree / "train" / "n01" / "fifo.JPEG")  # reading it would block forever
    (tree / "train" / "n01" / "folder.JPEG").mkdir()
    os.symlink("/dev/zero", tree / "train" / "n01" / "zero.JPEG")  # endless
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    import zarr

    g = zarr.open_group(str(out))["train"]
    why = dict(zip(g["files"][:], g["reasons"][:], strict=True))
    ok = dict(zip(g["files"][:], g["ok"][:], strict=True))
    for name in ("n01/fifo.JPEG", "n01/zero.JPEG"):
        assert not ok[name] and why[name] == "cannot read: not a regular file"
    assert "n01/folder.JPEG" not in why  # a folder is not listed as a file at all
    assert sum(ok.values()) == 12


def test_a_failed_batch_costs_only_the_bad_files_row(tmp_path, photos):
    tree = make_tree(tmp_path / "data", photos, per_class=(3, 0), classes=("a", "b", "c"))
    # passes every check on the bytes, fails in DALI's decoder: its whole batch fails in DALI
    write_bad(tree / "train" / "b" / "img1.JPEG", "corrupt_png", photos)
    split = _split(tree)
    bad_row = split.files.index("b/img1.JPEG")
    reader = _reader(split, batch_size=3, chunk_rows=9)
    rows = {}
    try:
        for batch in reader:
            for i in range(batch.n):
                rows[batch.lo + i] = (batch.ok[i], batch.reasons[i], batch.images[i].clone())
    finally:
        reader.close()
    assert reader.recovered_batches == 1
    assert sorted(rows) == list(range(9))
    ok, reason, _ = rows[bad_row]
    assert not ok and "DALI could not decode it" in reason and "undecodable" in reason
    good = [r for r in range(9) if r != bad_row]
    assert all(rows[r][0] and rows[r][1] == "" for r in good)
    for r, want in zip(good, _decode_alone(split, good), strict=True):
        assert torch.equal(rows[r][2], want)


def test_a_broken_dali_setup_stops_the_run_before_any_image(tmp_path, tree, ckpt, capsys,
                                                           monkeypatch):
    real_graph = R._graph

    def graph_with_an_argument_dali_rejects(*args, **kw):
        from nvidia.dali import fn

        real_decoder = fn.decoders.image
        monkeypatch.setattr(fn.decoders, "image",
                            lambda *a, **k: real_decoder(*a, no_such_argument=1, **k))
        try:
            return real_graph(*args, **kw)
        finally:
            monkeypatch.setattr(fn.decoders, "image", real_decoder)

    monkeypatch.setattr(R, "_graph", graph_with_an_argument_dali_rejects)
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out, "--decoder", "dali")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot start the DALI pipeline (cpu decoder)")
    assert "no_such_argument" in err[-1] and "--decoder pil" in err[-1]
    assert not any("Traceback" in line or "quarantined" in line for line in err)
    import zarr

    assert not zarr.open_group(str(out))["train"]["chunk_done"][:].any()


def test_progress_lines_go_to_a_log_that_is_not_a_terminal(tmp_path, tree, ckpt, capsys):
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out, "--progress-every", "0")) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("extract: ") and "ETA" in ln]
    assert lines, err
    assert lines[-1].startswith("extract: 18/18 images (100.0%), ")
    assert " img/s, ETA 0m00s" in lines[-1]


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_dali_workers_die_with_a_killed_run(tmp_path, photos):
    tree = make_tree(tmp_path / "data", photos, per_class=(8, 0), classes=("a", "b"))
    from .factories import slow_net

    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": slow_net(2).state_dict(), "arch": "tests.factories:slow_net"},
               ckpt)
    out = tmp_path / "f.zarr"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "extract_features.py"), "--checkpoint", str(ckpt),
         "--data-root", str(tree), "--splits", "train", "--resize", "40", "--crop", "32",
         "--chunk-rows", "2", "--batch-size", "2", "--num-threads", "1", "--read-workers", "2",
         "--decoder", "dali", "--out", str(out)],
        env=dict(os.environ, PYTHONPATH=str(ROOT), SLOWNET_SECONDS="0.3"), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "train" / "chunk_done" / "c"
    deadline = time.monotonic() + 120
    while not (done.is_dir() and any(done.iterdir())):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workers = _children(proc.pid)
    assert len(workers) >= 2  # DALI's reader processes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while workers and time.monotonic() < deadline:
        workers = {w for w in workers if Path(f"/proc/{w}").exists()
                   and "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1][:3]}
        time.sleep(0.1)
    assert not workers, f"worker processes {workers} outlived the killed run"


def test_chunk_rows_are_on_disk_before_the_chunk_is_marked_done(tmp_path, tree, ckpt,
                                                               monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "f.zarr"
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0
    for chunk in range(3):  # train: 12 rows in chunks of 4
        mark = synced.index(str(out / "train" / "chunk_done" / "c" / str(chunk)))
        for array in ("features/c/{}/0", "ok/c/{}", "reasons/c/{}"):
            path = out / "train" / array.format(chunk)
            # written even when all fill value (no reasons), so a missing file is damage
            assert str(path) in synced[:mark], f"{path} was not fsynced before its chunk's mark"


def test_a_store_that_cannot_be_written_is_one_line(tmp_path, tree, ckpt, capsys,
                                                    monkeypatch):
    out = tmp_path / "f.zarr"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert extract_features.main(extract_args(ckpt, tree, out)) == 0  # rank 0's chunks
    # damage: where rank 1 must write its features chunk, a file stands in for the folder
    (out / "train" / "features" / "c" / "2").write_bytes(b"not a folder")
    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert extract_features.main(extract_args(ckpt, tree, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write the feature store {out}")
    assert not any("Traceback" in line for line in err)


class _FlakySource(F.BatchSource):
    """Fails some batches in the worker, as a full /dev/shm or a dying worker would."""

    fail: set[tuple[int, int]] = set()  # (first row, split) of the batches that fail

    def __call__(self, info):
        k = info.iteration
        if k < len(self.plan) and (int(self.plan[k][1]), int(self.plan[k][0])) in self.fail:
            raise OSError("No space left on device (simulated)")
        return super().__call__(info)


def test_a_failure_no_file_explains_restarts_the_pipeline(tmp_path, photos, monkeypatch):
    tree = make_tree(tmp_path / "data", photos, per_class=(4, 0))
    split = _split(tree)
    monkeypatch.setattr(F, "BatchSource", _FlakySource)
    monkeypatch.setattr(_FlakySource, "fail", {(3, 0)})  # the second batch of 3 rows
    reader = _reader(split, batch_size=3, chunk_rows=12)
    rows = {}
    try:
        for batch in reader:
            for i in range(batch.n):
                rows[batch.lo + i] = (batch.ok[i], batch.images[i].clone())
    finally:
        reader.close()
    # A worker's error can surface while DALI schedules ahead, i.e. at the batch before the one
    # that failed; that batch is then re-decoded on the side too, with the same result.
    assert 1 <= reader.recovered_batches <= 2
    assert sorted(rows) == list(range(12)) and all(ok for ok, _ in rows.values())
    for r, want in zip(range(12), _decode_alone(split, range(12)), strict=True):
        assert torch.equal(rows[r][1], want)


def test_a_pipeline_that_keeps_failing_is_a_setup_error(tmp_path, photos, monkeypatch):
    tree = make_tree(tmp_path / "data", photos, per_class=(4, 0))
    split = _split(tree)
    monkeypatch.setattr(F, "BatchSource", _FlakySource)
    monkeypatch.setattr(_FlakySource, "fail", {(r, 0) for r in range(0, 12, 3)})
    reader = _reader(split, batch_size=3, chunk_rows=12)
    seen = 0
    try:
        with pytest.raises(SetupError, match="DALI failed on 3 batches in a row"):
            for batch in reader:
                seen += batch.n
    finally:
        reader.close()
    assert seen == 9  # three batches recovered on the side, then the run stops
