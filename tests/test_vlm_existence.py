"""experiments/vlm_existence.py: what a VLM's image tokens know about presence (issue #16)."""

from __future__ import annotations

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
