"""Run outputs a person reads: per-epoch JSON lines, a PNG of the curves, the backbone's verdict."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from .files import atomic_write

log = logging.getLogger("quickfix")


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    text = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def plot_curves(path: Path, records: Sequence[dict], chosen: tuple[float, float] | None) -> None:
    """One line per grid point: train loss, and top-1 on each evaluated split, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({(r["lr"], r["weight_decay"]) for r in records})
    metrics = ["train_loss"] + sorted(k for k in records[0] if k.endswith("_top1"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for lr, wd in points:
            rows = [r for r in records if (r["lr"], r["weight_decay"]) == (lr, wd)]
            style = {"linewidth": 2.5} if (lr, wd) == chosen else {"linewidth": 1, "alpha": 0.7}
            ax.plot([r["epoch"] for r in rows], [r[metric] for r in rows], marker="o",
                    label=f"lr={lr:g} wd={wd:g}" + (" (chosen)" if (lr, wd) == chosen else ""),
                    **style)
        ax.set_xlabel("epoch")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def warn_backbone(diagnosis: dict | None, stage: str) -> None:
    """The loud warning for a backbone not worth fixing (stage 2, and stage 3 again)."""
    verdict = (diagnosis or {}).get("backbone")
    if verdict in ("weak", "untrained"):
        log.warning("%s: WARNING: the backbone is %s: %s", stage, verdict.upper(),
                    diagnosis.get("backbone_message"))
    elif verdict == "unknown":
        log.info("%s: the backbone was not judged: %s", stage, diagnosis.get("backbone_message"))
