"""The stages under `torchrun --nproc-per-node 2` (gloo, CPU): real processes, real stores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import extract_args, make_tree
from .test_extract import assert_finished_equal, read_split

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
ARRAYS = ("features", "labels", "files", "ok", "reasons", "chunk_done")


def env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)


def torchrun(n: int, script: str, args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, str(n), str(ROOT / script), *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


def single(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def ours(stderr: str) -> list[str]:
    """Our own lines, without torchrun's launcher warnings and failure report."""
    return [line for line in stderr.splitlines()
            if line and not line.startswith(("W1", "E1", "I1", "[W", "[I"))]


def assert_same_store(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        x, y = read_split(a, split), read_split(b, split)
        for k in ARRAYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{split}/{k}")


@pytest.fixture
def bigger_tree(tmp_path, photos) -> Path:
    return make_tree(tmp_path / "data", photos, per_class=(10, 4))


def test_two_ranks_give_the_single_process_store(tmp_path, bigger_tree, ckpt):
    one = single("extract_features.py",
                 extract_args(ckpt, bigger_tree, tmp_path / "one.zarr", "--num-threads", "1"))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "extract_features.py",
                   extract_args(ckpt, bigger_tree, tmp_path / "two.zarr", "--num-threads", "1"))
    assert two.returncode == 0, two.stderr
    assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")
    lines = ours(two.stderr)
    summary = [line for line in lines if line.startswith("extract: ")]
    # one voice: rank 0's summary covers the whole job (30 train + 12 val images)
    assert summary == [summary[0]] and summary[0].startswith("extract: 42 images on 2 ranks")
    assert sum("preprocessing:" in line for line in lines) == 1
    again = torchrun(2, "extract_features.py",
                     extract_args(ckpt, bigger_tree, tmp_path / "two.zarr", "--num-threads", "1"))
    assert again.returncode == 0 and "already complete" in again.stderr


def test_a_user_error_stops_every_rank_with_one_line(tmp_path, bigger_tree, ckpt):
    out = tmp_path / "s.zarr"
    assert torchrun(2, "extract_features.py", extract_args(ckpt, bigger_tree, out)).returncode == 0
    other = torchrun(2, "extract_features.py",
                     extract_args(ckpt, bigger_tree, out, "--crop", "30"))
    assert other.returncode != 0
    errors = [line for line in ours(other.stderr) if line.startswith("error: ")]
    assert errors == [f"error: {out} was made from other inputs (differs in: "
                      "preprocessing.crop); pass --overwrite to replace it, or choose another "
                      "--out"]
    early = torchrun(2, "extract_features.py", extract_args(ckpt, bigger_tree, out, "--batch-size",
                                                            "0"))
    assert early.returncode != 0
    assert [line for line in ours(early.stderr) if line.startswith("error: ")] == [
        "error: --batch-size 0: must be at least 1"]


def test_ranks_share_their_job_s_lock_and_another_job_is_refused(tmp_path, bigger_tree, ckpt):
    """The ranks of one job write together under rank 0's lock (the two-rank runs above); a
    second job on the same store while one runs is refused on every rank with one line."""
    from .test_reliability import _hold

    out = tmp_path / "s.zarr"
    holder = _hold(out)
    try:
        run = torchrun(2, "extract_features.py", extract_args(ckpt, bigger_tree, out))
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in ours(run.stderr) if line.startswith("error: ")]
    assert run.returncode != 0 and len(errors) == 1, run.stderr
    assert "is being written by another run" in errors[0] and f"pid {holder.pid}" in errors[0]
    assert not out.exists()


