"""Mask and keyword losses (SPEC §3).

All mask losses take logits ``(n, H, W)``, float targets ``(n, H, W)`` in {0, 1} and an
optional boolean ``valid`` mask ``(n, H, W)`` (False = ignored pixel); they return the sum
over masks divided by ``num_masks`` so that a batch's loss is a mean over its masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_ce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over (valid) pixels per mask.

    Args:
        logits: ``(n, H, W)`` mask logits.
        targets: ``(n, H, W)`` in {0, 1}.
        num_masks: divisor (number of masks in the batch).
        valid: ``(n, H, W)`` bool, pixels to count; None counts all.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    loss = loss.flatten(1)
    if valid is None:
        per_mask = loss.mean(1)
    else:
        weight = valid.flatten(1).to(loss.dtype)
        per_mask = (loss * weight).sum(1) / weight.sum(1).clamp_min(1.0)
    return per_mask.sum() / (num_masks + 1e-8)


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float,
    valid: torch.Tensor | None = None,
    scale: float = 1000.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``1 - (2 Σ p·t + eps) / (Σ p + Σ t + eps)`` per mask on ``p = sigmoid(logits)``.

    Sums are divided by ``scale`` (the reference's 1000), which only changes the relative
    weight of ``eps``: an empty target with an empty prediction scores ~0.
    """
    probs = logits.sigmoid().flatten(1)
    targets = targets.to(probs.dtype).flatten(1)
    if valid is not None:
        weight = valid.flatten(1).to(probs.dtype)
        probs, targets = probs * weight, targets * weight
    # Dividing by ``scale`` leaves the ratio unchanged except for the weight of ``eps``.
    numerator = 2 * (probs / scale * targets).sum(-1)
    denominator = (probs / scale).sum(-1) + (targets / scale).sum(-1)
    per_mask = 1 - (numerator + eps) / (denominator + eps)
    return per_mask.sum() / (num_masks + 1e-8)


def keyword_logits(
    key_embeddings: torch.Tensor, table: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cosine similarity / T between ``[KEY]`` rows ``(m, d)`` and table rows ``(V, d)``
    -> ``(m, V)``."""
    key = F.normalize(key_embeddings.float(), dim=-1)
    table = F.normalize(table.float(), dim=-1)
    return key @ table.t() / temperature


def keyword_alignment_loss(
    key_embeddings: torch.Tensor,
    projected_table: torch.Tensor,
    keyword_ids: list[torch.Tensor],
    temperature: float = 0.07,
    target: str = "first",
    ignore_ids: tuple[int, ...] = (),
    exclude_ids: tuple[int, ...] = (),
) -> torch.Tensor:
    """Align each ``[KEY]`` embedding with its keyword in the projected embedding table.

    Args:
        key_embeddings: ``(m, d)`` ``[KEY]`` embeddings (after the text projection).
        projected_table: ``(V, d)`` the LM input-embedding table through the trainable
            ``H -> d`` projection.
        keyword_ids: ``m`` 1-D long tensors, the keyword's token ids for each ``[KEY]``.
        temperature: softmax temperature T (reference 0.07).
        target: ``"first"`` (reference): cross-entropy against the keyword's first token;
            ``"all"``: multi-positive — ``-log Σ_{t ∈ keyword} softmax_t``.
        ignore_ids: token ids never used as targets (padding, BOS, ...).
        exclude_ids: table rows that are not classes of the softmax (the image
            placeholder), so the classes are exactly the reference's vocabulary.

    Returns:
        Scalar mean over the ``[KEY]`` rows that have a usable target (0 if none).
    """
    rows, targets = [], []
    for row, ids in enumerate(keyword_ids):
        ids = [int(i) for i in ids.tolist() if int(i) not in ignore_ids]
        if ids:
            rows.append(row)
            targets.append(ids[:1] if target == "first" else ids)
    if not rows:
        return key_embeddings.sum() * 0.0 + projected_table.sum() * 0.0
    logits = keyword_logits(key_embeddings[rows], projected_table, temperature)
    excluded = [i for i in exclude_ids if i < logits.shape[-1]]
    if excluded:
        not_class = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        not_class[excluded] = True
        logits = logits.masked_fill(not_class, float("-inf"))
    log_probs = logits.log_softmax(-1)
    losses = [-torch.logsumexp(log_probs[i, ids], dim=0) for i, ids in enumerate(targets)]
    return torch.stack(losses).mean()
