"""experiments/pretrain_sam.py (issue #16, stage 1): SAM-style promptable pretraining on the
shapes world runs a few steps on CPU and writes loadable weights and its metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from helpers import experiment_module

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "pretrain_sam.py"


def _module():
    return experiment_module("pretrain_sam")


def test_visible_masks_are_disjoint_and_cover_every_shape_pixel():
    from keyseg.data.shapes import ShapesDataset, objects_from_meta, render_object_mask

    record = ShapesDataset("val")[0]
    masks = _module().visible_masks(record)
    assert masks.shape[0] == len(objects_from_meta(record.meta))
    assert int(masks.sum(0).max()) == 1  # each pixel belongs to at most one object
    drawn = np.zeros_like(masks[0])
    for obj in objects_from_meta(record.meta):
        drawn |= render_object_mask(obj, record.image.size[0])
    assert np.array_equal(masks.any(0), drawn)


def test_losses_vanish_for_a_perfect_mask_and_a_right_iou_head():
    losses = _module().losses
    target = torch.zeros(2, 8, 8)
    target[0, 2:5, 2:5] = 1
    target[1, 0:3, 4:8] = 1
    perfect = (target * 2 - 1) * 30.0  # confident logits of the right sign
    focal, dice, iou, bce = losses(perfect, target, torch.ones(2))
    assert float(focal) < 1e-6 and float(dice) < 0.1 and float(iou) < 1e-9
    assert float(bce) < 1e-9
    wrong = -perfect
    focal_w, dice_w, iou_w, bce_w = losses(wrong, target, torch.ones(2))
    assert focal_w > focal and dice_w > 0.9 and float(iou_w) == 1.0  # real IoU 0, predicted 1
    assert abs(float(bce_w) - 30.0) < 1e-3  # BCE of a confident wrong logit is |logit|


def test_a_few_steps_write_loadable_weights_and_metrics(tmp_path):
    from transformers import SamModel

    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "2", "--images-per-step",
         "2", "--eval-images", "2", "--log-every", "1", "--prompts-per-object", "2",
         "--bce-weight", "1", "--val-every", "2", "--val-images", "2",
         "--concepts-per-image", "2", "--patch-loss-weight", "1", "--kind-on-objects",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert all(h["probe"] > 0 for h in metrics["history"])  # the embedding probe trained
    assert metrics["args"]["kind_on_objects"] is True
    assert [c["step"] for c in metrics["val_curve"]] == [2]
    assert 0.0 <= metrics["val_curve"][0]["val_concept_miou"] <= 1.0
    assert 0.0 <= metrics["concept"]["miou"] <= 1.0 and metrics["concept"]["concepts"] >= 1
    assert (tmp_path / "concepts.safetensors").is_file()
    for kind in ("point", "box"):
        assert 0.0 <= metrics[kind]["miou"] <= 1.0 and metrics[kind]["objects"] >= 2
    first = SamModel.from_pretrained(tmp_path / "sam")
    assert isinstance(first, SamModel)
    # a continuation starts from those weights (and the IoU-head correlation is a number)
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--steps", "2", "--images-per-step",
         "1", "--eval-images", "1", "--lr", "0", "--init", str(tmp_path / "sam"), "--out",
         str(tmp_path / "more")], capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    second = SamModel.from_pretrained(tmp_path / "more" / "sam")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # lr 0: nothing moved


def test_concept_targets_are_the_union_of_the_objects_named():
    module = _module()
    red, blue = module.COLOUR_INDEX["red"], module.COLOUR_INDEX["blue"]
    circle, star = module.KIND_INDEX["circle"], module.KIND_INDEX["star"]
    target = torch.zeros(3, 4, 4)
    target[0, 0, 0] = target[1, 1, 1] = target[2, 2, 2] = 1  # one pixel per object
    sample = {"concepts": [(red, circle), (red, star), (blue, circle)], "target": target}

    pairs, masks = module.concept_queries(sample, np.random.default_rng(0), 0, exact=True)
    assert pairs.tolist() == [[red, circle], [red, star], [blue, circle]]
    assert torch.equal(masks, target)  # each exact concept is its own object here

    class Fixed:  # an rng with given uniform draws; integer draws pick index 0
        def __init__(self, *draws):
            self.draws = list(draws)

        def random(self):
            return self.draws.pop(0)

        def integers(self, n):
            return 0

    def one(form):  # first draw 0.5: not an absent pair; second: the form
        return module.concept_queries(sample, Fixed(0.5, form), 1)

    _, by_colour = one(0.6)  # "red" (any kind): objects 0 and 1
    assert by_colour[0].sum() == 2 and by_colour[0, 0, 0] == by_colour[0, 1, 1] == 1
    pairs, by_kind = one(0.9)  # "circle" (any colour): objects 0 and 2
    assert pairs.tolist() == [[module.ANY_COLOUR, circle]]
    assert by_kind[0].sum() == 2 and by_kind[0, 2, 2] == 1
    pairs, both = one(0.1)  # colour and kind: object 0 only
    assert pairs.tolist() == [[red, circle]] and torch.equal(both[0], target[0])
    # a random pair (first draw < 1/8): colour 0 and kind 0 here
    pairs, drawn = module.concept_queries(sample, Fixed(0.0), 1)
    assert pairs.tolist() == [[0, 0]]
    present = [i for i, pair in enumerate(sample["concepts"]) if pair == (0, 0)]
    assert torch.equal(drawn[0], target[present].amax(0) if present else torch.zeros(4, 4))
    lacking = {"concepts": [(blue, star)], "target": target[:1]}
    _, empty = module.concept_queries(lacking, Fixed(0.0), 1)
    assert (blue, star) != (0, 0) and empty.sum() == 0  # a pair the image lacks: empty
