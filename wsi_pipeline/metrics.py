"""Segmentation scores of instance label images: pixel Dice/IoU, AJI, PQ and detection F1.

Every instance score comes from one sparse contingency table, the pixel count of each overlapping
(true, predicted) pair, so a 1000x1000 MoNuSeg image with ~700 nuclei scores in well under a second.

Conventions: labels are non-negative integers, 0 = background, and need not be consecutive. A
ratio whose denominator is zero because both images are empty is 1.0 (nothing to find, nothing
found); when only one side is empty the scores are 0.0.

- ``dice``, ``iou``: foreground versus background, ignoring instance identity.
- ``aji``: Aggregated Jaccard Index as defined by Kumar et al. 2017 (IEEE TMI): each true nucleus
  takes the prediction of highest IoU with it (a prediction may be taken more than once); the
  intersections and unions of these pairs are summed, and the areas of predictions never taken are
  added to the union. A true nucleus overlapping no prediction adds its area to the union.
- ``pq`` = ``dq`` x ``sq`` (Kirillov et al. 2019): pairs with IoU > 0.5 are matches (necessarily
  unique); ``sq`` is their mean IoU, ``dq`` = TP / (TP + FP/2 + FN/2).
- ``f1``, ``precision``, ``recall``: detection at the same IoU > 0.5 matching; ``f1`` equals ``dq``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon

MATCH_IOU = 0.5
COUNT_KEYS = ("tp", "fp", "fn", "n_true", "n_pred")


@dataclass(frozen=True)
class Contingency:
    """Overlaps between two label images with consecutive labels 1..n (index 0 is label 1).

    Attributes:
        true_area: pixel count of each true instance.
        pred_area: pixel count of each predicted instance.
        true_idx: true index of each overlapping pair.
        pred_idx: predicted index of each overlapping pair.
        intersection: pixel count of each overlapping pair.
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    true_idx: np.ndarray
    pred_idx: np.ndarray
    intersection: np.ndarray

    @property
    def union(self) -> np.ndarray:
        """Union of each overlapping pair."""
        return self.true_area[self.true_idx] + self.pred_area[self.pred_idx] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair."""
        return self.intersection / self.union


def contingency(true_labels: np.ndarray, pred_labels: np.ndarray) -> Contingency:
    """Sparse table of the overlaps between two instance label images of the same shape."""
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"shapes differ: {true_labels.shape} vs {pred_labels.shape}")
    true, n_true = _consecutive(true_labels.ravel())
    pred, n_pred = _consecutive(pred_labels.ravel())
    both = (true > 0) & (pred > 0)
    keys = true[both].astype(np.int64) * (n_pred + 1) + pred[both]
    pair_keys, intersection = np.unique(keys, return_counts=True)
    return Contingency(
        true_area=np.bincount(true, minlength=n_true + 1)[1:],
        pred_area=np.bincount(pred, minlength=n_pred + 1)[1:],
        true_idx=pair_keys // (n_pred + 1) - 1,
        pred_idx=pair_keys % (n_pred + 1) - 1,
        intersection=intersection,
    )


def pixel_scores(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """Foreground Dice and IoU."""
    true, pred = true_labels > 0, pred_labels > 0
    inter = int(np.count_nonzero(true & pred))
    n_true, n_pred = int(np.count_nonzero(true)), int(np.count_nonzero(pred))
    return {
        "dice": _ratio(2 * inter, n_true + n_pred),
        "iou": _ratio(inter, n_true + n_pred - inter),
    }


def aggregated_jaccard_index(table: Contingency) -> float:
    """AJI of Kumar et al. 2017 (see the module docstring)."""
    if table.intersection.size == 0:
        return _ratio(0, int(table.true_area.sum() + table.pred_area.sum()))
    iou = table.iou
    # Best prediction per true nucleus: sort pairs by true index, then by descending IoU.
    order = np.lexsort((-iou, table.true_idx))
    best = order[np.unique(table.true_idx[order], return_index=True)[1]]
    used = np.zeros(table.pred_area.size, dtype=bool)
    used[table.pred_idx[best]] = True
    unmatched_true = np.ones(table.true_area.size, dtype=bool)
    unmatched_true[table.true_idx[best]] = False
    inter = int(table.intersection[best].sum())
    union = (
        int(table.union[best].sum())
        + int(table.true_area[unmatched_true].sum())
        + int(table.pred_area[~used].sum())
    )
    return _ratio(inter, union)


def matching_scores(table: Contingency, threshold: float = MATCH_IOU) -> dict[str, float]:
    """PQ, DQ, SQ and detection F1/precision/recall at IoU > ``threshold`` (>= 0.5)."""
    if threshold < 0.5:
        raise ValueError("matches are unique only for IoU thresholds >= 0.5")
    iou = table.iou
    matched = iou > threshold
    tp = int(matched.sum())
    n_true, n_pred = table.true_area.size, table.pred_area.size
    fp, fn = n_pred - tp, n_true - tp
    dq = _ratio(tp, tp + 0.5 * (fp + fn))
    sq = float(iou[matched].mean()) if tp else (1.0 if n_true == n_pred == 0 else 0.0)
    return {
        "pq": dq * sq,
        "dq": dq,
        "sq": sq,
        "f1": dq,
        "precision": _ratio(tp, n_pred, empty=1.0 if n_true == 0 else 0.0),
        "recall": _ratio(tp, n_true, empty=1.0 if n_pred == 0 else 0.0),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_true": n_true,
        "n_pred": n_pred,
    }


def score_image(true_labels: np.ndarray, pred_labels: np.ndarray) -> dict[str, float]:
    """All scores of one image: dice, iou, aji, pq, dq, sq, f1, precision, recall and counts."""
    table = contingency(true_labels, pred_labels)
    return {
        **pixel_scores(true_labels, pred_labels),
        "aji": aggregated_jaccard_index(table),
        **matching_scores(table),
    }


def summarize(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over images, sums of the counts, and ``n_images``."""
    if not scores:
        return {"n_images": 0}
    summary: dict[str, float] = {}
    for key in scores[0]:
        values = [s[key] for s in scores]
        summary[key] = int(sum(values)) if key in COUNT_KEYS else float(np.mean(values))
    summary["n_images"] = len(scores)
    return summary


