"""One batch through the model, and one conversation's row.

``teacher`` mode reads the masks of the fed answer (:meth:`KeySegModel.predict`);
``generate`` mode lets the model answer (:func:`keyseg.generation.generate`, greedy). The
``i``-th predicted mask is scored against the ``i``-th target; extra predictions are
ignored, missing ones (including an answer with no ``[SEG]`` at all) score an *empty
prediction* against their target (``I = 0``, ``U = |T|``; 1.0 when the target is empty
too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from keyseg.errors import KeySegDataError
from keyseg.evaluate.batches import EvalItem
from keyseg.metrics import SegMetrics, iou_score

if TYPE_CHECKING:
    from keyseg.batch import Batch
    from keyseg.model.keyseg import KeySegModel


def infer(model: KeySegModel, batch: Batch, items: list[EvalItem], mode: str,
          max_new_tokens: int, generate_kwargs: dict[str, Any]
          ) -> list[tuple[torch.Tensor, str, str | None]]:
    """Per row of ``batch``: ``(masks (n, H, W) logits, answer, keyword)``; in ``teacher``
    mode the answer is the fed one and the keyword the referent's (``None`` for a model
    without ``[KEY]``)."""
    if mode == "teacher":
        masks = model.predict(batch)
        return [(m, item.fed_answer, item.referent.keyword if model.settings.use_keyword else None)
                for m, item in zip(masks, items, strict=True)]
    from keyseg.generation import generate

    results = generate(model, batch, max_new_tokens=max_new_tokens, **generate_kwargs)
    return [(r.masks, r.answer, r.keyword) for r in results]


def used_prediction(pred: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` predictions scored against ``k`` targets: prediction ``i`` for target ``i``;
    missing predictions are empty (all-negative logits), extra ones dropped."""
    n_pred = int(pred.shape[0])
    if n_pred >= k:
        return pred[:k]
    filler = torch.full((k - n_pred, *pred.shape[1:]), -1.0, dtype=pred.dtype,
                        device=pred.device)
    return torch.cat([pred, filler]) if n_pred else filler


def max_pairwise_iou(pred: torch.Tensor) -> float | None:
    """The largest IoU between two of an answer's ``(n, H, W)`` predicted masks (logits > 0):
    near 1 when a multi-target answer draws one object several times; None for n < 2. Two
    empty masks overlap with IoU 0 (nothing is drawn twice)."""
    if pred.shape[0] < 2:
        return None
    masks = (pred > 0).flatten(1).float()
    inter = masks @ masks.T
    area = masks.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    iou.fill_diagonal_(0)
    return float(iou.max())


def score(item: EvalItem, pred: torch.Tensor, answer: str, keyword: str | None
          ) -> tuple[dict[str, Any], torch.Tensor, np.ndarray]:
    """Score one conversation: its JSONL row, the ``(k, H, W)`` logits scored and the
    ``(k, H, W)`` target. The row is added to the totals by
    :meth:`keyseg.evaluate.totals.Totals.add_row`.

    ``pred``: ``(n_pred, H, W)`` logits; prediction ``i`` is matched with target ``i``
    (:func:`used_prediction`).

    Raises:
        KeySegDataError: predicted masks of another size than the target's (both quoted).
    """
    target = np.asarray(item.conversation.target_masks)
    k, n_pred = int(target.shape[0]), int(pred.shape[0])
    used = used_prediction(pred, k)
    if tuple(used.shape[1:]) != tuple(target.shape[1:]):
        raise KeySegDataError(
            f"{item.conversation.sample_id}: predicted masks {tuple(used.shape[1:])} do not "
            f"match the target size {tuple(target.shape[1:])}"
        )
    pairs = SegMetrics().update(used, target)
    row = {
        "id": item.conversation.sample_id,
        "record": item.record_id,
        "source": item.source,
        "index": item.record_index,
        "ref": item.ref_index,
        "queries": item.queries,
        "record_issues": item.issues,
        "query": item.referent.text,
        "question": item.conversation.turns[-1].question,
        "answer": answer,
        "keyword": keyword,
        "target_keyword": item.referent.keyword,
        "difficulty": item.referent.difficulty,
        "n_target": k,
        "n_pred": n_pred,
        "no_seg": n_pred == 0,
        "I": [i for i, _ in pairs],
        "U": [u for _, u in pairs],
        "iou": sum(iou_score(i, u) for i, u in pairs) / len(pairs),
        "max_pred_overlap": max_pairwise_iou(pred[:k]),
    }
    return row, used, target
