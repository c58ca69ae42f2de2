"""Overlay candidates: the ``n`` worst and ``n`` best samples, kept bit-packed, drawn at the end.

Memory stays bounded: two heaps of at most ``n`` candidates each, masks packed to bits. A
row read back on resume becomes a candidate without masks; the evaluation recomputes the
masks of those that are still kept at the end (``keyseg.evaluate.loop``).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from keyseg.data.sample import SegRecord


@dataclass
class OverlayCandidate:
    """A scored sample kept for an overlay: bit-packed masks, re-rendered at the end.

    Attributes:
        score: the sample's mean per-mask IoU score (gIoU contribution).
        sample_id: the conversation id.
        record_index: index of the record in the evaluated sequence (to reload the image).
        query: the referent text.
        answer: the fed or generated answer.
        shape: ``(k, H, W)`` of the masks.
        pred_bits / target_bits: ``np.packbits`` of the ``(k, H, W)`` prediction
            (``logits > 0``) and of the target's foreground; ``ignore_bits`` of its 255 pixels.
            ``None`` (and ``shape`` ``(0, 0, 0)``) for a row read back on resume until its
            masks are recomputed at the end.
        ref_index: index of the referent in the record.
    """

    score: float
    sample_id: str
    record_index: int
    query: str
    answer: str
    shape: tuple[int, int, int]
    pred_bits: np.ndarray | None
    target_bits: np.ndarray | None
    ignore_bits: np.ndarray | None
    ref_index: int = 0

    @classmethod
    def from_row(cls, row: dict) -> OverlayCandidate:
        """A candidate for a JSONL row, without masks (:meth:`fill`)."""
        return cls(score=float(row["iou"]), sample_id=row["id"],
                   record_index=int(row["index"]), query=row["query"], answer=row["answer"],
                   shape=(0, 0, 0), pred_bits=None, target_bits=None, ignore_bits=None,
                   ref_index=int(row["ref"]))

    def fill(self, used: torch.Tensor, target: np.ndarray) -> None:
        """Store the bit-packed ``(k, H, W)`` prediction (logits ``used``), the target's
        foreground and its ignore region (``target`` uint8 ``(k, H, W)``)."""
        self.shape = tuple(int(s) for s in target.shape)
        self.pred_bits = np.packbits((used > 0).cpu().numpy().reshape(-1))
        self.target_bits = np.packbits(((target != 0) & (target != 255)).reshape(-1))
        self.ignore_bits = np.packbits((target == 255).reshape(-1))

    def masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unpacked ``(k, H, W)`` bool prediction, target foreground and ignore region."""
        size = int(np.prod(self.shape))

        def unpack(bits: np.ndarray) -> np.ndarray:
            return np.unpackbits(bits, count=size).astype(bool).reshape(self.shape)

        return unpack(self.pred_bits), unpack(self.target_bits), unpack(self.ignore_bits)


class BoundedHeaps:
    """The ``n`` lowest- and ``n`` highest-scoring candidates seen (ties: first seen wins)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.worst: list[tuple[float, int, OverlayCandidate]] = []  # max-heap via -score
        self.best: list[tuple[float, int, OverlayCandidate]] = []  # min-heap on score
        self._count = itertools.count()

    def wants(self, score: float) -> bool:
        """Whether a candidate of ``score`` would be kept now."""
        if self.n <= 0:
            return False
        return (len(self.worst) < self.n or -self.worst[0][0] > score
                or len(self.best) < self.n or self.best[0][0] < score)

    def offer(self, row: dict, used: torch.Tensor | None = None,
              target: np.ndarray | None = None) -> None:
        """Keep ``row`` if :meth:`wants` its ``iou``: with its masks when given (a scored
        row), without them otherwise (a row read back on resume)."""
        if self.wants(row["iou"]):
            candidate = OverlayCandidate.from_row(row)
            if used is not None:
                candidate.fill(used, target)
            self.push(candidate)

    def push(self, candidate: OverlayCandidate) -> None:
        order = next(self._count)
        s = candidate.score
        if len(self.worst) < self.n:
            heapq.heappush(self.worst, (-s, -order, candidate))
        elif -self.worst[0][0] > s:
            heapq.heapreplace(self.worst, (-s, -order, candidate))
        if len(self.best) < self.n:
            heapq.heappush(self.best, (s, -order, candidate))
        elif self.best[0][0] < s:
            heapq.heapreplace(self.best, (s, -order, candidate))

    def pending(self) -> list[OverlayCandidate]:
        """The kept candidates still without masks (read back on resume), each once."""
        found: dict[int, OverlayCandidate] = {}
        for _, _, candidate in self.worst + self.best:
            if candidate.pred_bits is None:
                found.setdefault(id(candidate), candidate)
        return list(found.values())

    def result(self) -> dict[str, list[OverlayCandidate]]:
        """Sorted candidates; any still without masks (unloadable on resume) are left out."""
        return {"worst": sorted((c for _, _, c in self.worst if c.pred_bits is not None),
                                key=lambda c: c.score),
                "best": sorted((c for _, _, c in self.best if c.pred_bits is not None),
                               key=lambda c: -c.score)}


def save_overlays(
    candidates: dict[str, list[OverlayCandidate]],
    records: Sequence[SegRecord],
    out_dir: str | os.PathLike,
    max_pixels: int | None = None,
) -> list[Path]:
    """Render the kept candidates as PNGs (:func:`keyseg.visualize.render_overlay`: the
    image with the prediction in red, the target outline in green and ignored pixels
    darkened); ``index.json`` lists them.

    Returns:
        the written PNG paths.
    """
    from PIL import Image

    from keyseg.evaluate.batches import load_record
    from keyseg.io import atomic_write_bytes, atomic_write_json
    from keyseg.visualize import png_bytes, render_overlay

    out = Path(out_dir)
    written: list[Path] = []
    index: list[dict] = []
    for kind, items in candidates.items():
        for rank, cand in enumerate(items):
            _, image = load_record(records, cand.record_index, max_pixels)
            pred, target, ignore = cand.masks()
            canvas = render_overlay(np.asarray(image), pred.any(0), target.any(0),
                                    ignore.any(0))
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in cand.sample_id)
            path = out / f"{kind}_{rank:03d}_iou{cand.score:.3f}_{safe[-80:]}.png"
            atomic_write_bytes(path, png_bytes(Image.fromarray(canvas)))
            written.append(path)
            index.append({"file": path.name, "kind": kind, "rank": rank, "iou": cand.score,
                          "id": cand.sample_id, "query": cand.query, "answer": cand.answer})
    if index:
        atomic_write_json(out / "index.json", index)
    return written
