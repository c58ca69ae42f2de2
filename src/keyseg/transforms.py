"""SAM's and SAM 2's input transforms, owned by the processor (:mod:`keyseg.processor`).

``sam_preprocess`` is SAM's own input transform (SPEC §2.1): resize so the longest side is
``target_length`` (aspect kept, rounding as segment-anything's ``ResizeLongestSide``),
normalise with SAM's pixel mean/std, zero-pad bottom/right to a square. It returns the sizes
needed to map low-resolution masks back to the original image (the model's
``SamSegmenter.postprocess_masks`` undoes it). ``sam2_preprocess`` is SAM 2's square resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keyseg.errors import KeySegDataError
from keyseg.images import as_rgb_image

#: SAM's pixel statistics (0-255 scale), from the official segment-anything release.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamInput:
    """One image prepared for SAM's image encoder.

    Attributes:
        pixel_values: ``(3, S, S)`` float32, normalised, zero-padded bottom/right;
            ``S = target_length``.
        resized_size: ``(h, w)`` of the image content inside the padded square.
        original_size: ``(H, W)`` of the input image (masks are resized back to this).
    """

    pixel_values: torch.Tensor
    resized_size: tuple[int, int]
    original_size: tuple[int, int]


def sam_resized_size(height: int, width: int, target_length: int = 1024) -> tuple[int, int]:
    """``(h, w)`` after scaling ``(height, width)`` so its longest side is ``target_length``.

    Rounds half up (``int(x * scale + 0.5)``) like segment-anything's ``ResizeLongestSide``,
    so masks un-pad to exactly the size SAM saw. A side never rounds down to 0 (a 3x1000
    strip still keeps one row), which segment-anything does not guard against.
    """
    if height <= 0 or width <= 0:
        raise KeySegDataError(f"image size must be positive, got {height}x{width}")
    scale = target_length / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _normalised(rgb: Image.Image, mean: tuple[float, float, float],
                std: tuple[float, float, float]) -> torch.Tensor:
    """``(3, h, w)`` float32 ``(pixel - mean) / std`` of an RGB image (0-255 statistics)."""
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean_t) / std_t


def sam_preprocess(
    image: str | Path | Image.Image | np.ndarray,
    target_length: int = 1024,
    mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
    std: tuple[float, float, float] = SAM_PIXEL_STD,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> SamInput:
    """SAM's input transform: resize longest side, normalise, zero-pad to a square.

    Args:
        image: anything :func:`as_rgb_image` accepts (``(H, W, 3)`` uint8 array, PIL, path).
        target_length: side ``S`` of the square SAM input (1024 for the released SAM models).
        mean, std: per-channel statistics on the 0-255 scale.
        resample: Pillow filter for the resize. Note segment-anything's ``apply_image`` calls
            ``PIL.Image.resize`` with Pillow's default filter (bicubic); bilinear is our default.

    Returns:
        :class:`SamInput` with ``pixel_values`` ``(3, S, S)`` float32; padding is 0 *after*
        normalisation, as SAM's ``preprocess`` pads.
    """
    rgb = as_rgb_image(image)
    width, height = rgb.size
    new_h, new_w = sam_resized_size(height, width, target_length)
    resized = rgb if (new_w, new_h) == (width, height) else rgb.resize((new_w, new_h), resample)
    padded = torch.zeros(3, target_length, target_length, dtype=torch.float32)
    padded[:, :new_h, :new_w] = _normalised(resized, mean, std)
    return SamInput(pixel_values=padded, resized_size=(new_h, new_w), original_size=(height, width))


def sam2_preprocess(
    image: str | Path | Image.Image | np.ndarray,
    target_length: int = 1024,
    mean: tuple[float, float, float] = SAM_PIXEL_MEAN,
    std: tuple[float, float, float] = SAM_PIXEL_STD,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> SamInput:
    """SAM 2's input transform: resize to ``S x S`` (aspect not kept, no padding) and
    normalise (SAM 2 uses the same ImageNet statistics as SAM).

    Returns:
        :class:`SamInput` with ``pixel_values`` ``(3, S, S)`` float32 and
        ``resized_size = (S, S)``, so mask post-processing (upsample to ``S``, crop nothing,
        resize to the original size) undoes exactly this transform.
    """
    rgb = as_rgb_image(image)
    width, height = rgb.size
    if (width, height) != (target_length, target_length):
        rgb = rgb.resize((target_length, target_length), resample)
    return SamInput(
        pixel_values=_normalised(rgb, mean, std),
        resized_size=(target_length, target_length),
        original_size=(height, width),
    )
