"""Loss functions against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import torch

from keyseg.model.losses import dice_loss, keyword_alignment_loss, sigmoid_ce_loss


def test_sigmoid_ce_matches_hand_computation():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    expected = (bce(0, 1) + bce(2, 0) + bce(-1, 0) + bce(3, 1)) / 4
    assert math.isclose(float(sigmoid_ce_loss(logits, target, num_masks=1)), expected, rel_tol=1e-5)
    # two masks, divided by num_masks
    both = sigmoid_ce_loss(logits.repeat(2, 1, 1), target.repeat(2, 1, 1), num_masks=2)
    assert math.isclose(float(both), expected, rel_tol=1e-5)


def test_ignored_pixels_do_not_count():
    logits = torch.tensor([[[0.0, 50.0]]])
    target = torch.tensor([[[1.0, 0.0]]])
    valid = torch.tensor([[[True, False]]])
    expected = math.log(2)  # only the first pixel: p = 0.5, t = 1
    assert math.isclose(float(sigmoid_ce_loss(logits, target, 1, valid)), expected, rel_tol=1e-5)


def test_dice_matches_hand_computation():
    logits = torch.tensor([[[0.0, 0.0], [100.0, -100.0]]])  # p = .5, .5, 1, 0
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    s, eps = 1000.0, 1e-6
    inter = 2 * (0.5 * 1 + 1 * 1) / s
    denom = (0.5 + 0.5 + 1) / s + 2 / s
    expected = 1 - (inter + eps) / (denom + eps)
    assert math.isclose(float(dice_loss(logits, target, 1)), expected, rel_tol=1e-4)


def test_dice_is_zero_for_perfect_and_near_one_for_disjoint():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    perfect = target * 200 - 100
    assert float(dice_loss(perfect, target, 1)) < 1e-3
    assert float(dice_loss(-perfect, target, 1)) > 0.99


def test_keyword_loss_matches_cross_entropy_of_cosine_logits():
    torch.manual_seed(0)
    key = torch.randn(2, 8)
    table = torch.randn(10, 8)
    targets = [torch.tensor([3, 5]), torch.tensor([7])]
    t = 0.07
    normalize = torch.nn.functional.normalize
    cos = normalize(key, dim=-1) @ normalize(table, dim=-1).T
    expected = torch.nn.functional.cross_entropy(cos / t, torch.tensor([3, 7]))
    got = keyword_alignment_loss(key, table, targets, temperature=t, target="first")
    assert math.isclose(float(got), float(expected), rel_tol=1e-5)
    # multi-positive: -log(p3 + p5) for row 0
    logp = (cos / t).log_softmax(-1)
    multi = (-torch.logaddexp(logp[0, 3], logp[0, 5]) - logp[1, 7]) / 2
    got_all = keyword_alignment_loss(key, table, targets, temperature=t, target="all")
    assert math.isclose(float(got_all), float(multi), rel_tol=1e-5)


def test_keyword_loss_is_lowest_when_key_is_the_keyword_embedding():
    torch.manual_seed(0)
    table = torch.randn(50, 16)
    target = [torch.tensor([17])]
    exact = keyword_alignment_loss(table[17:18].clone(), table, target)
    for other in torch.randn(20, 1, 16):
        assert float(exact) < float(keyword_alignment_loss(other, table, target))


def test_keyword_loss_skips_padding_targets_and_handles_none():
    table = torch.randn(5, 4, requires_grad=True)
    key = torch.randn(1, 4, requires_grad=True)
    loss = keyword_alignment_loss(key, table, [torch.tensor([0])], ignore_ids=(0,))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph
