"""Overlays: one outline and tint for the per-mask overlay and the evaluation overlay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from keyseg.visualize import (
    PREDICTION_COLOUR,
    TARGET_COLOUR,
    mask_colour,
    mask_outline,
    overlay_masks,
    render_overlay,
)


def _square(size: int = 12, lo: int = 3, hi: int = 9) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_outline_is_the_mask_minus_its_interior():
    mask = _square()
    edge = mask_outline(mask)
    assert edge.sum() == 6 * 6 - 4 * 4 and not (edge & ~mask).any()
    assert not mask_outline(np.zeros((4, 4), bool)).any()


def test_both_overlays_draw_the_same_outline():
    mask = _square()
    black = np.zeros((12, 12, 3), np.uint8)
    per_mask = np.asarray(overlay_masks(Image.fromarray(black), mask[None]))
    evaluation = render_overlay(black, np.zeros_like(mask), mask)
    assert ((per_mask == mask_colour(0)).all(-1) == mask_outline(mask)).all()
    assert ((evaluation == TARGET_COLOUR).all(-1) == mask_outline(mask)).all()


def test_evaluation_overlay_tints_the_prediction_and_darkens_ignored_pixels():
    grey = np.full((12, 12, 3), 100, np.uint8)
    pred, ignore = _square(lo=0, hi=2), _square(lo=10, hi=12)
    out = render_overlay(grey, pred, np.zeros_like(pred), ignore)
    expected = (0.5 * 100 + 0.5 * np.array(PREDICTION_COLOUR) + 0.5).astype(np.uint8)
    assert (out[pred] == expected).all()
    assert (out[ignore] == 40).all() and (out[~pred & ~ignore] == 100).all()
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        render_overlay(grey, np.zeros((3, 3), bool), pred)
