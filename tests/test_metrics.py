"""gIoU / cIoU against hand-computed values (SPEC §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keyseg.metrics import SegMetrics, intersection_union, iou_score


def _logits(mask: list[list[int]]) -> np.ndarray:
    """Binary picture -> logits (+5 where 1, -5 where 0)."""
    return np.where(np.array(mask) > 0, 5.0, -5.0).astype(np.float32)


def test_ignore_pixels_count_for_neither_side() -> None:
    pred = _logits([[1, 1, 0], [1, 0, 0]])
    target = np.array([[1, 255, 0], [0, 255, 1]], dtype=np.uint8)
    # Valid pixels: (0,0) P&T, (0,2) neither, (1,0) P only, (1,2) T only.
    assert intersection_union(pred, target) == (1, 3)


def test_empty_target_and_empty_prediction_scores_one() -> None:
    m = SegMetrics()
    m.update(np.full((4, 4), -1.0), np.zeros((4, 4), np.uint8))
    assert m.compute() == {"giou": 1.0, "ciou": 0.0, "n": 1}


def test_empty_target_with_prediction_scores_zero() -> None:
    m = SegMetrics()
    pairs = m.update(_logits([[1, 0], [0, 0]]), np.zeros((2, 2), np.uint8))
    assert pairs == [(0, 1)]
    assert m.compute()["giou"] == 0.0


def test_all_ignore_mask_has_zero_union_and_scores_one() -> None:
    assert intersection_union(_logits([[1, 1], [1, 1]]), np.full((2, 2), 255, np.uint8)) == (0, 0)
    assert iou_score(0, 0) == 1.0


def test_several_masks_giou_and_ciou_by_hand() -> None:
    preds = np.stack(
        [_logits([[1, 1], [0, 0]]), _logits([[1, 1], [1, 1]]), _logits([[0, 0], [0, 0]])]
    )
    targets = np.array(
        [[[1, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 1]]], dtype=np.uint8
    )  # (I, U) = (1, 2), (4, 4), (0, 1)
    m = SegMetrics()
    assert m.update(preds, targets) == [(1, 2), (4, 4), (0, 1)]
    out = m.compute()
    assert out["n"] == 3
    assert out["giou"] == pytest.approx((1 / (2 + 1e-5) + 4 / (4 + 1e-5) + 0.0) / 3, abs=1e-12)
    assert out["ciou"] == pytest.approx(5 / (7 + 1e-10), abs=1e-12)


def test_merge_of_two_halves_equals_the_whole() -> None:
    rng = np.random.default_rng(0)
    preds = rng.normal(size=(10, 16, 16)).astype(np.float32)
    targets = rng.integers(0, 2, size=(10, 16, 16)).astype(np.uint8)
    targets[3] = 255
    targets[4] = 0
    whole = SegMetrics()
    whole.update(preds, targets)
    a, b = SegMetrics(), SegMetrics()
    a.update(preds[:5], targets[:5])
    for p, t in zip(preds[5:], targets[5:], strict=True):
        b.update(p, t)
    assert a.merge(b).state_dict() == pytest.approx(whole.state_dict(), abs=1e-12)
    assert a.compute() == pytest.approx(whole.compute(), abs=1e-12)


def test_reduce_sums_state_before_dividing() -> None:
    m = SegMetrics()
    m.update_counts([1, 0], [2, 0])  # scores 0.5, 1.0
    m.reduce_(lambda t: t * 2)  # as if two identical processes
    assert m.state_dict()["n"] == 4 and m.state_dict()["union"] == 4
    assert m.compute()["giou"] == pytest.approx((1 / (2 + 1e-5) + 1.0) / 2)
    assert m.all_reduce(None) is m  # single process: no-op


def test_state_dict_round_trip() -> None:
    m = SegMetrics()
    m.update_counts(3, 7)
    restored = SegMetrics()
    restored.load_state_dict(m.state_dict())
    assert restored.compute() == m.compute()
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"n": 1})


def test_tensor_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(1)
    preds = rng.normal(size=(6, 20, 24)).astype(np.float32)
    targets = rng.choice(np.array([0, 1, 255], np.uint8), size=(6, 20, 24))
    from_numpy, from_torch, mixed = SegMetrics(), SegMetrics(), SegMetrics()
    pairs = from_numpy.update(preds, targets)
    assert from_torch.update(torch.from_numpy(preds), torch.from_numpy(targets)) == pairs
    assert mixed.update(torch.from_numpy(preds), targets) == pairs
    assert from_numpy.state_dict() == from_torch.state_dict() == mixed.state_dict()
    i, u = intersection_union(torch.from_numpy(preds[0]).double(), torch.from_numpy(targets[0]))
    assert (i, u) == pairs[0]


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((2, 2)), np.zeros((3, 2)))


@pytest.mark.cuda
def test_cuda_and_cpu_counts_are_identical() -> None:
    gen = torch.Generator().manual_seed(2)
    preds = torch.randn(8, 64, 64, generator=gen)
    targets = torch.randint(0, 2, (8, 64, 64), generator=gen, dtype=torch.uint8)
    targets[0, :10] = 255
    cpu, gpu = SegMetrics(), SegMetrics()
    assert cpu.update(preds, targets) == gpu.update(preds.cuda().half(), targets.cuda())
    assert cpu.state_dict() == gpu.state_dict()
