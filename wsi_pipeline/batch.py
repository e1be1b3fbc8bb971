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


def results_csv(results: list[Any], *, exclude: tuple[str, ...] = (), previous: str = "") -> str:
    """A batch summary: one CSV row per result dataclass, its fields as columns.

    Rows of ``previous`` (an earlier summary's text) for slides not in ``results`` are kept, so
    the summary of an output folder accumulates over runs.
    """
    rows = [{k: v for k, v in dataclasses.asdict(r).items() if k not in exclude} for r in results]
    names = {row["slide"] for row in rows}
    kept = [row for row in csv.DictReader(io.StringIO(previous)) if row.get("slide") not in names]
    columns = list(dict.fromkeys(k for row in [*kept, *rows] for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows([*kept, *rows])
    return text.getvalue()


def write_results_csv(results: list[Any], path: str, *, exclude: tuple[str, ...] = ()) -> None:
    """Write :func:`results_csv` atomically to a local path or URL, keeping earlier rows."""
    previous = storage.read_bytes(path).decode() if storage.exists(path) else ""
    text = results_csv(results, exclude=exclude, previous=previous)
    storage.write_bytes_atomic(path, text.encode())
