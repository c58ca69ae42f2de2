"""Segmentation metrics exactly as LISA computes them (SPEC §6): gIoU and cIoU.

For one mask, the prediction is ``logits > 0`` and the target's foreground is every value
that is neither 0 nor ``ignore_index``; pixels where the target equals ``ignore_index``
count for neither side. Then ``I = |P & T|`` and ``U = |P| + |T| - I``.

Over a split:

- gIoU = mean over masks of ``I / (U + 1e-5)``, where a mask with ``U == 0`` (empty target
  and empty prediction, or nothing left after ignoring) scores 1.0;
- cIoU = ``sum(I) / (sum(U) + 1e-10)``.

Counting is exact integer arithmetic (boolean sums into int64, then Python ints), so CPU
and GPU give identical numbers; LISA's ``histc`` on float tensors is deliberately avoided.
:class:`SegMetrics` streams: its state is four numbers, merged or all-reduced by summing
before dividing, so memory never grows with the split and distributed results are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

GIOU_EPS = 1e-5
CIOU_EPS = 1e-10


def iou_score(intersection: int, union: int) -> float:
    """Per-mask score used by gIoU: ``I / (U + 1e-5)``, and 1.0 when ``U == 0``."""
    if union == 0:
        return 1.0
    return intersection / (union + GIOU_EPS)


def _to_torch(x: ArrayLike, device: torch.device | None) -> torch.Tensor:
    """Any array to a tensor (on ``device`` when given); numpy arrays are not copied on CPU."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device) if device is not None and t.device != device else t


def _counts(
    pred_logits: ArrayLike, target: ArrayLike, ignore_index: int
) -> tuple[list[int], list[int]]:
    """Exact per-mask (I, U) for a stack.

    Args:
        pred_logits: ``(n, H, W)`` mask logits (any float or integer dtype; bool is taken as
            the prediction itself).
        target: ``(n, H, W)`` target values {0, 1, ignore_index}.

    Returns:
        two lists of ``n`` Python ints: intersections and unions.
    """
    if tuple(pred_logits.shape) != tuple(target.shape):
        raise ValueError(
            f"prediction shape {tuple(pred_logits.shape)} != target shape "
            f"{tuple(target.shape)} (resize the logits to the target size first)"
        )
    if isinstance(pred_logits, np.ndarray) and isinstance(target, np.ndarray):
        pred = pred_logits if pred_logits.dtype == np.bool_ else pred_logits > 0
        valid = target != ignore_index
        tgt = (target != 0) & valid
        pred = pred & valid
        # count_nonzero over the pixel axes is exact (int64) and avoids float sums.
        inter = np.count_nonzero(pred & tgt, axis=(1, 2))
        area_p = np.count_nonzero(pred, axis=(1, 2))
        area_t = np.count_nonzero(tgt, axis=(1, 2))
        union = area_p + area_t - inter
        return [int(v) for v in inter], [int(v) for v in union]
    # Mixed or torch inputs: count on the prediction's device (no host copy of big logits).
    device = pred_logits.device if isinstance(pred_logits, torch.Tensor) else target.device
    p = _to_torch(pred_logits, device)
    t = _to_torch(target, device)
    pred = p if p.dtype == torch.bool else p > 0
    valid = t != ignore_index
    tgt = (t != 0) & valid
    pred = pred & valid
    # Boolean sums accumulate in int64 on every backend: exact, CPU == GPU.
    inter = (pred & tgt).sum(dim=(1, 2), dtype=torch.int64)
    area_p = pred.sum(dim=(1, 2), dtype=torch.int64)
    area_t = tgt.sum(dim=(1, 2), dtype=torch.int64)
    union = area_p + area_t - inter
    both = torch.stack([inter, union]).cpu().tolist()  # one device sync for the stack
    return [int(v) for v in both[0]], [int(v) for v in both[1]]


def intersection_union(
    pred_logits: ArrayLike, target: ArrayLike, ignore_index: int = 255
) -> tuple[int, int]:
    """Intersection and union of one predicted mask with its target (SPEC §6).

    Args:
        pred_logits: ``(H, W)`` logits (torch tensor on any device, or numpy array); the
            prediction is ``pred_logits > 0`` (a bool array is used as is).
        target: ``(H, W)`` values {0, 1, ``ignore_index``}; any non-zero value other than
            ``ignore_index`` is foreground.
        ignore_index: target value whose pixels count for neither prediction nor target.

    Returns:
        ``(I, U)`` as Python ints, ``I = |P & T|`` and ``U = |P| + |T| - I``.
    """
    if pred_logits.ndim != 2 or target.ndim != 2:
        raise ValueError(
            f"intersection_union expects (H, W) masks, got {tuple(pred_logits.shape)} and "
            f"{tuple(target.shape)}; use SegMetrics.update for stacks"
        )
    inter, union = _counts(pred_logits[None], target[None], ignore_index)
    return inter[0], union[0]


