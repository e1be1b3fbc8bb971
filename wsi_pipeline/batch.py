"""What every batch job shares: the statuses of a slide, its one-line reason, the summary CSV.

A batch never stops for one bad slide: each slide ends as one :class:`SlideResult` (a row of
``summary.csv``) whose ``status`` is a :class:`Status` and whose ``reason`` is one line. Each job
extends it with its own figures.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from wsi_pipeline import storage


class Status(StrEnum):
    """How a slide ended in a batch."""

    COMPLETE = "complete"
    SKIPPED = "skipped"
    FAILED = "failed"


COMPLETE, SKIPPED, FAILED = Status.COMPLETE, Status.SKIPPED, Status.FAILED


@dataclass
class SlideResult:
    """One slide's outcome in a batch: the slide, how it ended and, unless complete, why."""

    slide: str
    status: Status
    reason: str = ""


def error_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type if it has none), for summaries."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def results_csv(results: list[Any], *, exclude: tuple[str, ...] = ()) -> str:
    """A batch summary: one CSV row per result dataclass, its fields as columns."""
    rows = [{k: v for k, v in dataclasses.asdict(r).items() if k not in exclude} for r in results]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_results_csv(results: list[Any], path: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Write :func:`results_csv` atomically to a local path or URL."""
    storage.write_bytes_atomic(path, results_csv(results, exclude=exclude).encode())