def _worker(agent: int, local_rank: int) -> int | None:
    """The pid of torchrun's worker process of `local_rank`."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(p.name)
    return None


def test_a_killed_rank_is_finished_by_the_rerun(tmp_path, photos):
    from .factories import slow_net

    tree = make_tree(tmp_path / "data", photos, per_class=(8, 0), classes=("a", "b"))
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": slow_net(2).state_dict(), "arch": "tests.factories:slow_net"}, ckpt)
    args = ["--checkpoint", str(ckpt), "--data-root", str(tree), "--splits", "train",
            "--resize", "40", "--crop", "32", "--chunk-rows", "2", "--batch-size", "2",
            "--num-threads", "1", "--float32"]
    killed = tmp_path / "killed.zarr"
    agent = subprocess.Popen([*TORCHRUN, "2", str(ROOT / "extract_features.py"), *args,
                              "--out", str(killed)], env=env(SLOWNET_SECONDS="0.3"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done_dir = killed / "train" / "chunk_done" / "c"
    deadline = time.monotonic() + 120
    while not (done_dir.is_dir() and len(list(done_dir.iterdir())) >= 2):
        assert agent.poll() is None, agent.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim = _worker(agent.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert agent.wait(timeout=120) != 0  # torchrun stops the job when a rank dies
    partial = read_split(killed, "train")["chunk_done"]
    assert 2 <= partial.sum() < partial.size
    rerun = torchrun(2, "extract_features.py", [*args, "--out", str(killed)])
    assert rerun.returncode == 0, rerun.stderr
    left = partial.size - int(partial.sum())
    assert (f"train: {int(partial.sum())} of {partial.size} chunks already done; 2 ranks share "
            f"the other {left}") in rerun.stderr
    assert f"extract: {sum(min(2, 16 - 2 * c) for c in np.flatnonzero(~partial.astype(bool)))}" \
        " images on 2 ranks" in rerun.stderr
    clean = tmp_path / "clean.zarr"
    whole = single("extract_features.py", [*args, "--out", str(clean)])
    assert whole.returncode == 0, whole.stderr
    assert_finished_equal(killed, clean)


def test_stage2_on_two_ranks_equals_one(tmp_path, digits):
    """Each rank holds half of the rows; the summed gradients give every rank the single-process
    head, up to float32 summation order."""
    args = ["--features", str(digits["store"]), "--checkpoint", str(digits["ckpt"]),
            "--epochs", "5", "--lr", "0.1,1", "--weight-decay", "0,0.0001"]
    one = single("train_head.py", [*args, "--out", str(tmp_path / "one.pt")])
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "train_head.py", [*args, "--out", str(tmp_path / "two.pt")])
    assert two.returncode == 0, two.stderr
    assert "the 2 ranks hold the same head" in two.stderr
    summary = [line for line in ours(two.stderr) if line.startswith("train_head: ")]
    assert len(summary) == 1 and "on 2 ranks" in summary[0]
    a = torch.load(tmp_path / "one.pt", weights_only=True)
    b = torch.load(tmp_path / "two.pt", weights_only=True)
    assert b["config"]["ranks"] == 2 and a["config"]["ranks"] == 1
    scale = float(a["weight"].abs().max())
    torch.testing.assert_close(b["weight"], a["weight"], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(b["bias"], a["bias"], rtol=0, atol=1e-5 * scale)
    assert a["diagnosis"] == b["diagnosis"]  # the confusion matrix summed over the ranks
    for ra, rb in zip(a["grid"], b["grid"], strict=True):
        assert ra["candidate"] == rb["candidate"] and ra["lr"] == rb["lr"]
        for k in ("holdout_top1", "val_top1", "val_top5"):
            assert rb[k] == pytest.approx(ra[k], abs=1.5 / 359)  # an image, at most, flips
    assert b["metrics"]["lr"] == a["metrics"]["lr"]


def test_stage2_under_torchrun_refuses_out_of_core_in_one_line(tmp_path, digits):
    run = torchrun(2, "train_head.py", ["--features", str(digits["store"]), "--out",
                                        str(tmp_path / "h.pt"), "--stream-from-store"])
    assert run.returncode != 0
    errors = [line for line in ours(run.stderr) if line.startswith("error: ")]
    assert errors == ["error: --stream-from-store runs in one process; under torchrun each rank "
                      "holds its share of the rows in memory: add ranks until it fits"]
    assert not (tmp_path / "h.pt").exists()


def test_quickfix_labels_under_torchrun(tmp_path, bigger_tree, ckpt):
    """The one command under torchrun: stages 1 and 2 on both ranks, stage 3 on rank 0; the head
    is the single process's, and the rerun finds everything up to date."""
    flags = ["--resume", str(ckpt), "--data-root", str(bigger_tree), "--resize", "40", "--crop",
             "32", "--decoder", "pil", "--chunk-rows", "4", "--num-threads", "1",
             "--fix-epochs", "2", "--lr", "0.1"]
    one = subprocess.run([sys.executable, "-m", "pipeline", *flags, "--checkpoint-dir",
                          str(tmp_path / "one")], env=env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr

    def two():
        return subprocess.run([*TORCHRUN, "2", "-m", "pipeline", *flags, "--checkpoint-dir",
                               str(tmp_path / "two")], env=env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    first = two()
    assert first.returncode == 0, first.stderr
    lines = ours(first.stderr)
    summaries = [ln for ln in lines if ln.startswith(("extract: ", "stitch: head replaced",
                                                       "verify: ")) or
                 (ln.startswith("train_head: ") and " chosen of " in ln)]
    assert [ln.split(":")[0] for ln in summaries] == ["extract", "train_head", "stitch",
                                                      "verify"], lines  # one voice: rank 0's
    assert first.stdout.count("fixed checkpoint:") == 1
    a = torch.load(tmp_path / "one" / "head.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "head.pt", weights_only=True)
    torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "checkpoint_best.pth").is_file()
    again = two()
    # the triage's decision (no relabel) is kept too: four stages up to date
    assert again.returncode == 0 and again.stderr.count(": up to date") == 4, again.stderr
    # a chunk damaged after the fact, found by a rank as stage 2 reads it: every rank repairs
    # the store with stage 1 --verify and trains again
    from pipeline import store as S

    store = tmp_path / "two" / "features.zarr"
    for chunk in range(2):
        path = S.chunk_path(S.open_store(store), "train", "features", chunk)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    flags[-1] = "0.2"  # --lr
    repaired = two()
    assert repaired.returncode == 0, repaired.stderr
    assert "repairing it with stage 1 --verify" in repaired.stderr
    assert not S.verify_store(S.open_store(store))
