"""experiments/seg_prompts.py: the [SEG] prompt similarity of multi-target answers, checked
where the answer is known from the fusion's definition."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import experiment_module
from keyseg.build import build_keyseg
from keyseg.model.tiny import tiny_model_config


def _module():
    return experiment_module("seg_prompts")


@pytest.fixture(scope="module")
def items():
    found = _module().multi_target_items("test", records=40, use_keyword=True)
    assert found and all(item.referent.masks.shape[0] >= 2 for item in found)
    return found[:3]


def _model(variant: str):
    torch.manual_seed(0)
    return build_keyseg(tiny_model_config(variant=variant))


def test_mean_pairwise_cosine() -> None:
    cosine = _module().mean_pairwise_cosine
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    assert cosine(rows) == pytest.approx((0.0 - 1.0 + 0.0) / 3)


def test_reference_fusion_makes_every_prompt_of_an_answer_the_same(items) -> None:
    """With one [KEY], the reference fusion's output does not depend on [SEG] (SPEC 2.4), so
    the fused rows of an answer are identical whatever the LM gave."""
    results = _module().measure(_model("reference"), items)
    assert len(results) == len(items)
    for row in results:
        assert row["answer"].count("[SEG]") >= 2 and row["answer"].count("[KEY]") == 1
        assert row["fused"] == pytest.approx(1.0, abs=1e-5)
        assert row["projected"] < 0.9999  # the rows did differ before the fusion
        assert row["mask_overlap"] is not None and 0.0 <= row["mask_overlap"] <= 1.0


def test_without_fusion_the_prompts_are_the_projected_states(items) -> None:
    results = _module().measure(_model("none"), items)
    summary = _module().summary(results)
    assert summary["answers"] == len(items)
    for row in results:
        assert row["fused"] == row["projected"]
        assert -1.0 <= row["lm"] <= 1.0


def test_summary_splits_answers_by_what_their_shapes_share() -> None:
    seg = _module()
    rows = [
        {"keyword": "star", "lm": 0.2, "projected": 0.4, "fused": 0.6, "mask_overlap": 0.0},
        {"keyword": "star", "lm": 0.4, "projected": 0.6, "fused": 0.8, "mask_overlap": 0.2},
        {"keyword": "blue", "lm": 1.0, "projected": 1.0, "fused": 1.0, "mask_overlap": 1.0},
        {"keyword": "shapes with holes", "lm": 0.0, "projected": 0.0, "fused": 0.0,
         "mask_overlap": 0.0},  # a clue: neither group, in the overall means only
    ]
    result = seg.summary(rows)
    assert result["answers"] == 4 and result["lm"] == pytest.approx(0.4)
    assert set(result["by_group"]) == {"colour", "kind"}
    assert result["by_group"]["kind"]["answers"] == 2
    assert result["by_group"]["kind"]["lm"] == pytest.approx(0.3)
    assert result["by_group"]["kind"]["mask_overlap"] == pytest.approx(0.1)
    assert result["by_group"]["colour"] == {"answers": 1, "lm": 1.0, "projected": 1.0,
                                            "fused": 1.0, "mask_overlap": 1.0}


def test_the_cli_measures_a_fresh_model_from_a_config_or_refuses_both(tmp_path) -> None:
    root = Path(__file__).resolve().parents[1]
    script = root / "experiments" / "seg_prompts.py"
    out = tmp_path / "fresh.json"
    done = subprocess.run(
        [sys.executable, str(script), "--config", str(root / "configs" / "tiny-shapes.yaml"),
         "--records", "40", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["checkpoint"] is None and record["config"].endswith("tiny-shapes.yaml")
    assert record["summary"]["answers"] >= 1 and -1.0 <= record["summary"]["lm"] <= 1.0
    both = subprocess.run([sys.executable, str(script), str(tmp_path), "--config", "x.yaml"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert both.returncode == 2 and "exactly one" in both.stderr
