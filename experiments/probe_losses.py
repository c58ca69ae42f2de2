"""The loss of the lab's per-cell colour/kind probes, shared by the stage 1 SAM
(``pretrain_sam.EmbeddingProbe``) and the stage 2 vision tower (``pretrain_vlm.PatchProbe``).

Both stand in for the semantic pretraining real encoders arrive with: a linear colour and a
linear kind classifier on every cell of the encoder's output grid, trained against
``keyseg.data.shapes.cell_labels`` (class 0: background).

``kind_on_objects`` (``--kind-on-objects`` in both scripts): the kind term averages over
the cells an object covers only. Over every cell the background, about nine cells in ten of
a shapes image, dilutes the kind signal tenfold, and the background is told apart by the
colour head already (its class 0). Measured on a 96-wide, 2-layer CLIP tower
(``tower_probe.py``, 1500 steps, lr 3e-3): foreground patch-kind accuracy 0.547 with it,
0.420 without (docs/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def colour_kind_loss(colour_logits: torch.Tensor, kind_logits: torch.Tensor,
                     labels: torch.Tensor, kind_on_objects: bool = False) -> torch.Tensor:
    """Mean of the colour and kind cross-entropies.

    Args:
        colour_logits: ``(N, 7)`` per cell (background + 6 colours).
        kind_logits: ``(N, 9)`` per cell (background + 8 kinds).
        labels: ``(2, N)`` long, the colour and kind of each cell.
        kind_on_objects: the kind term over object cells only; with no object cell at all it
            is 0 (not NaN).
    """
    colour = F.cross_entropy(colour_logits, labels[0])
    kinds = labels[1]
    if kind_on_objects:
        kinds = kinds.masked_fill(kinds == 0, IGNORE)
        if bool((kinds == IGNORE).all()):
            return colour / 2
    return (colour + F.cross_entropy(kind_logits, kinds, ignore_index=IGNORE)) / 2
