#!/usr/bin/env python3
"""A fault campaign against stage 1 and stage 2's reliability guarantees (issue 14), with faults
other than tests/test_reliability.py's: every trial runs the real scripts as subprocesses.

    python -m bench.campaign --out /tmp/campaign [--seed S] [--quick] [--json PATH]

It builds, in --out, a tree of real-photo JPEGs (tests.conftest.make_tree, plus a few broken
files so that `ok` and `reasons` are not trivial), a ResNet-18 training checkpoint, two clean
reference stores (crop 32 and crop 40) and reference heads, then runs:

1. kills: SIGKILL of stage 1's main process (as `kill -9 PID` or the OOM killer does: its DALI
   workers are not signalled) at a random moment (uniform over a measured run, uniform over the
   extraction window, when the store's temp folder appears, when the k-th chunk is marked done),
   once or twice, then the same command again; SIGKILL of a `--verify` run repairing a tampered
   store (at random, or just after it logs "repairing"); SIGKILL of train_head (at random, in
   its last second, or when its temp head file appears). Held: the rerun exits 0, the store is
   bit-identical to the clean one (every chunk and metadata file; the root's record aside for a
   store made at another path), every chunk done, nothing left beside the store.
2. tamperings of a copy of the finished store (split, array or metadata, chunk, operation drawn
   at random; 1 or 2 at once; plus the root's metadata): train_head must refuse with one
   `error:` line (exit 2), or exit 0 with a head bit-identical to the clean store's head; then
   `extract_features.py ... --verify` must leave the store bit-identical to the untouched copy,
   and train_head exit 0. A chunk replaced by another chunk of the same array keeps a valid
   checksum: counted in its own row.
3. concurrent writers: two stage 1 runs on one --out (crop 32 / crop 40, with and without
   --overwrite, random start offsets, from no store / a finished / a half-done store); and
   train_head racing an --overwrite writer.
4. hostile inputs: odd names, empty, unreadable or looping folders, FIFOs and devices named like
   images, outputs whose path is a file: one `error:` line (exit 2) or completion, never a
   traceback or a hang.

Prints a table (category, trials, held, failed) and writes every trial's details to the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable
RSS_CAP = 4 << 30  # a run whose process group grows past this is killed (a memory bomb)
TIMEOUT = 240.0
CROP_A, CROP_B = 32, 40
ARRAYS = ("features", "labels", "files", "stat", "ok", "reasons", "chunk_done")
ROW_DATA = ("features", "labels", "ok")  # what stage 2 trains on

PLAN = {  # trials per kind: full run (~20 min on 2 cores), --quick (~3 min)
    "full": dict(kill=14, kill_verify=6, kill_head=8, tamper=20, root_meta=2, concurrent=7,
                 head_vs_writer=3, bad="all"),
    "quick": dict(kill=3, kill_verify=1, kill_head=1, tamper=3, root_meta=0, concurrent=1,
                  head_vs_writer=0, bad=("newline in a JPEG name",
                                         "class-order file that is not UTF-8",
                                         "store path is a file")),
}


# ---------------------------------------------------------------------------------------------
# running a script as a subprocess: watched, killed on a trigger, bounded in time and memory


def _proc_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, pgrp, ...]


def group_members(pgid: int) -> list[dict]:
    """Live processes of a process group (this campaign's own subprocess sessions only)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _proc_fields(int(entry))
        if f is not None and int(f[2]) == pgid and f[0] != "Z":
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
            except OSError:
                cmd = b""
            out.append({"pid": int(entry), "state": f[0], "ppid": int(f[1]),
                        "cmd": cmd.decode("utf-8", "replace").strip()})
    return out


def group_rss(pgid: int) -> int:
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for m in group_members(pgid):
        try:
            total += int(Path(f"/proc/{m['pid']}/statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            pass
    return total


def reap(pgid: int) -> None:
    """Kill what is left of a process group this campaign started (by its id)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass
class Kill:
    """When to SIGKILL the main process: at a time, a delay after a log line, or a delay after
    `count()` reaches `at_least`."""

    mode: str  # time | line | files
    at: float = 0.0
    pattern: str = ""
    delay: float = 0.0
    count: object = None
    at_least: int = 1
    what: str = ""
    _cond: float | None = None

    def due(self, elapsed: float, lines: list) -> bool:
        if self.mode == "time":
            return elapsed >= self.at
        if self._cond is None:
            if self.mode == "line" and any(self.pattern in ln for _, ln in lines):
                self._cond = elapsed
            elif self.mode == "files" and self.count() >= self.at_least:
                self._cond = elapsed
        return self._cond is not None and elapsed >= self._cond + self.delay

    def describe(self) -> dict:
        d = {"mode": self.mode, "what": self.what}
        if self.mode == "time":
            d["at_s"] = round(self.at, 3)
        else:
            d.update(delay_s=round(self.delay, 3), condition_met_at_s=(
                None if self._cond is None else round(self._cond, 3)))
            if self.mode == "line":
                d["pattern"] = self.pattern
            else:
                d["at_least"] = self.at_least
        return d


def show(argv) -> str:
    return " ".join(os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv)


def run(argv: list, *, kill: Kill | None = None, timeout: float = TIMEOUT,
        keep_group: bool = False) -> dict:
    """Run one command (cwd: the repository); return what happened. With keep_group the
    process group is not reaped (the caller reruns first, to see whether leftovers block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([str(a) if isinstance(a, Path) else a for a in argv], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    err: list = []
    out: list = []

    def pump(stream, sink):
        for raw in iter(stream.readline, b""):
            sink.append((time.monotonic() - start, raw.decode("utf-8", "replace").rstrip("\n")))

    pumps = [threading.Thread(target=pump, args=(s, k), daemon=True)
             for s, k in ((proc.stderr, err), (proc.stdout, out))]
    for t in pumps:
        t.start()
    killed_at = None
    timed_out = mem_killed = False
    peak = 0
    last_rss = 0.0
    while proc.poll() is None:
        elapsed = time.monotonic() - start
        if kill is not None and killed_at is None and kill.due(elapsed, err):
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed_at = elapsed
        if elapsed > timeout:
            timed_out = True
            reap(proc.pid)
        if elapsed - last_rss > 0.2:
            last_rss = elapsed
            rss = group_rss(proc.pid)
            peak = max(peak, rss)
            if rss > RSS_CAP:
                mem_killed = True
                reap(proc.pid)
        time.sleep(0.004)
    rc = proc.wait()
    wall = time.monotonic() - start
    orphans = []
    if killed_at is not None:
        time.sleep(0.3)
        orphans = group_members(proc.pid)
    if not keep_group:
        reap(proc.pid)
    for t in pumps:
        t.join(timeout=0 if keep_group and orphans else 2.0)
    stderr = "\n".join(ln for _, ln in err)
    lines = [ln for _, ln in err if ln.startswith("error:")]
    return {
        "argv": show(argv), "rc": rc, "wall_s": round(wall, 3),
        "killed_at_s": None if killed_at is None else round(killed_at, 3),
        "kill": kill.describe() if kill is not None else None,
        "kill_landed": killed_at is not None and rc == -signal.SIGKILL,
        "orphans_after_kill": orphans, "pgid": proc.pid,
        "timed_out": timed_out, "mem_killed": mem_killed, "peak_rss_mb": peak >> 20,
        "traceback": "Traceback" in stderr, "error_lines": lines,
        "stderr_tail": stderr[-4000:], "line_times": [(round(t, 3), ln[:100]) for t, ln in err],
    }


def one_line_or_ok(r: dict) -> bool:
    """Exit 0, or exit 2 with exactly one error line; never a traceback, hang or memory bomb."""
    if r["traceback"] or r["timed_out"] or r["mem_killed"]:
        return False
    return r["rc"] == 0 or (r["rc"] == 2 and len(r["error_lines"]) == 1)


def refused_one_line(r: dict) -> bool:
    return (r["rc"] == 2 and len(r["error_lines"]) == 1 and not r["traceback"]
            and not r["timed_out"])


def compact(r: dict) -> dict:
    """A run's record without the per-line timings (kept only where a kill depends on them)."""
    return {k: v for k, v in r.items() if k not in ("line_times", "pgid")}


# ---------------------------------------------------------------------------------------------
# stores: snapshots, comparison, leftovers


def snapshot(store: Path, root_meta: bool = True) -> dict[str, bytes]:
    files = {}
    for dirpath, _, names in os.walk(store):
        for n in names:
            p = Path(dirpath) / n
            rel = str(p.relative_to(store))
            if rel == "zarr.json" and not root_meta:
                continue
            files[rel] = p.read_bytes()
    return files


def differences(a: dict, b: dict, limit: int = 8) -> list[str]:
    diffs = [f"missing {k}" for k in sorted(set(a) - set(b))]
    diffs += [f"extra {k}" for k in sorted(set(b) - set(a))]
    diffs += [f"differs {k} ({len(a[k])} vs {len(b[k])} bytes)" for k in sorted(set(a) & set(b))
              if a[k] != b[k]]
    return diffs[:limit] + ([f"... {len(diffs) - limit} more"] if len(diffs) > limit else [])


def changed_since(before: dict, store: Path) -> list[str]:
    """How the store differs from its own earlier snapshot."""
    return differences(before, snapshot(store))


def root_attrs(store: Path) -> dict | None:
    try:
        return json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None


def all_done(store: Path) -> bool:
    import zarr
    try:
        g = zarr.open_group(str(store), mode="r")
        return all(bool(g[s]["chunk_done"][:].all()) for s in g.attrs["splits"])
    except Exception:
        return False


def leftovers(store: Path) -> list[str]:
    if not store.parent.is_dir():
        return []
    prefixes = (f".{store.name}.creating-", f".{store.name}.old-", f".{store.name}.lock")
    return sorted(p.name for p in store.parent.iterdir() if p.name.startswith(prefixes))


def same_as(store: Path, ref: Path, ref_snap: dict) -> list[str]:
    """Differences between a store made at another path and the reference: every file but the
    root's metadata, whose record names the run; its fingerprint must match."""
    diffs = differences(ref_snap, snapshot(store, root_meta=False))
    a, b = root_attrs(store), root_attrs(ref)
    if a is None:
        diffs.insert(0, "root zarr.json unreadable")
    elif a.get("fingerprint") != b.get("fingerprint") or a.get("classes") != b.get("classes"):
        diffs.insert(0, "root fingerprint/classes differ")
    return diffs


def killed_then_rerun(what: str, runs: list[dict], final: dict, out: Path, diffs_of,
                      **extra) -> dict:
    """The record of a stage 1 trial: ``runs`` were killed, ``final`` reran to the end.
    ``diffs_of()`` lists how the store differs from what it should be."""
    late = [group_members(r["pgid"]) for r in runs]  # the rerun's length later
    for r in runs:
        reap(r["pgid"])
    diffs = diffs_of() if out.exists() else ["no store"]
    left = leftovers(out)
    return {
        "what": what, **extra, "runs": [compact(r) for r in runs], "rerun": compact(final),
        "differences": diffs, "leftovers_after_rerun": left, "orphans_after_rerun": late,
        "checks": {
            "killed_runs_no_traceback": not any(r["traceback"] for r in runs),
            "no_processes_left_by_the_kill": not any(late),
            "rerun_rc0": final["rc"] == 0 and not final["traceback"],
            "bit_identical": not diffs,
            "all_chunks_done": all_done(out),
            "no_leftovers": not left,
        },
    }


def head_state(path: Path) -> dict:
    import torch
    if not path.exists():
        return {"exists": False}
    try:
        h = torch.load(path, map_location="cpu", weights_only=True)
        w, b = h["weight"], h["bias"]
        return {"exists": True, "loadable": True, "finite": bool(torch.isfinite(w).all()),
                "sig": (w.numpy().tobytes(), b.numpy().tobytes())}
    except Exception as exc:
        return {"exists": True, "loadable": False, "error": f"{type(exc).__name__}: {exc}"[:200]}


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) if folder.is_dir() \
        else []


# ---------------------------------------------------------------------------------------------
# the campaign


class Campaign:
    def __init__(self, out: Path, seed: int, plan: dict):
        self.dir, self.seed, self.plan = out, seed, plan
        self.trials: list[dict] = []
        self.setup: dict = {}

    def rng(self, what: str) -> random.Random:
        return random.Random(f"{self.seed}/{what}")

    # --- commands --------------------------------------------------------------------------

    def extract(self, out: Path, *extra, crop: int = CROP_A, data: Path | None = None,
                ckpt: Path | None = None) -> list:
        return [PY, "extract_features.py", "--checkpoint", ckpt or self.ckpt, "--data-root",
                data or self.data, "--out", out, "--resize", "40", "--crop", str(crop),
                "--chunk-rows", "4", "--batch-size", "2", "--num-threads", "1", *extra]

    def train(self, store: Path, head: Path) -> list:
        return [PY, "train_head.py", "--features", store, "--out", head, "--epochs", "2",
                "--lr", "0.1", "--weight-decay", "0"]

    def record(self, category: str, trial: dict) -> None:
        trial["category"] = category
        trial["held"] = all(trial["checks"].values())
        trial["failed_checks"] = [k for k, v in trial["checks"].items() if not v]
        self.trials.append(trial)
        mark = "held" if trial["held"] else "FAILED " + ",".join(trial["failed_checks"])
        print(f"  [{category}] {trial.get('what', '')[:90]}: {mark}", flush=True)

    # --- setup -----------------------------------------------------------------------------

    def build(self) -> None:
        import torch
        from sklearn.datasets import load_sample_images

        from tests.conftest import make_model, make_tree, training_checkpoint, write_bad

        self.photos = list(load_sample_images().images)
        self.data = self.dir / "data"
        shutil.rmtree(self.dir, ignore_errors=True)
        make_tree(self.data, self.photos, per_class=(16, 6), seed=self.seed)
        # a few broken files, so that `ok` and `reasons` hold more than one value
        write_bad(self.data / "train/n01/broken0.JPEG", "truncated", self.photos)
        write_bad(self.data / "train/n03/broken1.JPEG", "html", self.photos)
        write_bad(self.data / "val/n02/broken2.JPEG", "zero_bytes", self.photos)
        self.ckpt = self.dir / "checkpoint_best.pth"
        torch.save(training_checkpoint(make_model("resnet18", num_classes=3, seed=0),
                                       "resnet18"), self.ckpt)
        ref = self.dir / "ref"
        ref.mkdir()
        self.ref_a, self.ref_b = ref / "a.zarr", ref / "b.zarr"
        r_a = run(self.extract(self.ref_a))
        r_b = run(self.extract(self.ref_b, crop=CROP_B))
        for r in (r_a, r_b):
            if r["rc"] != 0:
                raise SystemExit(f"reference store failed: {r['argv']}\n{r['stderr_tail']}")
        r_v = run(self.extract(self.ref_a, "--verify"))
        self.snap_a = snapshot(self.ref_a, root_meta=False)
        self.snap_b = snapshot(self.ref_b, root_meta=False)
        # a reference run's timeline, to draw kill moments from
        self.t_total = r_a["wall_s"]
        self.t_work = next((t for t, ln in r_a["line_times"] if "labels in the store" in ln),
                           self.t_total * 0.6)
        self.t_end = next((t for t, ln in r_a["line_times"] if ln.startswith("extract:")),
                          self.t_total)
        self.t_verify = r_v["wall_s"]
        h_a, h_a2, h_b = ref / "head_a.pt", ref / "copy" / "head_a.pt", ref / "head_b.pt"
        th = [run(self.train(self.ref_a, h_a)), run(self.train(self.ref_b, h_b))]
        copy = ref / "copy" / "a.zarr"
        shutil.copytree(self.ref_a, copy)
        th.append(run(self.train(copy, h_a2)))
        self.t_head = th[0]["wall_s"]
        self.head_a = head_state(h_a).get("sig")
        self.head_b = head_state(h_b).get("sig")
        self.deterministic = self.head_a is not None and head_state(h_a2).get("sig") == self.head_a
        self.head_ref_file = h_a
        import zarr
        g = zarr.open_group(str(self.ref_a), mode="r")
        self.setup = {
            "images": {s: int(g[s].attrs["num_samples"]) for s in g.attrs["splits"]},
            "chunks": {s: int(g[s].attrs["num_chunks"]) for s in g.attrs["splits"]},
            "quarantined": {s: int((g[s]["ok"][:] == 0).sum()) for s in g.attrs["splits"]},
            "reference_runs": [compact(r) for r in (r_a, r_b, r_v, *th)],
            "stage1_wall_s": self.t_total, "stage1_store_work_s": [self.t_work, self.t_end],
            "verify_wall_s": self.t_verify, "train_head_wall_s": self.t_head,
            "train_head_deterministic": self.deterministic,
            "verify_on_clean_store_rc": r_v["rc"],
        }
        print(f"setup: {self.setup['images']} images, {self.setup['chunks']} chunks; stage 1 "
              f"{self.t_total:.1f} s (store work from {self.t_work:.1f} s), --verify "
              f"{self.t_verify:.1f} s, train_head {self.t_head:.1f} s, head deterministic: "
              f"{self.deterministic}", flush=True)

    # --- 1. kills --------------------------------------------------------------------------

    def stage1_kill(self, rng: random.Random, out: Path, verify: bool = False) -> Kill:
        chunk_dirs = [out / s / "chunk_done" / "c" for s in ("train", "val")]

        def marks() -> int:
            n = 0
            for d in chunk_dirs:
                try:
                    n += len(os.listdir(d))
                except OSError:
                    pass
            return n

        def creating() -> int:
            try:
                return sum(1 for n in os.listdir(out.parent)
                           if n.startswith(f".{out.name}.creating-"))
            except OSError:
                return 0

        total = self.t_verify if verify else self.t_total
        end = self.t_verify - 0.3 if verify else self.t_end
        modes = ["uniform", "window", "creating", "chunks"] if not verify else \
            ["uniform", "window", "repairing", "repairing"]
        mode = rng.choice(modes)
        if mode == "uniform":
            return Kill("time", at=rng.uniform(0.2, total), what="uniform over the run")
        if mode == "window":
            return Kill("time", at=rng.uniform(self.t_work, max(self.t_work, end)),
                        what="uniform over the store work")
        if mode == "creating":
            return Kill("files", count=creating, at_least=1, delay=rng.uniform(0, 0.05),
                        what="store temp folder appeared")
        if mode == "repairing":
            return Kill("line", pattern="repairing", delay=rng.uniform(0, 0.6),
                        what="after 'repairing' was logged")
        n = sum(self.setup["chunks"].values())
        k = rng.randint(1, n)
        return Kill("files", count=marks, at_least=k, delay=rng.uniform(0, 0.03),
                    what=f"when {k} chunk marks exist")

    def kills(self) -> None:
        rng = self.rng("kill")
        base = self.dir / "kill"
        base.mkdir()
        for i in range(self.plan["kill"]):
            out = base / f"k{i}.zarr"
            double = rng.random() < 0.3
            # a third of the runs replace a finished store of other settings (--overwrite)
            over = ("--overwrite",) if rng.random() < 0.33 else ()
            if over:
                shutil.copytree(self.ref_b, out)
            runs = []
            for _ in range(2 if double else 1):
                kill = self.stage1_kill(rng, out)
                runs.append(run(self.extract(out, *over), kill=kill, keep_group=True))
                runs[-1]["leftovers_after_kill"] = leftovers(out)
            final = run(self.extract(out, *over))
            what = ("--overwrite of a crop-40 store: " if over else "") + " then ".join(
                f"kill {r['kill']['what']}" + (f" at {r['killed_at_s']}s" if r["kill_landed"]
                                                else " (the run had ended first)")
                for r in runs)
            trial = killed_then_rerun(what, runs, final, out,
                                      functools.partial(same_as, out, self.ref_a, self.snap_a))
            self.record("kill stage 1 (twice)" if double else "kill stage 1", trial)
            shutil.rmtree(out, ignore_errors=True)

    def kills_during_repair(self) -> None:
        rng = self.rng("kill-verify")
        base = self.dir / "kill-verify"
        base.mkdir()
        for i in range(self.plan["kill_verify"]):
            out = base / f"v{i}.zarr"
            shutil.copytree(self.ref_a, out)
            before = snapshot(out)
            specs = [tamper(out, rng, detectable=True) for _ in range(rng.randint(1, 3))]
            double = rng.random() < 0.3
            runs = []
            for _ in range(2 if double else 1):
                runs.append(run(self.extract(out, "--verify"),
                                kill=self.stage1_kill(rng, out, verify=True), keep_group=True))
            final = run(self.extract(out, "--verify"))
            what = "; ".join(s["what"] for s in specs) + " | " + " then ".join(
                f"kill {r['kill']['what']} at {r['killed_at_s']}s" for r in runs)
            trial = killed_then_rerun(what, runs, final, out,
                                      functools.partial(changed_since, before, out),
                                      tamperings=specs)
            self.record("kill --verify repair", trial)
            shutil.rmtree(out, ignore_errors=True)

    def kills_of_train_head(self) -> None:
        rng = self.rng("kill-head")
        base = self.dir / "kill-head"
        for i in range(self.plan["kill_head"]):
            folder = base / f"h{i}"
            folder.mkdir(parents=True)
            head = folder / "head.pt"
            previous = rng.random() < 0.5
            if previous:
                shutil.copyfile(self.head_ref_file, head)
            mode = rng.choice(["uniform", "tail", "tempfile"])
            if mode == "uniform":
                kill = Kill("time", at=rng.uniform(0.2, self.t_head), what="uniform over the run")
            elif mode == "tail":
                kill = Kill("time", at=rng.uniform(max(0.2, self.t_head - 1.2), self.t_head + 0.2),
                            what="in its last second")
            else:
                kill = Kill("files", count=lambda f=folder: len(temp_leftovers(f)), at_least=1,
                            delay=rng.uniform(0, 0.02), what="when a temp output file appeared")
            r = run(self.train(self.ref_a, head), kill=kill)
            after_kill = head_state(head)
            temp_after_kill = temp_leftovers(folder)
            final = run(self.train(self.ref_a, head))
            after = head_state(head)
            ok_state = (not after_kill["exists"] and not previous) or (
                after_kill.get("loadable") and after_kill.get("finite")
                and (after_kill.get("sig") == self.head_a or not self.deterministic))
            trial = {
                "what": f"kill {kill.what}" + (f" at {r['killed_at_s']}s" if r["kill_landed"]
                                               else " (the run had ended first)")
                        + (", over a previous head.pt" if previous else ""),
                "run": compact(r), "rerun": compact(final),
                "head_after_kill": {k: v for k, v in after_kill.items() if k != "sig"},
                "temp_files_after_kill": temp_after_kill,
                "temp_files_after_rerun": temp_leftovers(folder),
                "checks": {
                    "head_absent_or_complete": bool(ok_state),
                    "rerun_rc0": final["rc"] == 0 and not final["traceback"],
                    "rerun_head_loadable": bool(after.get("loadable")),
                    "no_temp_files_after_rerun": not temp_leftovers(folder),
                },
            }
            self.record("kill train_head", trial)

    # --- 2. tamperings ---------------------------------------------------------------------

    def tamperings(self) -> None:
        rng = self.rng("tamper")
        base = self.dir / "tamper"
        base.mkdir()
        for i in range(self.plan["tamper"]):
            store = base / f"t{i}.zarr"
            shutil.copytree(self.ref_a, store)
            before = snapshot(store)
            specs = [tamper(store, rng)]
            if rng.random() < 0.25:
                specs.append(tamper(store, rng, avoid={specs[0]["path"]}))
            self.tamper_trial(store, base / f"t{i}", before, specs)
            shutil.rmtree(store, ignore_errors=True)
        rng = self.rng("tamper-root")
        for i in range(self.plan["root_meta"]):
            store = base / f"r{i}.zarr"
            shutil.copytree(self.ref_a, store)
            before = snapshot(store)
            op = ["garbage", "delete", "truncate", "flip"][i % 4]
            specs = [apply_op(store, store / "zarr.json", "zarr.json", op, rng, None)]
            specs[0].update(split="(root)", array="(root metadata)")
            self.tamper_trial(store, base / f"r{i}", before, specs, category="tamper root")
            shutil.rmtree(store, ignore_errors=True)

    def tamper_trial(self, store: Path, folder: Path, before: dict, specs: list[dict],
                     category: str | None = None) -> None:
        head = folder / "head.pt"
        r1 = run(self.train(store, head))
        h1 = head_state(head)
        r2 = run(self.extract(store, "--verify"))
        if not store.exists():
            diffs = ["no store"]
        elif category == "tamper root":  # written again by the repairing run: its own record
            diffs = same_as(store, self.ref_a, self.snap_a)
        else:
            diffs = changed_since(before, store)
        head.unlink(missing_ok=True)
        r3 = run(self.train(store, head))
        h3 = head_state(head)
        swap = any(s["op"] == "swap" for s in specs)
        data_damaged = any(s["array"] in ROW_DATA and s["op"] != "swap" for s in specs)
        if r1["rc"] == 0:
            same_head = self.deterministic and h1.get("sig") == self.head_a
            stage2 = "exit 0, head identical to the clean store's" if same_head else \
                "exit 0, head DIFFERS from the clean store's"
        elif refused_one_line(r1):
            stage2 = "refused, one line"
            same_head = None
        else:
            stage2 = "other (traceback or several lines)"
            same_head = None
        checks = {
            "stage2_refused_or_unaffected": refused_one_line(r1) or (
                r1["rc"] == 0 and not r1["traceback"] and bool(same_head)),
            "stage2_never_trained_on_damaged_rows": not (r1["rc"] == 0 and data_damaged),
            "repair_rc0": r2["rc"] == 0 and not r2["traceback"],
            "repair_bit_identical": not diffs,
            "retrain_rc0": r3["rc"] == 0 and not r3["traceback"],
            "no_leftovers": not leftovers(store),
        }
        if self.deterministic and r3["rc"] == 0:
            checks["retrained_head_identical"] = h3.get("sig") == self.head_a
        trial = {
            "what": "; ".join(s["what"] for s in specs) + f" -> stage 2: {stage2}",
            "tamperings": specs, "stage2": stage2, "stage2_run": compact(r1),
            "repair_run": compact(r2), "retrain_run": compact(r3), "differences": diffs,
            "checks": checks,
        }
        if category is None:
            category = ("tamper: chunk swap (valid checksum)" if swap else
                        "tamper (2 at once)" if len(specs) > 1 else "tamper")
        self.record(category, trial)

    # --- 3. concurrent writers -------------------------------------------------------------

    def concurrent(self) -> None:
        rng = self.rng("concurrent")
        base = self.dir / "concurrent"
        base.mkdir()
        for i in range(self.plan["concurrent"]):
            out = base / f"c{i}.zarr"
            initial = rng.choice(["absent", "finished crop 32", "half-done crop 32",
                                  "finished crop 40"])
            if initial.startswith("finished"):
                shutil.copytree(self.ref_a if "32" in initial else self.ref_b, out)
            elif initial.startswith("half"):
                shutil.copytree(self.ref_a, out)
                for split, n in self.setup["chunks"].items():
                    for c in range(rng.randint(0, n - 1), n):
                        (out / split / "chunk_done" / "c" / str(c)).unlink()
            first = rng.choice([(CROP_A, ()), (CROP_A, ("--overwrite",)),
                                (CROP_B, ("--overwrite",)), (CROP_A, ("--verify",))])
            second = (rng.choice([CROP_A, CROP_B]), ("--overwrite",))
            if rng.random() < 0.5:
                first, second = second, first
            offset = rng.uniform(0, self.t_total)
            cmds = [self.extract(out, *first[1], crop=first[0]),
                    self.extract(out, *second[1], crop=second[0])]
            results: list = [None, None]

            def go(k, cmds=cmds, results=results, offset=offset):
                if k == 1:
                    time.sleep(offset)
                results[k] = run(cmds[k])

            threads = [threading.Thread(target=go, args=(k,)) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            attrs = root_attrs(out) if out.exists() else None
            crop = attrs["fingerprint"]["components"]["preprocessing"]["crop"] if attrs else None
            if crop is None:
                diffs = ["no store at the end"]
            else:
                ref, snap = (self.ref_a, self.snap_a) if crop == CROP_A else \
                    (self.ref_b, self.snap_b)
                diffs = same_as(out, ref, snap)
            trial = {
                "what": f"from {initial}: [{show(first[1]) or '-'} crop {first[0]}] and, "
                        f"{offset:.2f}s later, [{show(second[1])} crop {second[0]}] -> rc "
                        f"{[r['rc'] for r in results]}, store crop {crop}",
                "initial": initial, "offset_s": round(offset, 3),
                "runs": [compact(r) for r in results], "final_crop": crop, "differences": diffs,
                "checks": {
                    "no_traceback": not any(r["traceback"] for r in results),
                    "each_rc0_or_one_line": all(one_line_or_ok(r) for r in results),
                    "at_least_one_rc0": any(r["rc"] == 0 for r in results),
                    "store_equals_fresh_store_of_its_settings": not diffs,
                    "all_chunks_done": all_done(out),
                    "no_leftovers": not leftovers(out),
                },
            }
            self.record("concurrent writers", trial)
            shutil.rmtree(out, ignore_errors=True)
        for i in range(self.plan["head_vs_writer"]):
            out = base / f"w{i}.zarr"
            shutil.copytree(self.ref_a, out)
            head = base / f"w{i}" / "head.pt"
            offset = rng.uniform(-1.5, 1.5)
            cmds = [self.train(out, head), self.extract(out, "--overwrite", crop=CROP_B)]
            results = [None, None]

            def go(k, cmds=cmds, results=results, offset=offset):
                if (k == 1) == (offset > 0):
                    time.sleep(abs(offset))
                results[k] = run(cmds[k])

            threads = [threading.Thread(target=go, args=(k,)) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            th, ex = results
            h = head_state(head)
            which = ("crop 32 store" if h.get("sig") == self.head_a else
                     "crop 40 store" if h.get("sig") == self.head_b else
                     "neither" if h.get("exists") else "no head")
            trial = {
                "what": f"train_head and an --overwrite writer (crop 40) {offset:+.2f}s apart "
                        f"-> train_head rc {th['rc']} (head of the {which}), writer rc "
                        f"{ex['rc']}",
                "runs": [compact(r) for r in results], "head": which,
                "checks": {
                    "no_traceback": not th["traceback"] and not ex["traceback"],
                    "train_head_rc0_or_one_line": one_line_or_ok(th),
                    "writer_rc0": ex["rc"] == 0,
                    "head_is_one_stores_head": th["rc"] != 0 or which in ("crop 32 store",
                                                                        "crop 40 store"),
                    "store_is_crop40_store": not same_as(out, self.ref_b, self.snap_b),
                },
            }
            self.record("train_head vs writer", trial)
            shutil.rmtree(out, ignore_errors=True)

    # --- 4. hostile inputs -----------------------------------------------------------------

    def bad_inputs(self) -> None:
        from tests.conftest import make_tree

        base = self.dir / "bad"
        base.mkdir()
        wanted = self.plan["bad"]
        for name, build in BAD_CASES:
            if wanted != "all" and name not in wanted:
                continue
            folder = base / f"case{len(list(base.iterdir()))}"
            folder.mkdir()
            data = make_tree(folder / "data", self.photos, per_class=(3, 2), seed=self.seed)
            spec = build(self, folder, data)
            cmds = spec.get("commands") or [self.extract(spec.get("out", folder / "f.zarr"),
                                                         *spec.get("extra", ()), data=data)]
            runs = [run(c, timeout=spec.get("timeout", 120.0)) for c in cmds]
            checks = {"rc0_or_one_line_no_traceback": all(one_line_or_ok(r) for r in runs)}
            store = spec.get("out", folder / "f.zarr")
            trial = {"what": name, "runs": [compact(r) for r in runs],
                     "note": spec.get("note", "")}
            for path, content in spec.get("preserve", {}).items():
                checks["user_file_kept"] = path.is_file() and path.read_bytes() == content
            if spec.get("expect_rc") is not None:
                checks["expected_rc"] = all(r["rc"] == spec["expect_rc"] for r in runs)
            if runs[-1]["rc"] == 0 and not spec.get("commands") and store.is_dir():
                names = stored_names_resolve(store, data)
                trial["names"] = names
                checks["stored_names_round_trip"] = not names["unresolved"]
                r = run(self.train(store, folder / "head.pt"))
                trial["train_head"] = compact(r)
                checks["train_head_rc0_or_one_line"] = one_line_or_ok(r)
            trial["checks"] = checks
            trial["what"] = (f"{name} -> rc {[r['rc'] for r in runs]}"
                             f"{' TIMEOUT' if any(r['timed_out'] for r in runs) else ''}"
                             f"{' MEMORY' if any(r['mem_killed'] for r in runs) else ''}")
            self.record("bad inputs", trial)
            _restore_modes(folder)


def stored_names_resolve(store: Path, data: Path) -> dict:
    """Every name in the store's `files` names a file under its split (or its row is
    quarantined with a reason)."""
    import zarr

    from pipeline.data import file_name
    g = zarr.open_group(str(store), mode="r")
    unresolved, count, quarantined = [], 0, 0
    for split in g.attrs["splits"]:
        files, ok = g[split]["files"][:], g[split]["ok"][:]
        for f, good in zip(files, ok, strict=True):
            count += 1
            quarantined += int(not good)
            if not os.path.lexists(data / split / file_name(str(f))) and good:
                unresolved.append(repr(str(f)))
    return {"rows": count, "quarantined": quarantined, "unresolved": unresolved[:5]}


def _restore_modes(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                try:
                    os.chmod(p, 0o755)
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# tampering


def _targets(store: Path, split: str, array: str) -> list[Path]:
    base = store / split / array / "c"
    return sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []


def tamper(store: Path, rng: random.Random, *, detectable: bool = False,
           avoid: set | None = None) -> dict:
    """Damage one thing of the store at random; returns what was done. `detectable`: only
    damage a checksum or a listing can see (for the kill-during-repair trials)."""
    avoid = avoid or set()
    for _ in range(50):
        split = rng.choice(["train", "val"])
        if detectable:
            target = rng.choice(["features", "labels", "ok", "files", "split folder"])
            op = "delete" if target == "split folder" else rng.choice(["delete", "flip",
                                                                      "truncate", "zeros"])
        else:
            target = rng.choices(
                [*ARRAYS, "array zarr.json", "split zarr.json", "split folder"],
                weights=[3, 2, 1, 1, 2, 1, 1, 1.5, 1, 0.4])[0]
            if target == "split folder":
                op = "delete"
            elif target.endswith("zarr.json"):
                op = rng.choice(["delete", "truncate", "flip", "zeros", "garbage"])
            else:
                op = rng.choices(["delete", "truncate", "flip", "zeros", "swap"],
                                 weights=[1, 1, 1, 1, 1.2])[0]
        if target == "split folder":
            path, array = store / split, "(split folder)"
            if str(path) in avoid or any(a.startswith(str(path)) for a in avoid):
                continue
            shutil.rmtree(path)
            return {"what": f"{split} folder deleted", "split": split, "array": array,
                    "op": "delete", "path": str(path), "changed": True}
        if target == "split zarr.json":
            path, array = store / split / "zarr.json", "(split metadata)"
        elif target == "array zarr.json":
            array = rng.choice(ARRAYS)
            path = store / split / array / "zarr.json"
            array = f"{array} (array metadata)"
        else:
            array = target
            files = _targets(store, split, array)
            if not files:
                continue
            path = rng.choice(files)
        if str(path) in avoid or not path.exists() or \
                any(str(path).startswith(a) for a in avoid):
            continue
        spec = apply_op(store, path, array, op, rng, split)
        if spec is not None:
            return spec
    raise RuntimeError("no tampering found")


def apply_op(store: Path, path: Path, array: str, op: str, rng: random.Random,
             split: str | None) -> dict | None:
    """Apply one operation to one file; None when it would leave the bytes as they are."""
    data = path.read_bytes()
    rel = str(path.relative_to(store))
    detail = {}
    if op == "delete":
        path.unlink()
        new = None
    elif op == "truncate":
        n = rng.randint(0, max(0, len(data) - 1))
        new, detail = data[:n], {"length": n, "was": len(data)}
    elif op == "flip":
        i, bit = rng.randrange(len(data)), rng.randrange(8)
        b = bytearray(data)
        b[i] ^= 1 << bit
        new, detail = bytes(b), {"byte": i, "bit": bit, "of": len(data)}
    elif op == "zeros":
        new = bytes(len(data))
    elif op == "garbage":
        new = rng.choice([b"{not json", b"\x00\xff\xfe garbage", b"[]", b"{}",
                          bytes(rng.randrange(256) for _ in range(64))])
        detail = {"written": new.decode("latin-1")}
    elif op == "swap":
        peers = [p for p in _targets(store, rel.split("/")[0], rel.split("/")[1])
                 if p != path and p.read_bytes() != data]
        if not peers:
            return None
        src = rng.choice(peers)
        new, detail = src.read_bytes(), {"from": str(src.relative_to(store))}
    else:  # pragma: no cover
        raise ValueError(op)
    if new is not None:
        if new == data:
            return None
        path.write_bytes(new)
    where = rel if split is None else rel
    return {"what": f"{where}: {op}" + (f" {detail}" if detail and op != "garbage" else ""),
            "split": split, "array": array, "op": op, "path": str(path), "detail": detail,
            "changed": True}


# ---------------------------------------------------------------------------------------------
# hostile inputs: each builds its case in `folder` (a fresh tree in `data`) and says what to run


def _first_jpeg(data: Path, split="train", cls="n01") -> Path:
    return sorted((data / split / cls).iterdir())[0]


def _copy_as(data: Path, name: bytes, split="train", cls="n01") -> None:
    src = _first_jpeg(data, split, cls)
    dst = os.path.join(os.fsencode(data / split / cls), name)
    with open(dst, "wb") as f:
        f.write(src.read_bytes())


def _case_newline(c, folder, data):
    _copy_as(data, b"img\nwith newline.JPEG")
    _copy_as(data, b"tab\there.JPEG", cls="n02")
    return {}


def _case_bad_utf8_class(c, folder, data):
    for split in ("train", "val"):
        os.rename(data / split / "n02", os.path.join(os.fsencode(data / split), b"n\xff02"))
    return {"note": "class folder named with byte 0xff (not UTF-8), in both splits"}


def _case_surrogate_bytes(c, folder, data):
    _copy_as(data, b"img\xed\xa0\x80\xc0\xaf.JPEG")  # an encoded surrogate and an overlong '/'
    return {}


def _case_long_name(c, folder, data):
    _copy_as(data, ("é" * 125 + ".JPEG").encode())  # 255 bytes
    return {}


def _case_empty_class(c, folder, data):
    (data / "train" / "n04").mkdir()
    (data / "val" / "n04").mkdir()
    return {"note": "a 4th class folder with no images (the head has 3 outputs)"}


def _case_val_class_emptied(c, folder, data):
    for p in (data / "val" / "n03").iterdir():
        p.unlink()
    return {}


def _case_unreadable_file(c, folder, data):
    os.chmod(_first_jpeg(data), 0)
    return {"note": "running as root: the file stays readable" if os.geteuid() == 0 else ""}


def _case_unreadable_folder(c, folder, data):
    os.chmod(data / "val" / "n02", 0)
    return {"note": "running as root: the folder stays readable" if os.geteuid() == 0 else ""}


def _case_symlink_loop(c, folder, data):
    os.symlink(".", data / "train" / "n01" / "loop")
    return {"note": "train/n01/loop -> . (os.walk(followlinks=True) follows it until ELOOP)"}


def _case_two_loops(c, folder, data):
    os.symlink(".", data / "train" / "n01" / "a")
    os.symlink(".", data / "train" / "n01" / "b")
    return {"timeout": 60.0, "note": "train/n01/{a,b} -> . : 2^depth paths"}


def _case_self_link(c, folder, data):
    os.symlink("self.JPEG", data / "train" / "n01" / "self.JPEG")
    os.symlink("../n02", data / "train" / "n01" / "up")  # a link to a sibling class folder
    return {}


def _case_dir_like_image(c, folder, data):
    d = data / "train" / "n01" / "x.jpg"
    d.mkdir()
    shutil.copyfile(_first_jpeg(data, cls="n02"), d / "inner.JPEG")
    (data / "train" / "n02" / "y.JPEG").mkdir()
    return {}


def _case_fifo(c, folder, data):
    os.mkfifo(data / "train" / "n01" / "pipe.JPEG")
    return {}


def _case_dev_zero(c, folder, data):
    os.symlink("/dev/zero", data / "train" / "n01" / "zero.JPEG")
    os.symlink("/proc/self/mem", data / "val" / "n01" / "mem.JPEG")
    return {}


def _case_class_symlink(c, folder, data):
    os.symlink("n01", data / "train" / "n04")
    os.symlink("n01", data / "val" / "n04")
    return {}


def _case_store_is_file(c, folder, data):
    out = folder / "f.zarr"
    out.write_bytes(b"precious user data")
    return {"out": out, "expect_rc": 2, "preserve": {out: b"precious user data"},
            "commands": [c.extract(out, data=data), c.extract(out, "--overwrite", data=data)]}


def _case_out_parent_file(c, folder, data):
    (folder / "afile").write_bytes(b"x")
    return {"out": folder / "afile" / "f.zarr", "expect_rc": 2}


def _case_split_is_file(c, folder, data):
    shutil.rmtree(data / "val")
    (data / "val").write_bytes(b"not a folder")
    return {}


def _case_class_order_not_utf8(c, folder, data):
    order = folder / "order.txt"
    order.write_bytes(b"n01\nn0\xff2\nn03\n")
    return {"extra": ("--class-order", order), "expect_rc": 2}


def _case_class_order_binary(c, folder, data):
    order = folder / "order.bin"
    order.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(300)))
    return {"extra": ("--class-order", order), "expect_rc": 2}


def _case_data_root_file(c, folder, data):
    (folder / "root.txt").write_bytes(b"x")
    return {"commands": [c.extract(folder / "f.zarr", data=folder / "root.txt")],
            "expect_rc": 2}


def _case_head_out_dir(c, folder, data):
    (folder / "h.pt").mkdir()
    return {"commands": [c.train(c.ref_a, folder / "h.pt")], "expect_rc": 2}


def _case_head_out_parent_file(c, folder, data):
    (folder / "afile").write_bytes(b"x")
    return {"commands": [c.train(c.ref_a, folder / "afile" / "head.pt")], "expect_rc": 2}


def _case_features_is_file(c, folder, data):
    (folder / "f.zarr").write_bytes(b"x")
    return {"commands": [c.train(folder / "f.zarr", folder / "head.pt")], "expect_rc": 2}


def _case_features_empty_dir(c, folder, data):
    (folder / "f.zarr").mkdir()
    (folder / "f.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", '
                                                 '"attributes": {"format": '
                                                 '"quickfix-labels/features"}}')
    return {"commands": [c.train(folder / "f.zarr", folder / "head.pt")], "expect_rc": 2,
            "note": "a group marked as a feature store with nothing else"}


BAD_CASES = [
    ("newline in a JPEG name", _case_newline),
    ("class folder name not UTF-8", _case_bad_utf8_class),
    ("JPEG name with an encoded surrogate and an overlong sequence", _case_surrogate_bytes),
    ("255-byte multibyte JPEG name", _case_long_name),
    ("zero-length class folder", _case_empty_class),
    ("a class folder emptied in val", _case_val_class_emptied),
    ("unreadable file (chmod 000)", _case_unreadable_file),
    ("unreadable class folder (chmod 000)", _case_unreadable_folder),
    ("symlink loop in the tree", _case_symlink_loop),
    ("two symlink loops in one folder", _case_two_loops),
    ("self-referencing symlink named .JPEG, link to a sibling class", _case_self_link),
    ("directories named like images", _case_dir_like_image),
    ("FIFO named like an image", _case_fifo),
    ("/dev/zero and /proc/self/mem linked as images", _case_dev_zero),
    ("class folder that is a symlink to another class", _case_class_symlink),
    ("split folder that is a regular file", _case_split_is_file),
    ("store path is a file", _case_store_is_file),
    ("--out whose parent is a file", _case_out_parent_file),
    ("class-order file that is not UTF-8", _case_class_order_not_utf8),
    ("class-order file of random bytes", _case_class_order_binary),
    ("--data-root is a file", _case_data_root_file),
    ("train_head --out is a directory", _case_head_out_dir),
    ("train_head --out whose parent is a file", _case_head_out_parent_file),
    ("train_head --features is a file", _case_features_is_file),
    ("train_head on a store marked as one but empty", _case_features_empty_dir),
]


# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    from pipeline.provenance import package_versions

    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    versions = package_versions()
    return {"nproc": sh("nproc"), "uname": sh("uname", "-a"), "python": platform.python_version(),
            "torch": versions.get("torch"), "zarr": versions.get("zarr"),
            "dali": versions.get("nvidia-dali-cuda130"), "numpy": versions.get("numpy"),
            "git_commit": sh("git", "rev-parse", "HEAD"),
            "git_dirty_files": (sh("git", "status", "--porcelain") or "").splitlines(),
            "euid": os.geteuid()}


def table(trials: list[dict]) -> list[dict]:
    rows: dict[str, dict] = {}
    for t in trials:
        row = rows.setdefault(t["category"], {"category": t["category"], "trials": 0, "held": 0,
                                              "failed": 0})
        row["trials"] += 1
        row["held" if t["held"] else "failed"] += 1
    return list(rows.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few trials of each kind")
    parser.add_argument("--json", type=Path, help="results file (default: bench/results/"
                        "campaign-cpu-DATE.json; with --quick, OUT/campaign-quick.json)")
    args = parser.parse_args(argv)
    plan = PLAN["quick" if args.quick else "full"]
    today = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
    out_json = args.json or (args.out / "campaign-quick.json" if args.quick else
                             ROOT / "bench" / "results" / f"campaign-cpu-{today}.json")
    started = time.monotonic()
    camp = Campaign(args.out.resolve(), args.seed, plan)
    camp.build()
    result = {"command": show([PY, "-m", "bench.campaign", *(argv or sys.argv[1:])]),
              "seed": args.seed, "quick": args.quick, "plan": plan,
              "started_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
              "machine": machine(), "setup": camp.setup}

    def save():
        result.update(trials=camp.trials, table=table(camp.trials),
                      wall_s=round(time.monotonic() - started, 1))
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1, default=str))

    for step in (camp.kills, camp.kills_during_repair, camp.kills_of_train_head, camp.tamperings,
                 camp.concurrent, camp.bad_inputs):
        print(f"{step.__name__} ...", flush=True)
        step()
        save()
    rows = table(camp.trials)
    width = max(len(r["category"]) for r in rows)
    print(f"\n{'category':<{width}}  trials  held  failed")
    for r in rows:
        print(f"{r['category']:<{width}}  {r['trials']:>6}  {r['held']:>4}  {r['failed']:>6}")
    total = {k: sum(r[k] for r in rows) for k in ("trials", "held", "failed")}
    print(f"{'total':<{width}}  {total['trials']:>6}  {total['held']:>4}  {total['failed']:>6}")
    print(f"\n{time.monotonic() - started:.0f} s; details: {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
