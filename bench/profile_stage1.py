#!/usr/bin/env python3
"""Where stage 1's time goes: the input path taken apart, one layer at a time, in one process.

    python bench/profile_stage1.py --data /tmp/quickfix-bench/data-2500   # made by bench/suite.py

On the same train files, alternating rounds, each layer adds one part of stage 1:
  1. decode: our DALI graph (decode, resize the crop region, normalise) on bytes already in
     RAM, pipelined, fed from the main thread: decoding and nothing else
  2. reader: + DALI's worker processes reading, checking and measuring the files, and the
     zero-copy hand-over of each batch to torch (readers.DaliReader)
  3. stage 1: + the model (bench/models.py:pool, next to nothing), the writer thread, the store,
     and everything run_extract does around them
and, beside them, the reference pipeline of bench/reference.py. Prints img/s (median of the
rounds), the time each layer adds per image, and the CPU time per image of the main process and
of its worker processes, with stage 1's own account (waiting for batches, forward, writer).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reference import reference_rate  # noqa: E402
from pipeline import data as D  # noqa: E402
from pipeline import imagefile as F  # noqa: E402
from pipeline import readers as R  # noqa: E402
from pipeline.cli import setup_logging  # noqa: E402
from pipeline.extract import run_extract  # noqa: E402
from pipeline.models import Preprocess  # noqa: E402
from pipeline.settings import ExtractSettings  # noqa: E402

PRE = Preprocess(256, 224)


def cpu_seconds() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # counted once a worker has exited
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def decode_only(split: D.Split, batch: int, threads: int) -> float:
    from nvidia.dali import fn, pipeline_def, types

    prepared = [F.prepare(split.root / f, PRE.resize, PRE.crop) for f in split.files]
    batches = [prepared[i:i + batch] for i in range(0, len(prepared), batch)]

    def source(k):
        if k >= len(batches):
            raise StopIteration
        return [p[0] for p in batches[k]], [p[1] for p in batches[k]]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    def pipe():
        encoded, roi = fn.external_source(source, num_outputs=2, batch=True,
                                          dtype=[types.UINT8, types.FLOAT])
        return R._graph(encoded, roi, PRE, device="cpu", layout="CHW", half=False,
                        hw_decoder_load=0.65)

    t0 = time.perf_counter()
    p = pipe()
    p.build()
    for _ in batches:
        p.run()
    seconds = time.perf_counter() - t0
    del p
    return len(split.files) / seconds


def reader_only(split: D.Split, batch: int, threads: int, chunk_rows: int) -> float:
    n = len(split.files)
    plan = R.plan_batches([(0, c, n) for c in range(-(-n // chunk_rows))], chunk_rows, batch)
    t0 = time.perf_counter()
    reader = R.DaliReader([split.root], [split.files], plan, PRE, device="cpu", batch_size=batch,
                          num_threads=threads, workers=1)
    try:
        reader.start()
        for b in reader:
            b.images.sum()  # touch the data, as a model would
    finally:
        reader.close()
    return n / (time.perf_counter() - t0)


def stage1(data: Path, ckpt: Path, store: Path, batch: int, threads: int, chunk_rows: int,
           profile: dict) -> float:
    shutil.rmtree(store, ignore_errors=True)
    s = run_extract(ExtractSettings(
        checkpoint=ckpt, data_root=data, out=store, splits=["train"], resize=PRE.resize,
        crop=PRE.crop, batch_size=batch, device="cpu", decoder="dali", num_threads=threads,
        chunk_rows=chunk_rows))
    profile.update(s.profile, seconds=s.seconds)
    return s.images / s.seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("/tmp/quickfix-bench/data-2500"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--chunk-rows", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quickfix-profile"))
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.data / "train"
    split = D.scan_split("train", root, D.class_folders(root))
    n = len(split.files)
    from bench.models import pool

    ckpt = args.work / "pool.pth"
    torch.save({"state_dict": pool(10).state_dict(), "arch": "bench.models:pool"}, ckpt)
    store = args.work / "profile.zarr"
    files = [root / f for f in split.files]
    b, t, c = args.batch_size, args.threads, args.chunk_rows
    layers = {
        "reference (bench/reference.py)": lambda p: reference_rate(files, gpu=False, batch=b,
                                                                   threads=t, prefetch=2),
        "1. decode (our DALI graph, bytes in RAM)": lambda p: decode_only(split, b, t),
        "2. reader (+ workers read/check, hand-over)": lambda p: reader_only(split, b, t, c),
        "3. stage 1 (+ pool model, writer, store)": lambda p: stage1(args.data, ckpt, store, b,
                                                                    t, c, p),
    }
    for fn in layers.values():  # warm up: imports, page cache
        fn({})
    rates = {k: [] for k in layers}
    cpu = {k: [] for k in layers}
    prof: dict = {}
    for _ in range(args.rounds):
        for name, fn in layers.items():
            own0, kids0 = cpu_seconds()
            rates[name].append(fn(prof))
            own1, kids1 = cpu_seconds()
            cpu[name].append(((own1 - own0) / n * 1e6, (kids1 - kids0) / n * 1e6))
    print(f"\n# {n} train images, batch {b}, {t} threads, {args.rounds} rounds; "
          f"{os.cpu_count()} cores")
    print("| layer | img/s (median) | ms/image | adds ms/image | CPU us/image: main process "
          "+ worker processes |")
    print("|---|---:|---:|---:|---:|")
    prev = None
    for name in layers:
        rate = statistics.median(rates[name])
        ms = 1000 / rate
        own = statistics.median(x[0] for x in cpu[name])
        kids = statistics.median(x[1] for x in cpu[name])
        adds = "" if prev is None or name.startswith("1.") else f"{ms - prev:+.2f}"
        print(f"| {name} | {rate:.0f} | {ms:.2f} | {adds} | {own:.0f} + {kids:.0f} |")
        prev = ms if not name.startswith("reference") else None
    print(f"\nstage 1's own account of its last run ({prof['seconds']:.2f} s): waiting for "
          f"decoded batches {prof['wait_for_batches_s']:.2f} s, forward {prof['forward_s']:.2f} "
          f"s, writer thread busy {prof['writer_busy_s']:.2f} s (overlapped with the rest)")
    print("stage 1 / reference, per round: " + ", ".join(
        f"{s / r:.2f}" for r, s in zip(rates["reference (bench/reference.py)"],
                                       rates["3. stage 1 (+ pool model, writer, store)"],
                                       strict=True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
