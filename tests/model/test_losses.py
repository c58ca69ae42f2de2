"""Loss functions against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
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
    """Rows whose keyword is empty or only ignored ids are left out; with none left the
    loss is a zero that still reaches both inputs (so DDP sees every parameter used)."""
    for keyword_ids in ([torch.tensor([0])], [torch.zeros(0, dtype=torch.long)],
                        [torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long)]):
        table = torch.randn(5, 4, requires_grad=True)
        key = torch.randn(len(keyword_ids), 4, requires_grad=True)
        loss = keyword_alignment_loss(key, table, keyword_ids, ignore_ids=(0,))
        assert loss.shape == () and float(loss.detach()) == 0.0
        assert loss.requires_grad
        loss.backward()
        assert key.grad is not None and table.grad is not None
        assert torch.equal(key.grad, torch.zeros_like(key))
        assert torch.equal(table.grad, torch.zeros_like(table))


def test_keyword_loss_mean_is_over_rows_with_a_target_only():
    torch.manual_seed(0)
    key, table = torch.randn(3, 8), torch.randn(10, 8)
    logp = (torch.nn.functional.normalize(key, dim=-1)
            @ torch.nn.functional.normalize(table, dim=-1).T / 0.07).log_softmax(-1)
    ids = [torch.tensor([0, 4]), torch.tensor([0]), torch.tensor([6])]
    got = keyword_alignment_loss(key, table, ids, ignore_ids=(0,))
    # row 1 has only the ignored id; row 0's first usable id is 4
    assert math.isclose(float(got), float(-(logp[0, 4] + logp[2, 6]) / 2), rel_tol=1e-5)


def test_keyword_loss_excluded_rows_are_not_classes():
    torch.manual_seed(0)
    key, table = torch.randn(1, 8), torch.randn(6, 8)
    table[2] = key[0] * 3  # the most similar row, excluded from the softmax
    scaled = (torch.nn.functional.normalize(key, dim=-1)
              @ torch.nn.functional.normalize(table, dim=-1).T / 0.5)[0]
    keep = torch.tensor([0, 1, 3, 4, 5])
    expected = -(scaled[4] - torch.logsumexp(scaled[keep], 0))
    got = keyword_alignment_loss(key, table, [torch.tensor([4])], temperature=0.5,
                                 exclude_ids=(2, 99))
    assert math.isclose(float(got), float(expected), rel_tol=1e-5)
    with_image = keyword_alignment_loss(key, table, [torch.tensor([4])], temperature=0.5)
    assert float(with_image) > float(got) + 0.1


def test_mask_losses_ignore_invalid_pixels_and_average_over_num_masks():
    logits = torch.tensor([[[2.0, -3.0, 40.0]], [[-1.0, 1.0, -40.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 1.0]]])
    valid = torch.tensor([[[True, True, False]], [[True, True, False]]])

    def bce(x, t):
        p = 1 / (1 + math.exp(-x))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))

    per_mask = [(bce(2, 1) + bce(-3, 0)) / 2, (bce(-1, 0) + bce(1, 1)) / 2]
    got = sigmoid_ce_loss(logits, target, num_masks=4, valid=valid)
    assert math.isclose(float(got), sum(per_mask) / 4, rel_tol=1e-5)
    # a mask whose pixels are all invalid contributes 0 (not NaN)
    none_valid = sigmoid_ce_loss(logits, target, 2, torch.zeros_like(valid))
    assert float(none_valid) == 0.0

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def dice(ps, ts, s=1000.0, eps=1e-6):
        inter = 2 * sum(p * t for p, t in zip(ps, ts, strict=True)) / s
        return 1 - (inter + eps) / ((sum(ps) + sum(ts)) / s + eps)

    expected = (dice([sig(2), sig(-3)], [1, 0]) + dice([sig(-1), sig(1)], [0, 1])) / 4
    got_dice = dice_loss(logits, target, num_masks=4, valid=valid)
    assert math.isclose(float(got_dice), expected, rel_tol=1e-4)
    assert math.isclose(float(dice_loss(logits, target, 4, valid, scale=1.0, eps=0.5)),
                        (dice([sig(2), sig(-3)], [1, 0], 1.0, 0.5)
                         + dice([sig(-1), sig(1)], [0, 1], 1.0, 0.5)) / 4, rel_tol=1e-4)


def test_mask_losses_accept_integer_and_boolean_targets():
    logits = torch.tensor([[[0.5, -2.0], [3.0, -0.1]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    for other in (target.bool(), target.to(torch.uint8)):
        assert torch.equal(sigmoid_ce_loss(logits, other, 1), sigmoid_ce_loss(logits, target, 1))
        assert torch.equal(dice_loss(logits, other, 1), dice_loss(logits, target, 1))


def test_dice_default_scale_is_the_reference_1000():
    """With one half-on pixel and no target the score is 1 - eps / (0.5 / scale + eps):
    only the scale sets how far from 1 it is."""
    logits = torch.zeros(1, 1, 1, dtype=torch.float64)
    target = torch.zeros(1, 1, 1, dtype=torch.float64)
    expected = 1 - 1e-6 / (0.5 / 1000 + 1e-6)
    # (1001 would give 0.998002; the num_masks epsilon moves it by 1e-8)
    assert math.isclose(float(dice_loss(logits, target, 1)), expected, rel_tol=1e-7)


def test_keyword_loss_all_target_sums_the_probabilities_of_every_keyword_token():
    """Two equally likely keyword tokens: "all" gives -log(p3 + p5) = "first" - log 2."""
    torch.manual_seed(0)
    key = torch.randn(1, 8)
    table = torch.randn(10, 8)
    table[3] = table[5] = key[0]
    ids = [torch.tensor([3, 5])]
    first = keyword_alignment_loss(key, table, ids, temperature=0.5, target="first")
    every = keyword_alignment_loss(key, table, ids, temperature=0.5, target="all")
    assert math.isclose(float(first) - float(every), math.log(2), rel_tol=1e-5)


def test_keyword_loss_excluded_id_at_the_table_edge():
    """An excluded id equal to the table size is no row of it (ignored, not an error)."""
    torch.manual_seed(0)
    key, table = torch.randn(1, 8), torch.randn(6, 8)
    ids = [torch.tensor([4])]
    torch.testing.assert_close(
        keyword_alignment_loss(key, table, ids, exclude_ids=(6, 7)),
        keyword_alignment_loss(key, table, ids))


@pytest.mark.cuda
def test_keyword_loss_on_cuda_equals_cpu():
    torch.manual_seed(0)
    key, table = torch.randn(3, 16), torch.randn(40, 16)
    ids = [torch.tensor([3, 5]), torch.tensor([0]), torch.tensor([7])]
    cpu = keyword_alignment_loss(key, table, ids, ignore_ids=(0,), exclude_ids=(9,))
    gpu = keyword_alignment_loss(key.cuda(), table.cuda(), ids, ignore_ids=(0,),
                                 exclude_ids=(9,))
    torch.testing.assert_close(gpu.cpu(), cpu)


def test_keyword_loss_default_target_is_the_first_token():
    torch.manual_seed(0)
    key, table = torch.randn(1, 8), torch.randn(10, 8)
    table[3] = table[5] = key[0]
    ids = [torch.tensor([3, 5])]
    default = keyword_alignment_loss(key, table, ids)
    assert torch.equal(default, keyword_alignment_loss(key, table, ids, target="first"))
    assert not torch.allclose(default, keyword_alignment_loss(key, table, ids, target="all"))
