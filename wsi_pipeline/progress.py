"""Progress of long work: a bar (with rate and ETA) on a terminal, plain log lines otherwise.

Log lines come every tenth of the work (and at the end), so logs of batch runs stay short.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

logger = logging.getLogger(__name__)
T = TypeVar("T")
STEPS = 10


class Progress:
    """Count ``total`` units of work under a description."""

    def __init__(self, total: int, desc: str, *, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.start = time.perf_counter()
        self._next = 1
        self.bar = tqdm(total=total, desc=desc, unit=unit) if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done * STEPS >= self._next * self.total:
            self._next = self.done * STEPS // self.total + 1
            logger.info("%s", self.line())

    def line(self) -> str:
        """``desc: done/total unit (p %), rate unit/s, ETA s``."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / seconds
        eta = (self.total - self.done) / rate if rate else float("nan")
        percent = 100 * self.done / max(self.total, 1)
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f} %), "
            f"{rate:.2f} {self.unit}/s, ETA {eta:.0f} s"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Sequence[T], desc: str, *, unit: str) -> Iterator[T]:
    """Iterate over ``items`` while showing progress."""
    bar = Progress(len(items), desc, unit=unit)
    for item in items:
        yield item
        bar.update()
    bar.close()
