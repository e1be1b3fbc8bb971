from __future__ import annotations

import time

import numpy as np
import pytest

from wsi_pipeline.metrics import contingency, score_image, summarize

SCORES = ("dice", "iou", "aji", "pq", "dq", "sq", "f1", "precision", "recall")


def random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Non-overlapping random rectangles labelled 1..n (later ones overwrite earlier ones)."""
    labels = np.zeros(shape, dtype=np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        h, w = rng.integers(3, 9, size=2)
        labels[y : y + h, x : x + w] = i
    return labels


def reference_aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Kumar et al. 2017, Algorithm 1, written as plain loops."""
    pred_ids = [j for j in np.unique(pred) if j]
    used: set[int] = set()
    inter_sum = union_sum = 0
    for i in (i for i in np.unique(true) if i):
        g = true == i
        ious = [((g & (pred == j)).sum() / (g | (pred == j)).sum(), j) for j in pred_ids]
        best_iou, best = max(ious, key=lambda t: t[0], default=(0.0, None))
        if best is None or best_iou == 0:
            union_sum += g.sum()
            continue
        s = pred == best
        inter_sum += (g & s).sum()
        union_sum += (g | s).sum()
        used.add(best)
    union_sum += sum((pred == j).sum() for j in pred_ids if j not in used)
    return inter_sum / union_sum


def test_hand_computed_example() -> None:
    true = np.array([[1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 0, 0]])
    pred = np.array([[5, 5, 5, 0, 0, 0, 7, 7, 9, 9, 9, 0]])
    # Areas: T1 = 4, T2 = 4; P5 = 3, P7 = 2, P9 = 3.
    # Overlaps: T1∩P5 = 3 (IoU 3/4), T2∩P7 = 2 (IoU 2/4), T2∩P9 = 2 (IoU 2/5).
    s = score_image(true, pred)
    # Foreground: |T| = 8, |P| = 8, |T∩P| = 3 + 4 = 7.
    assert s["dice"] == pytest.approx(2 * 7 / 16)
    assert s["iou"] == pytest.approx(7 / 9)
    # AJI: T1 -> P5 (I 3, U 4); T2 -> P7 (IoU 0.5 > 0.4; I 2, U 4); unused P9 adds 3 to U.
    assert s["aji"] == pytest.approx((3 + 2) / (4 + 4 + 3))
    # Matches need IoU > 0.5: only T1-P5. TP 1, FP 2, FN 1.
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 1)
    assert s["dq"] == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 1))
    assert s["sq"] == pytest.approx(0.75)
    assert s["pq"] == pytest.approx(0.4 * 0.75)
    assert s["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 1))
    assert s["precision"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx(1 / 2)


def test_aji_counts_a_prediction_taken_twice() -> None:
    true = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[1, 1, 1, 1, 1]])
    # Both true nuclei take P1 (IoU 2/5 each): I = 2 + 2, U = 5 + 5 (Kumar's original AJI).
    assert score_image(true, pred)["aji"] == pytest.approx(4 / 10)


def test_aji_matches_reference_loops() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        true = random_labels(rng, (32, 32), 12)
        pred = random_labels(rng, (32, 32), 12)
        assert score_image(true, pred)["aji"] == pytest.approx(reference_aji(true, pred))


def test_contingency_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    true = random_labels(rng, (24, 24), 8)
    pred = random_labels(rng, (24, 24), 8)
    table = contingency(true, pred)
    t_ids = [i for i in np.unique(true) if i]
    p_ids = [j for j in np.unique(pred) if j]
    dense = np.zeros((len(t_ids), len(p_ids)), dtype=int)
    dense[table.true_idx, table.pred_idx] = table.intersection
    for a, i in enumerate(t_ids):
        for b, j in enumerate(p_ids):
            assert dense[a, b] == ((true == i) & (pred == j)).sum()


def test_identical_labels_score_one() -> None:
    labels = random_labels(np.random.default_rng(3), (64, 64), 30)
    s = score_image(labels, labels)
    assert all(s[k] == 1.0 for k in SCORES)
    assert s["fp"] == s["fn"] == 0


def test_label_permutation_invariance() -> None:
    rng = np.random.default_rng(4)
    true = random_labels(rng, (64, 64), 30)
    pred = random_labels(rng, (64, 64), 30)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, 31)) * 1000 + 7])
    assert score_image(true, pred) == pytest.approx(score_image(perm[true], perm[pred]))


def test_shifted_copy() -> None:
    labels = np.zeros((60, 60), dtype=np.int32)
    for k, (y, x) in enumerate([(5, 5), (5, 30), (30, 5), (30, 30)], start=1):
        labels[y : y + 10, x : x + 10] = k
    shifted = np.roll(labels, 1, axis=1)
    s = score_image(labels, shifted)
    # Each 10x10 square overlaps its copy in 10x9 = 90 px; union 100 + 100 - 90 = 110.
    assert s["aji"] == pytest.approx(90 / 110)
    assert s["sq"] == pytest.approx(90 / 110)
    assert s["dq"] == 1.0 and s["pq"] == pytest.approx(90 / 110)
    assert s["dice"] == pytest.approx(2 * 360 / 800)


def test_empty_conventions() -> None:
    empty = np.zeros((8, 8), dtype=np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 1
    assert all(score_image(empty, empty)[k] == 1.0 for k in SCORES)
    for true, pred in [(empty, one), (one, empty)]:
        s = score_image(true, pred)
        assert all(s[k] == 0.0 for k in SCORES), s


def test_summarize_means_scores_and_sums_counts() -> None:
    a = {"aji": 0.5, "pq": 1.0, "tp": 3, "fp": 1}
    b = {"aji": 1.0, "pq": 0.0, "tp": 2, "fp": 0}
    assert summarize([a, b]) == {"aji": 0.75, "pq": 0.5, "tp": 5, "fp": 1, "n_images": 2}
    assert summarize([]) == {"n_images": 0}


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shapes"):
        score_image(np.zeros((4, 4), dtype=int), np.zeros((4, 5), dtype=int))


def test_monuseg_sized_image_is_fast() -> None:
    rng = np.random.default_rng(5)
    true = random_labels(rng, (1000, 1000), 700)
    pred = np.roll(true, 2, axis=0)
    start = time.perf_counter()
    score_image(true, pred)
    assert time.perf_counter() - start < 1.0


def test_polygon_detection_scores_by_hand() -> None:
    from shapely.geometry import box

    from wsi_pipeline.metrics import polygon_detection_scores

    truth = [box(0, 0, 10, 10), box(20, 0, 30, 10), box(40, 0, 50, 10)]
    predicted = [
        box(1, 0, 11, 10),  # IoU 90 / 110 = 0.818: a match
        box(25, 0, 35, 10),  # IoU 50 / 150 = 0.333: no match
        box(60, 0, 70, 10),  # nothing there
    ]
    scores = polygon_detection_scores(predicted, truth)
    assert scores["precision"] == round(1 / 3, 4) and scores["recall"] == round(1 / 3, 4)
    assert scores["f1"] == round(2 / 6, 4)
    assert scores["mean_matched_iou"] == round(90 / 110, 4)
