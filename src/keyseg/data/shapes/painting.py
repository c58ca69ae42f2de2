"""Painting a scene: a textured background, then each object's visible pixels in its
colour, so masks and image agree pixel for pixel."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from keyseg.data.shapes.geometry import Scene
from keyseg.data.shapes.world import COLOURS


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(S, S, 3)`` float32 textured background in muted (low-saturation) colours."""
    base = (rng.uniform(70, 200) + rng.uniform(-18, 18, size=3)).astype(np.float32)
    style = int(rng.integers(4))
    axis = np.arange(size, dtype=np.float32) / size
    xx, yy = axis[None, :], axis[:, None]  # broadcast to (S, S) only when combined
    if style == 0:  # smooth blotches: low-res noise upsampled
        low = rng.uniform(-25, 25, size=(6, 6)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))
    elif style == 1:  # stripes at a random angle
        t, freq = rng.uniform(0, math.pi), rng.uniform(6, 16)
        pattern = 14 * np.sin(2 * math.pi * freq * (xx * math.cos(t) + yy * math.sin(t)))
    elif style == 2:  # checkerboard
        cells = int(rng.integers(4, 12))
        pattern = 22.0 * (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2)
    else:  # linear gradient
        t = rng.uniform(0, 2 * math.pi)
        pattern = 60 * ((xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t))
    noise = rng.integers(-10, 11, size=(size, size), dtype=np.int8)
    grey = (pattern + noise).astype(np.float32)
    return grey[..., None] + base


def paint_scene(rng: np.random.Generator, scene: Scene, size: int) -> Image.Image:
    """Paint the background, then every object's visible pixels in its (noisy) colour."""
    img = _background(rng, size)
    for obj, vis in zip(scene.objects, scene.visible, strict=True):
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) + rng.uniform(-12, 12)
        n = int(vis.sum())
        img[vis] = colour + rng.integers(-8, 9, size=(n, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