def _consecutive(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..n keeping 0 as background; returns the new labels and n."""
    if labels.size == 0:
        return labels.astype(np.int64), 0
    if labels.min() < 0:
        raise ValueError("labels must be non-negative")
    if int(labels.max()) <= 4 * labels.size:
        present = np.bincount(labels) > 0
        present[0] = True
        lut = np.cumsum(present) - 1
        return lut[labels], int(lut[-1])
    values, inverse = np.unique(labels, return_inverse=True)
    return (inverse if values[0] == 0 else inverse + 1), int(np.count_nonzero(values))


def _ratio(num: float, den: float, empty: float = 1.0) -> float:
    return float(num / den) if den else empty


def polygon_detection_scores(
    predicted: Sequence[Polygon], truth: Sequence[Polygon], threshold: float = MATCH_IOU
) -> dict[str, float]:
    """Detection precision, recall and F1 between two sets of shapely polygons (e.g. GeoJSON).

    A prediction and a true polygon match when their IoU exceeds ``threshold``; with IoU > 0.5
    each has at most one partner, so matches are unique. Also returns the mean IoU of matches.
    """
    tree = shapely.STRtree(list(predicted))
    ious = []
    for polygon in truth:
        for j in tree.query(polygon):
            other = predicted[int(j)]
            inter = polygon.intersection(other).area
            iou = inter / (polygon.area + other.area - inter) if inter else 0.0
            if iou > threshold:
                ious.append(iou)
                break
    tp = len(ious)
    precision = _ratio(tp, len(predicted))
    recall = _ratio(tp, len(truth))
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(_ratio(2 * tp, len(predicted) + len(truth)), 4),
        "mean_matched_iou": round(float(np.mean(ious)) if ious else 0.0, 4),
        "n_pred": len(predicted),
        "n_true": len(truth),
    }
