"""experiments/vlm_existence.py: what a VLM's image tokens know about presence (issue #16)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import experiment_module


def _module():
    return experiment_module("vlm_existence")


def test_concept_labels_mark_kinds_colours_and_pairs_present():
    lab = _module()
    records = [SimpleNamespace(meta={"objects": [{"kind": "star", "colour": "red"},
                                                 {"kind": "ring", "colour": "blue"}]}),
               SimpleNamespace(meta={"objects": [{"kind": "ring", "colour": "red"}]})]
    labels = lab.concept_labels(records)
    assert len(labels) == 8 + 6 + 48
    assert labels["kind:star"].tolist() == [True, False]
    assert labels["kind:ring"].tolist() == [True, True]
    assert labels["colour:blue"].tolist() == [True, False]
    assert labels["pair:red ring"].tolist() == [False, True]  # red and a ring, not a red ring
    assert labels["pair:red star"].tolist() == [True, False]


def test_probe_separates_a_present_feature_and_not_noise():
    lab = _module()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    y = x[:, 2] > 0.8  # present in a quarter of the images, read off one channel
    probe = lab.fit_probe(x[:300], y[:300])
    import torch

    with torch.no_grad():
        pred = probe(torch.from_numpy(x[300:]).float()).squeeze(-1).numpy() > 0
    assert lab.balanced_accuracy(pred, y[300:]) > 0.9
    noise = rng.random(400) < 0.25
    probe = lab.fit_probe(x[:300], noise[:300])
    with torch.no_grad():
        pred = probe(torch.from_numpy(x[300:]).float()).squeeze(-1).numpy() > 0
    assert lab.balanced_accuracy(pred, noise[300:]) == pytest.approx(0.5, abs=0.15)
    assert lab.balanced_accuracy(pred, np.ones(100, dtype=bool)) is None  # one class only


@pytest.mark.parametrize("bare", [False, True])
def test_forced_verdicts_score_the_token_right_after_each_name(monkeypatch, bare):
    """A stub LM head that always prefers the token the teacher-forced answer has next must
    score 1.0 everywhere: each verdict is read at the position that predicts it (one place
    off, it would read a name or a colon and score about chance)."""
    import torch

    from keyseg.build import build_vlm
    from keyseg.config import BackboneConfig

    probe = experiment_module("vlm_existence")
    stage2 = experiment_module("pretrain_vlm")
    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(preset="tiny"))
    encoder = stage2.QAEncoder(tokenizer, image_processor, vlm.config, "A chat.")

    class PeekingLM:
        def eval(self):
            return self

        def __call__(self, input_ids, attention_mask, pixel_values):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 1.0)
            return SimpleNamespace(logits=logits)

    monkeypatch.setattr(probe, "qa_model", lambda path: (PeekingLM(), tokenizer, encoder))
    result = probe.forced_verdicts(None, images=12, bare=bare)
    assert result["existence"]["all"] == 1.0 and result["questions"]["all"] >= 10
    assert result["lookup"] == {"all": 1.0, "colour": 1.0, "kind": 1.0, "pair": 1.0}


def test_the_bare_lookup_wording_needs_the_qa_scores(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "vlm_existence.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--lookup-bare"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--qa" in done.stderr
