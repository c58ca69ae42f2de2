"""experiments/sam_semantics.py: what a frozen SAM embedding knows (issue #16 diagnosis)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import experiment_module

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_concept_baselines_score_every_object_and_same_colour_masks():
    module = experiment_module("sam_semantics")
    stage1 = module.stage1
    red, blue = stage1.COLOUR_INDEX["red"], stage1.COLOUR_INDEX["blue"]
    circle, star = stage1.KIND_INDEX["circle"], stage1.KIND_INDEX["star"]
    target = torch.zeros(3, 4, 4)
    target[0, 0, :2] = 1  # red circle: 2 px
    target[1, 1, :2] = 1  # red star: 2 px
    target[2, 2:, :] = 1  # blue circle: 8 px
    sample = {"concepts": [(red, circle), (red, star), (blue, circle)], "target": target}
    scores = module.concept_baselines([sample])
    # every object (12 px): 2/12, 2/12, 8/12; same colour: red pair 2/4 twice, blue 8/8
    assert scores["every_object"] == pytest.approx((2 + 2 + 8) / 12 / 3)
    assert scores["same_colour"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


@pytest.mark.slow  # two interpreters and a tiny SAM: ~30 s on a loaded 2-core machine
def test_a_tiny_sam_is_measured_end_to_end(tmp_path):
    sam_run = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "pretrain_sam.py"), "--preset", "tiny", "--steps",
         "2", "--images-per-step", "1", "--eval-images", "1", "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300, check=False)
    assert sam_run.returncode == 0, sam_run.stderr[-2000:]
    out = tmp_path / "semantics.json"
    run = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "sam_semantics.py"), str(tmp_path / "s" / "sam"),
         "--preset", "tiny", "--train-images", "3", "--val-images", "2", "--steps", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(out.read_text())
    assert 0 <= record["probes"]["colour_accuracy"] <= 1
    assert record["probes"]["foreground_cells"] > 0
    assert [c["step"] for c in record["concept_lookup"]] == [1, 2]


def test_concept_forms_name_each_present_colour_and_kind_once():
    module = experiment_module("sam_semantics")
    stage1 = module.stage1
    red, blue = stage1.COLOUR_INDEX["red"], stage1.COLOUR_INDEX["blue"]
    circle, star = stage1.KIND_INDEX["circle"], stage1.KIND_INDEX["star"]
    target = torch.zeros(4, 4, 4)
    for i in range(4):
        target[i, i, 0] = 1  # one pixel per object
    # two red circles, a red star, a blue circle
    sample = {"concepts": [(red, circle), (red, circle), (red, star), (blue, circle)],
              "target": target}
    forms = module.concept_forms(sample)
    pairs, targets = forms["colour kind"]
    assert pairs.tolist() == [[red, circle], [red, star], [blue, circle]]
    assert targets[0].sum() == 2  # both red circles
    pairs, targets = forms["colour"]
    assert pairs.tolist() == [[red, stage1.ANY_KIND], [blue, stage1.ANY_KIND]]
    assert targets.flatten(1).sum(1).tolist() == [3, 1]
    pairs, targets = forms["kind"]
    assert pairs.tolist() == [[stage1.ANY_COLOUR, circle], [stage1.ANY_COLOUR, star]]
    assert targets.flatten(1).sum(1).tolist() == [3, 1]
    baselines = module.concept_baselines([sample])["every_object_by_form"]
    assert baselines["kind"] == pytest.approx((3 / 4 + 1 / 4) / 2)  # every object: 4 px