class SegMetrics:
    """Streaming gIoU / cIoU accumulator.

    The state is ``sum_iou`` (a float64 sum of per-mask scores), ``n`` (masks seen) and the
    integer totals ``intersection`` / ``union``; everything else derives from it, so two
    accumulators merge (or processes all-reduce) by summing before dividing.

    Example::

        metrics = SegMetrics()
        for logits, target in batches:         # (n, H, W) each
            metrics.update(logits, target)
        metrics.all_reduce(accelerator)         # no-op on one process
        metrics.compute()                       # {"giou": ..., "ciou": ..., "n": ...}
    """

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.sum_iou = 0.0
        self.n = 0
        self.intersection = 0
        self.union = 0

    def update(self, pred_logits: ArrayLike, target: ArrayLike) -> list[tuple[int, int]]:
        """Add one mask ``(H, W)`` or a stack ``(n, H, W)`` of masks.

        Args:
            pred_logits: logits, same shape as ``target`` (torch on any device or numpy).
            target: values {0, 1, ignore_index}.

        Returns:
            the per-mask ``(I, U)`` pairs, in order (for per-sample reports).
        """
        if pred_logits.ndim == 2 and target.ndim == 2:
            pred_logits, target = pred_logits[None], target[None]
        if pred_logits.ndim != 3:
            raise ValueError(
                f"SegMetrics.update expects (H, W) or (n, H, W) masks, got "
                f"{tuple(pred_logits.shape)}"
            )
        inters, unions = _counts(pred_logits, target, self.ignore_index)
        self.update_counts(inters, unions)
        return list(zip(inters, unions, strict=True))

    def update_counts(self, intersection: int | Iterable[int], union: int | Iterable[int]) -> None:
        """Add precomputed per-mask counts: one ``(I, U)`` pair, or two equal-length lists."""
        inters = [intersection] if isinstance(intersection, int | np.integer) else intersection
        unions = [union] if isinstance(union, int | np.integer) else union
        # Checked before anything is added: a refused call leaves the state as it was.
        pairs = [(int(i), int(u)) for i, u in zip(inters, unions, strict=True)]
        for i, u in pairs:
            if i < 0 or u < i:
                raise ValueError(f"invalid mask counts I={i}, U={u} (need 0 <= I <= U)")
        for i, u in pairs:
            self.sum_iou += iou_score(i, u)
            self.n += 1
            self.intersection += i
            self.union += u

    def merge(self, other: SegMetrics) -> SegMetrics:
        """Add ``other``'s state into this one (in place); returns ``self``."""
        self.sum_iou += other.sum_iou
        self.n += other.n
        self.intersection += other.intersection
        self.union += other.union
        return self

    def reduce_(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> SegMetrics:
        """Replace the state by its sum over processes, computed by ``reduce_fn``.

        ``reduce_fn`` receives a 1-D tensor and must return the element-wise sum over all
        processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``). It is called twice: a
        float64 ``[sum_iou]`` and an int64 ``[n, intersection, union]`` so the counts stay
        exact integers. Call it once, after the last update: a second call would sum again.
        """
        scores = reduce_fn(torch.tensor([self.sum_iou], dtype=torch.float64))
        counts = reduce_fn(torch.tensor([self.n, self.intersection, self.union], dtype=torch.int64))
        self.sum_iou = float(scores.reshape(-1)[0].item())
        self.n, self.intersection, self.union = (int(v) for v in counts.reshape(-1).tolist())
        return self

    def all_reduce(self, accelerator: Any | None = None) -> SegMetrics:
        """Sum the state across processes (in place); a no-op on a single process.

        Args:
            accelerator: an ``accelerate.Accelerator`` (its device and ``reduce`` are used);
                ``None`` uses ``torch.distributed`` when it is initialised, else does nothing.
        """
        if accelerator is not None:
            if accelerator.num_processes <= 1:
                return self
            device = accelerator.device
            return self.reduce_(lambda t: accelerator.reduce(t.to(device), "sum").cpu())
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
            return self
        # NCCL needs tensors on the process's GPU; gloo takes CPU tensors.
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

        def _sum(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            return t.cpu()

        return self.reduce_(_sum)

    def compute(self) -> dict[str, float | int]:
        """``{"giou": float, "ciou": float, "n": int}``; both scores are 0.0 when ``n == 0``."""
        giou = self.sum_iou / self.n if self.n else 0.0
        ciou = self.intersection / (self.union + CIOU_EPS)
        return {"giou": float(giou), "ciou": float(ciou), "n": self.n}

    def state_dict(self) -> dict[str, float | int]:
        """The accumulator's state as plain Python numbers (JSON-safe)."""
        return {
            "sum_iou": self.sum_iou,
            "n": self.n,
            "intersection": self.intersection,
            "union": self.union,
        }

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        """Restore a state written by :meth:`state_dict` (e.g. when resuming an eval)."""
        missing = {"sum_iou", "n", "intersection", "union"} - set(state)
        if missing:
            raise ValueError(f"SegMetrics state is missing {sorted(missing)}")
        self.sum_iou = float(state["sum_iou"])
        self.n = int(state["n"])
        self.intersection = int(state["intersection"])
        self.union = int(state["union"])

    def __repr__(self) -> str:
        c = self.compute()
        return f"SegMetrics(n={c['n']}, giou={c['giou']:.4f}, ciou={c['ciou']:.4f})"
