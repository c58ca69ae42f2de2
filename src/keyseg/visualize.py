"""Overlays and the files a segmentation run writes.

Two overlays, drawn with the same tint and outline: :func:`overlay_masks` (one colour per
mask: ``keyseg segment``, the demo) and :func:`render_overlay` (a prediction against its
target: ``keyseg eval --save-overlays``).

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
        colour = mask_colour(index)
        _tint(base, mask, colour, alpha)
        if outline:
            _tint(base, mask_outline(mask), colour, 1.0)
    return Image.fromarray(_to_uint8(base))


#: :func:`render_overlay`'s colours: the prediction's tint and the target's outline.
PREDICTION_COLOUR: tuple[int, int, int] = (255, 40, 40)
TARGET_COLOUR: tuple[int, int, int] = (40, 255, 40)
#: How much of an ignored pixel's brightness :func:`render_overlay` keeps.
IGNORE_BRIGHTNESS = 0.4


def render_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray,
                   ignore: np.ndarray | None = None) -> np.ndarray:
    """A prediction against its target: ``image (H, W, 3)`` uint8 with ``pred (H, W)``
    tinted red, the outline of ``target (H, W)`` in green and ``ignore (H, W)`` darkened
    -> ``(H, W, 3)`` uint8.

    Raises:
        ValueError: a mask whose size is not the image's (both sizes quoted).
    """
    base = np.asarray(image, dtype=np.float32).copy()
    for mask in (pred, target) + ((ignore,) if ignore is not None else ()):
        if mask.shape != base.shape[:2]:
            raise ValueError(f"mask {mask.shape} does not match the image {base.shape[:2]}")
    if ignore is not None:
        _tint(base, ignore.astype(bool), (0, 0, 0), 1.0 - IGNORE_BRIGHTNESS)
    _tint(base, pred.astype(bool), PREDICTION_COLOUR, 0.5)
    _tint(base, mask_outline(target.astype(bool)), TARGET_COLOUR, 1.0)
    return _to_uint8(base)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The boundary of ``mask (H, W)`` bool: its pixels with a neighbour (of 8) outside it;
    the image border does not count as outside. -> ``(H, W)`` bool."""
    if not mask.any():
        return mask
    inner = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255)
                       .filter(ImageFilter.MinFilter(3))) > 0
    return mask & ~inner


def _tint(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int],
          alpha: float) -> None:
    """Blend ``colour`` over ``canvas (H, W, 3)`` float32 where ``mask (H, W)``, in place;
    ``alpha = 1`` paints it."""
    if alpha == 1.0:
        canvas[mask] = np.array(colour, dtype=np.float32)
    else:
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * np.array(colour, dtype=np.float32)


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    """``canvas`` float rounded to uint8 (clipped to 0..255)."""
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


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
