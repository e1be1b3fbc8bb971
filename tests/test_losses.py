from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.train.losses import (
    class_weights_from_counts,
    create_loss,
    lovasz_softmax_flat,
    soft_dice_loss,
)

LOSSES = ["ce_dice", "dice", "bce_dice", "wce_ssim_dice", "lovasz"]


def make_target(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 3:12, 4:13] = torch.randint(1, max(k, 2), (2, 9, 9), generator=gen)
    return target


def perfect_logits(target: torch.Tensor, k: int, scale: float = 20.0) -> torch.Tensor:
    if k == 1:
        return (2.0 * target.float() - 1.0).unsqueeze(1) * scale
    return torch.nn.functional.one_hot(target, k).permute(0, 3, 1, 2).float() * 2 * scale - scale


def cases() -> list[tuple[str, int]]:
    return [(name, k) for name in LOSSES for k in (1, 3) if not (name == "bce_dice" and k == 3)]


def test_registry_lists_all_and_rejects_unknown() -> None:
    from wsi_pipeline.train.losses import list_losses

    assert list_losses() == sorted(LOSSES)
    with pytest.raises(ValueError, match="ce_dice"):
        create_loss("focal")
    assert create_loss("ce_dice", smooth=None).dice.smooth == 1.0


@pytest.mark.parametrize(("name", "k"), cases())
def test_perfect_is_near_zero_and_wrong_is_higher(name: str, k: int) -> None:
    loss = create_loss(name)
    target = make_target(k)
    perfect = loss(perfect_logits(target, k), target)
    wrong_target = (target + 1) % max(k, 2)
    wrong = loss(perfect_logits(wrong_target, k), target)
    assert perfect.item() < 0.02
    assert wrong.item() > 0.5


@pytest.mark.parametrize(("name", "k"), cases())
def test_gradient_flows(name: str, k: int) -> None:
    logits = torch.randn(2, k, 16, 16, generator=torch.Generator().manual_seed(1))
    logits.requires_grad_(True)
    loss = create_loss(name)(logits, make_target(k))
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["ce_dice", "wce_ssim_dice", "lovasz"])
def test_bf16_autocast_computes_in_fp32(name: str) -> None:
    logits = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    target = make_target(3)
    loss = create_loss(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target)
    assert value.dtype == torch.float32
    expected = loss(logits.bfloat16().float(), target)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bce_dice_needs_one_channel() -> None:
    with pytest.raises(ValueError, match="1 channel"):
        create_loss("bce_dice")(torch.zeros(1, 3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.long))


def test_shape_check() -> None:
    with pytest.raises(ValueError, match="expected"):
        create_loss("dice")(torch.zeros(1, 3, 16, 16), torch.zeros(1, 8, 8, dtype=torch.long))


def test_soft_dice_by_hand() -> None:
    probs = torch.tensor([0.5, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 0.0, 1.0]).reshape(1, 1, 2, 2)
    # 2·(0.5 + 1) / (1.5 + 3) = 3 / 4.5 = 2/3 (smooth 0)
    assert soft_dice_loss(probs, target, smooth=0.0).item() == pytest.approx(1 - 2 / 3)


def test_class_weights_by_hand() -> None:
    # N = 400, K = 3: 400 / (3·300) = 4/9, 400 / (3·100) = 4/3, mean 8/9 -> 0.5, 1.5; absent -> 0.
    weights = class_weights_from_counts([300, 100, 0])
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.5, 0.0]))


def jaccard_loss(errors_set: np.ndarray, fg: np.ndarray) -> float:
    """Jaccard loss of class c when the pixels in ``errors_set`` are mispredicted."""
    return errors_set.sum() / (fg | errors_set).sum() if errors_set.any() else 0.0


def test_lovasz_equals_choquet_integral_of_jaccard_loss() -> None:
    rng = np.random.default_rng(3)
    fg = rng.random(12) < 0.5
    prob = rng.random(12)
    errors = np.abs(fg - prob)
    # Lovász extension as the integral over t of Δ_J({i : error_i >= t}), exact on sorted errors.
    order = np.argsort(-errors)
    sorted_errors = np.append(errors[order], 0.0)
    brute = 0.0
    for k in range(1, 13):
        top = np.zeros(12, dtype=bool)
        top[order[:k]] = True
        brute += (sorted_errors[k - 1] - sorted_errors[k]) * jaccard_loss(top, fg)
    got = lovasz_softmax_flat(torch.tensor(prob)[:, None].float(), torch.tensor(fg).long())
    assert got.item() == pytest.approx(brute, rel=1e-5)


def test_lovasz_on_hard_predictions_is_one_minus_mean_iou() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    probs = torch.nn.functional.one_hot(pred, 3).float()
    # IoU: class 0 = 1/3, class 1 = 2/3, class 2 = 1/2.
    expected = 1 - (1 / 3 + 2 / 3 + 1 / 2) / 3
    assert lovasz_softmax_flat(probs, target).item() == pytest.approx(expected)


def test_distance_loss_adds_the_regression_to_the_class_loss() -> None:
    from wsi_pipeline.forward import probabilities
    from wsi_pipeline.train.losses import DistanceLoss, create_target_loss

    classes = make_target(3)
    distance = torch.zeros_like(classes)
    distance[:, 5:10, 6:11] = 255
    target = torch.stack([classes, distance], dim=1)  # (N, 2, H, W)
    loss = create_target_loss("ce_dice", "distance")
    assert isinstance(loss, DistanceLoss)
    assert not isinstance(create_target_loss("ce_dice", "3class"), DistanceLoss)
    class_logits = perfect_logits(classes, 3)
    good = torch.cat([class_logits, (distance.float() / 255 * 40 - 20).unsqueeze(1)], dim=1)
    bad = torch.cat([class_logits, (20 - distance.float() / 255 * 40).unsqueeze(1)], dim=1)
    assert loss(good, target).item() < 0.02 < 5 < loss(bad, target).item()
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss(logits, target).backward()
    assert logits.grad is not None and (logits.grad[:, 3].abs().sum() > 0)
    probs = probabilities(good, "distance")
    torch.testing.assert_close(probs[:, :3].sum(dim=1), torch.ones(2, 16, 16))
    assert probs[:, 3].max() > 0.99 and probs[:, 3].min() < 0.01
    with pytest.raises(ValueError, match="N,2,H,W"):
        loss(logits, classes)
