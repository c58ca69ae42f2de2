"""experiments/probe_losses.py: the lab's per-cell colour/kind probe loss, with the kind term
on every cell or on object cells only (issue #16)."""

from __future__ import annotations

import math

import torch

from helpers import experiment_module


def _loss():
    return experiment_module("probe_losses").colour_kind_loss


def _ce(logits: list[float], label: int) -> float:
    """Cross-entropy of one row, written out."""
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_every_cell_averages_both_terms_over_all_cells() -> None:
    colour = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    kind = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([[0, 1, 0], [0, 1, 2]])  # cell 0 background, cells 1-2 objects
    colour_ce = (_ce([2, 0], 0) + _ce([0, 1], 1) + _ce([0.5, 0.5], 0)) / 3
    kind_ce = (_ce([1, 0, 0], 0) + _ce([0, 3, 0], 1) + _ce([0, 0, 2], 2)) / 3
    got = _loss()(colour, kind, labels)
    assert math.isclose(got.item(), (colour_ce + kind_ce) / 2, rel_tol=1e-5)


def test_kind_on_objects_ignores_the_background_cells_kind() -> None:
    colour = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    kind = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([[0, 1, 0], [0, 1, 2]])
    colour_ce = (_ce([2, 0], 0) + _ce([0, 1], 1) + _ce([0.5, 0.5], 0)) / 3
    kind_ce = (_ce([0, 3, 0], 1) + _ce([0, 0, 2], 2)) / 2
    got = _loss()(colour, kind, labels, kind_on_objects=True)
    assert math.isclose(got.item(), (colour_ce + kind_ce) / 2, rel_tol=1e-5)
    # what the kind head says on the background cell no longer matters
    moved = kind.clone()
    moved[0] = torch.tensor([-5.0, 9.0, 4.0])
    assert torch.equal(_loss()(colour, moved, labels, kind_on_objects=True), got)


def test_an_image_with_no_object_cell_gives_the_colour_term_alone_not_nan() -> None:
    colour = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    kind = torch.tensor([[1.0, 0.0], [0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([[0, 0], [0, 0]])
    got = _loss()(colour, kind, labels, kind_on_objects=True)
    assert math.isclose(got.item(), (_ce([2, 0], 0) + _ce([0, 1], 0)) / 2 / 2, rel_tol=1e-5)
    got.backward()
    assert kind.grad is None or not kind.grad.any()
