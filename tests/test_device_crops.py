"""Crops drawn on the training device: the same crops and targets as the Ray Data path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.train.augment import NO_AUGMENT, AugmentConfig, square_symmetry
from wsi_pipeline.train.device_crops import DeviceCrops
from wsi_pipeline.train.targets import INTERIOR, make_target

SIZE = 32


class ArrayStore:
    """Stands in for a training store: ``read`` is all the device loader uses."""

    def __init__(self, items: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.items = items

    def read(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return self.items[key]


def coordinate_item(height: int = 90, width: int = 110) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red and green say each pixel's x and y, and square nuclei on a grid."""
    yy, xx = np.mgrid[:height, :width]
    rgb = np.stack([xx, yy, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    labels = np.zeros((height, width), dtype=np.int32)
    for i, (y, x) in enumerate(
        (y, x) for y in range(3, height - 8, 9) for x in range(3, width - 8, 9)
    ):
        labels[y : y + 7, x : x + 7 + (i % 3)] = i + 1  # some touch their right neighbour
    return rgb, labels


def crops(augment: AugmentConfig, mode: str = "3class", seed: int = 0) -> DeviceCrops:
    store = ArrayStore({"a": coordinate_item()})
    return DeviceCrops(
        store,  # type: ignore[arg-type]
        ["a"],
        size=SIZE,
        augment=augment,
        target_mode=mode,  # type: ignore[arg-type]
        boundary_width=1,
        device=torch.device("cpu"),
        seed=seed,
    )


def test_without_augmentation_a_crop_is_a_window_and_its_target_the_windows() -> None:
    rgb, labels = coordinate_item()
    batch = crops(NO_AUGMENT).batch(6)
    assert batch["image"].shape == (6, SIZE, SIZE, 3) and batch["image"].dtype == torch.uint8
    assert batch["target"].shape == (6, SIZE, SIZE) and batch["target"].dtype == torch.uint8
    for image, target in zip(batch["image"].numpy(), batch["target"].numpy(), strict=True):
        x0, y0 = int(image[0, 0, 0]), int(image[0, 0, 1])
        window = np.s_[y0 : y0 + SIZE, x0 : x0 + SIZE]
        np.testing.assert_array_equal(image, rgb[window])
        np.testing.assert_array_equal(target, make_target(labels[window]))


def test_flips_and_quarter_turns_are_the_eight_symmetries() -> None:
    rgb, labels = coordinate_item()
    batch = crops(NO_AUGMENT.model_copy(update={"flips": True})).batch(24)
    seen = set()
    for image, target in zip(batch["image"].numpy(), batch["target"].numpy(), strict=True):
        x0, y0 = int(image[..., 0].min()), int(image[..., 1].min())
        window = np.s_[y0 : y0 + SIZE, x0 : x0 + SIZE]
        matches = [t for t in range(8) if np.array_equal(square_symmetry(rgb[window], t), image)]
        assert len(matches) == 1
        np.testing.assert_array_equal(
            square_symmetry(make_target(labels[window]), matches[0]), target
        )
        seen.add(matches[0])
    assert len(seen) >= 6


def test_distance_targets_stay_on_the_interior() -> None:
    batch = crops(AugmentConfig(), mode="distance").batch(8)
    target = batch["target"]
    assert target.shape == (8, 2, SIZE, SIZE)
    classes, distance = target[:, 0], target[:, 1]
    assert (distance[classes != INTERIOR] == 0).all()
    assert distance.max() > 200  # nucleus centres


def test_full_augmentation_is_seeded_and_changes_pixels() -> None:
    augment = AugmentConfig(stain=0.1, blur_p=0.5, jpeg_p=0.5, resample_p=0.5)
    first, again = crops(augment, seed=3), crops(augment, seed=3)
    a, b = first.batch(8), again.batch(8)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    plain = crops(NO_AUGMENT, seed=3).batch(8)
    assert not torch.equal(a["image"], plain["image"])
    assert set(torch.unique(a["target"]).tolist()) <= {0, 1, 2}
    assert len(list(first.batches(3, 4))) == 3


def test_workers_share_the_items() -> None:
    store = ArrayStore({k: coordinate_item(70, 70) for k in "abcde"})
    shares = [
        DeviceCrops(store, list("abcde"), size=SIZE, augment=NO_AUGMENT, target_mode="3class",  # type: ignore[arg-type]
                    boundary_width=1, device=torch.device("cpu"), rank=r, world=2).keys
        for r in range(2)
    ]  # fmt: skip
    assert shares == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ValueError, match="no training items"):
        DeviceCrops(store, [], size=SIZE, augment=NO_AUGMENT, target_mode="3class",  # type: ignore[arg-type]
                    boundary_width=1, device=torch.device("cpu"))  # fmt: skip
