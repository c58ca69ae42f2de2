"""Overlays (one colour per mask) and the files a segmentation run writes.

``save_result`` is what ``keyseg segment``/``chat``/``batch`` write for one answer:
``mask_K.png`` (binary, 0/255, original image size; ``K`` from 0 in ``[SEG]`` order),
``overlay.png`` and ``result.json``, each written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from keyseg.io import atomic_write_bytes, atomic_write_json

#: Distinct, colour-blind-friendly colours (Okabe-Ito order), cycled for many masks.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (120, 120, 120),
)


def mask_colour(index: int) -> tuple[int, int, int]:
    """The colour of the ``index``-th mask."""
    return PALETTE[index % len(PALETTE)]


def overlay_masks(image: Image.Image, masks: np.ndarray, alpha: float = 0.5,
                  outline: bool = True) -> Image.Image:
    """Blend each mask in its own colour over ``image``.

    Args:
        image: the RGB image the masks belong to.
        masks: ``(n, H, W)`` bool (or 0/1) at the image's size; ``n`` may be 0.
        alpha: opacity of the fill.
        outline: draw each mask's boundary in the full colour, so touching masks stay
            distinguishable.

    Returns:
        A new RGB image of the same size.
    """
    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    if masks.shape[0] and masks.shape[1:] != base.shape[:2]:
        raise ValueError(f"masks {masks.shape[1:]} do not match the image {base.shape[:2]}")
    for index, mask in enumerate(masks.astype(bool)):
        colour = np.array(mask_colour(index), dtype=np.float32)
        base[mask] = (1 - alpha) * base[mask] + alpha * colour
        if outline and mask.any():
            edge_img = Image.fromarray(mask.astype(np.uint8) * 255)
            inner = np.asarray(edge_img.filter(ImageFilter.MinFilter(3))) > 0
            base[mask & ~inner] = colour
    return Image.fromarray(np.clip(base + 0.5, 0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A binary ``(H, W)`` mask as an 8-bit PNG with values 0 and 255."""
    return png_bytes(Image.fromarray(mask.astype(bool).astype(np.uint8) * 255, mode="L"))


def save_result(out_dir: str | Path, image: Image.Image, result,
                extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``mask_K.png``, ``overlay.png`` and ``result.json`` for one answer.

    Args:
        out_dir: created if missing.
        image: the RGB image that was asked about.
        result: a :class:`keyseg.pipeline.Result`.
        extra: more fields for ``result.json`` (image path, checkpoint, ...).

    Returns:
        ``{"overlay": path, "json": path, "mask_0": path, ...}``. ``result.json`` is
        written last, so its presence means the item is complete (``keyseg batch`` resumes
        on that).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for index, mask in enumerate(result.masks):
        paths[f"mask_{index}"] = out_dir / f"mask_{index}.png"
        atomic_write_bytes(paths[f"mask_{index}"], mask_png_bytes(mask))
    paths["overlay"] = out_dir / "overlay.png"
    atomic_write_bytes(paths["overlay"], png_bytes(overlay_masks(image, result.masks)))
    summary = {**(extra or {}), **result.to_dict(),
               "mask_files": [p.name for k, p in paths.items() if k.startswith("mask_")],
               "overlay": paths["overlay"].name}
    paths["json"] = out_dir / "result.json"
    atomic_write_json(paths["json"], summary)
    return paths
