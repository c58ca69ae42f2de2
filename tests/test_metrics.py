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


@pytest.mark.parametrize("as_torch", [False, True])
def test_a_logit_of_exactly_zero_is_not_foreground(as_torch) -> None:
    pred = np.array([[[0.0, 1e-3], [-1e-3, 0.0]]], np.float32)
    target = np.array([[[1, 1], [0, 0]]], np.uint8)
    if as_torch:
        pred, target = torch.from_numpy(pred), torch.from_numpy(target)
    # only the 1e-3 logit is a predicted pixel: I = 1, U = 2
    assert SegMetrics().update(pred, target) == [(1, 2)]


def test_empty_accumulator_scores_zero() -> None:
    assert SegMetrics().compute() == {"giou": 0.0, "ciou": 0.0, "n": 0}


def test_wrong_ranks_are_refused_with_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"expects \(H, W\) masks, got \(2, 2\) and \(1, 2, 2\)"):
        intersection_union(np.zeros((2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"expects \(H, W\) masks, got \(1, 2, 2\) and \(2, 2\)"):
        intersection_union(np.zeros((1, 2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"expects \(H, W\) or \(n, H, W\) masks, got \(2, 2\)"):
        SegMetrics().update(np.zeros((2, 2)), np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"got \(1, 1, 2, 2\)"):
        SegMetrics().update(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))


def test_invalid_precomputed_counts_are_refused() -> None:
    m = SegMetrics()
    with pytest.raises(ValueError, match=r"invalid mask counts I=3, U=2 \(need 0 <= I <= U\)"):
        m.update_counts(3, 2)
    with pytest.raises(ValueError, match="I=-1"):
        m.update_counts(-1, 4)
    with pytest.raises(ValueError):
        m.update_counts([1, 2], [3])  # one union for two masks
    with pytest.raises(ValueError, match="I=5, U=4"):
        m.update_counts([1, 5], [2, 4])  # the valid first pair is not kept either
    assert m.state_dict() == {"sum_iou": 0.0, "n": 0, "intersection": 0, "union": 0}


def test_reduce_keeps_the_score_sum_in_float64_and_the_counts_exact() -> None:
    m = SegMetrics()
    m.update_counts([1, 1, 1], [3, 7, 9])
    before = m.sum_iou
    seen = []

    def identity(t):
        seen.append(t.dtype)
        return t.clone()

    m.reduce_(identity)
    assert seen == [torch.float64, torch.int64]
    assert m.sum_iou == before  # exactly: no float32 round trip
    assert (m.n, m.intersection, m.union) == (3, 3, 19)


class _Accelerator:
    """``num_processes`` identical processes: ``reduce(t, "sum")`` multiplies by that."""

    def __init__(self, processes: int) -> None:
        self.num_processes, self.device, self.calls = processes, torch.device("cpu"), []

    def reduce(self, tensor, reduction):
        self.calls.append((tensor.dtype, tensor.device, reduction))
        assert reduction == "sum"
        return tensor * self.num_processes


def test_all_reduce_through_an_accelerator_sums_the_state() -> None:
    m = SegMetrics()
    m.update_counts([2, 0], [4, 0])
    single = _Accelerator(1)
    assert m.all_reduce(single) is m and single.calls == []
    assert m.state_dict() == {"sum_iou": iou_score(2, 4) + 1.0, "n": 2, "intersection": 2,
                              "union": 4}
    two = _Accelerator(2)
    assert m.all_reduce(two) is m
    assert two.calls == [(torch.float64, torch.device("cpu"), "sum"),
                         (torch.int64, torch.device("cpu"), "sum")]
    assert m.state_dict() == {"sum_iou": 2 * (iou_score(2, 4) + 1.0), "n": 4,
                              "intersection": 4, "union": 8}


def test_all_reduce_through_torch_distributed(monkeypatch) -> None:
    dist = torch.distributed
    m = SegMetrics()
    m.update_counts([1], [2])
    assert m.all_reduce() is m and m.n == 1  # not initialised: nothing to do
    calls = []

    def all_reduce(tensor, op):
        calls.append((tensor.dtype, tensor.device.type, op))
        tensor.mul_(3)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    assert m.all_reduce() is m and calls == [] and m.n == 1
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert m.all_reduce() is m
    assert calls == [(torch.float64, "cpu", dist.ReduceOp.SUM),
                     (torch.int64, "cpu", dist.ReduceOp.SUM)]
    assert m.state_dict() == {"sum_iou": 3 * iou_score(1, 2), "n": 3, "intersection": 3,
                              "union": 6}


@pytest.mark.cuda
def test_mixed_cuda_and_numpy_inputs_count_like_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    preds = torch.randn(4, 32, 32, generator=gen)
    targets = torch.randint(0, 2, (4, 32, 32), generator=gen, dtype=torch.uint8)
    targets[1, :5] = 255
    expected = SegMetrics().update(preds, targets)
    assert SegMetrics().update(preds.cuda(), targets.numpy()) == expected
    assert SegMetrics().update(preds.numpy(), targets.cuda()) == expected
    assert SegMetrics().update(preds.cuda() > 0, targets.cuda()) == expected


@pytest.mark.cuda
def test_all_reduce_on_a_one_gpu_nccl_group(monkeypatch, tmp_path) -> None:
    """The NCCL branch moves the state to the process's GPU; a one-process group runs it
    for real (world size reported as 2 so the reduction happens)."""
    dist = torch.distributed
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
        m = SegMetrics()
        m.update_counts([1, 2], [2, 2])
        state = m.state_dict()
        m.all_reduce()
        assert m.state_dict() == state  # one real process: the sum is the state itself
    finally:
        dist.destroy_process_group()


def test_repr_shows_the_count_and_both_scores() -> None:
    m = SegMetrics()
    m.update_counts([1, 3], [2, 4])
    assert repr(m) == (f"SegMetrics(n=2, giou={(1 / (2 + 1e-5) + 3 / (4 + 1e-5)) / 2:.4f}, "
                       f"ciou={4 / 6:.4f})")
