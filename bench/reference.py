"""The reference input pipeline stage 1 is measured against: DALI as its documentation
recommends for throughput, independent of this project's code.

DALI's own file reader over an explicit file list, its image decoder (`cpu`, or `mixed`:
nvJPEG plus the hardware JPEG decoder, with `hw_decoder_load` and the preallocation hints of
DALI's ResNet-50 ImageNet example), `resize_shorter` and a fused crop + normalise, pipelined and
asynchronous with a prefetch queue. It decodes, resizes, crops and normalises exactly as much as
stage 1 does, and nothing else: no checks of the files, no model, no store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def reference_rate(files: Sequence[Path], *, gpu: bool, batch: int, threads: int, prefetch: int,
                   resize: int = 256, crop: int = 224, hw_decoder_load: float = 0.65,
                   device_id: int = 0) -> float:
    """Images per second over `files`, from building the pipeline to the last batch's output."""
    from nvidia.dali import fn, pipeline_def, types

    paths = [str(f) for f in files]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=device_id if gpu else None,
                  prefetch_queue_depth=prefetch, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(files=paths, labels=list(range(len(paths))),
                                        random_shuffle=False, name="reader")
        if gpu:
            images = fn.decoders.image(
                jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                device_memory_padding=211025920, host_memory_padding=140544512,
                preallocate_width_hint=5980, preallocate_height_hint=6430)
        else:
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=resize, antialias=True)
        images = fn.crop_mirror_normalize(
            images, crop=(crop, crop), mean=MEAN, std=STD, output_layout="CHW",
            dtype=types.FLOAT16 if gpu else types.FLOAT)
        return images, labels

    start = time.perf_counter()
    p = pipe()
    p.build()
    for _ in range(-(-len(paths) // batch)):
        outputs = p.run()
    if gpu:
        import torch

        outputs[0].as_cpu()  # waits for the last batch
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del p
    return len(paths) / seconds


def tune(files: Sequence[Path], *, gpu: bool, batch: int, cores: int) -> dict:
    """The fastest of a few settings (threads, prefetch depth, hardware decoder share)."""
    grid = [dict(threads=t, prefetch=q) for t in sorted({cores, cores + cores // 2 or 1})
            for q in (2, 3)]
    if gpu:
        grid = [dict(g, hw_decoder_load=h) for g in grid for h in (0.65, 0.9)]
    rates = [(reference_rate(files, gpu=gpu, batch=batch, **g), g) for g in grid]
    best_rate, best = max(rates, key=lambda r: r[0])
    return {"settings": best, "tuning": [{"img_s": r, **g} for r, g in rates]}
