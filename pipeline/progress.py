"""Progress of long loops: a tqdm bar on a terminal, periodic log lines everywhere else.

A SLURM or nohup log is not a terminal, and tqdm disables itself there; a whole ImageNet run would
then be silent. Off a terminal we log a line every `interval` seconds instead:

    extract: 12,800/1,281,167 images (1.0%), 2,345 img/s, ETA 9m05s
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("quickfix")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """`show=False` counts without showing anything (a torchrun rank other than 0)."""

    def __init__(self, total: int, desc: str, *, unit: str = "images", interval: float = 30.0,
                 terminal: bool | None = None, show: bool = True):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = 0
        self.show = show
        self.start = self._last = time.perf_counter()
        if terminal is None:
            terminal = sys.stderr.isatty()
        self.bar = (tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, smoothing=0.1,
                         file=sys.stderr) if terminal and show else None)

    def update(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        """The count so far (a whole torchrun job's, read from its shared counter)."""
        step, self.done = done - self.done, done
        if self.bar is not None:
            self.bar.update(step)
            return
        if not self.show:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval:
            self._last = now
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%), "
                f"{rate:,.0f} img/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
