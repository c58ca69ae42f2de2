"""Safe image loading and the SAM input transform.

``load_image`` is the one door through which image files enter KeySeg: it decodes the whole
file (so a truncated JPEG fails here, naming the file, not deep inside a training step),
applies the EXIF orientation, refuses decompression bombs and returns an 8-bit RGB image
whatever the source mode (16-bit grey, palette, CMYK, LA/RGBA, ...).

``sam_preprocess`` is SAM's own input transform (SPEC §2.1): resize so the longest side is
``target_length`` (aspect kept, rounding as segment-anything's ``ResizeLongestSide``),
normalise with SAM's pixel mean/std, zero-pad bottom/right to a square. It returns the sizes
needed to map low-resolution masks back to the original image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from keyseg.errors import KeySegDataError

#: Default pixel limit (width * height) for :func:`load_image`: 64 megapixels, far above any
#: COCO/ReasonSeg image (ReasonSeg's largest are ~25 MP) yet well below what would exhaust memory.
DEFAULT_MAX_PIXELS: int = 64_000_000

#: SAM's pixel statistics (0-255 scale), from the official segment-anything release.
SAM_PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
SAM_PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and orient an image file; return it as 8-bit RGB.

    Args:
        path: the image file.
        max_pixels: refuse images with more than this many pixels (width * height), checked
            from the header before decoding. ``None`` disables this check; Pillow's own
            decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) always stays on.

    Returns:
        A loaded ``PIL.Image`` in mode ``"RGB"``, EXIF orientation applied (so its size is
        the displayed size, which is what polygon annotations refer to).

    Raises:
        KeySegDataError: missing, empty, truncated, not-an-image or too-large file; the
            message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise KeySegDataError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise KeySegDataError(f"{path}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns between MAX_IMAGE_PIXELS and 2x; our own limit is the one we report.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise KeySegDataError(
                        f"{path}: image is {width}x{height} = {width * height} pixels, over the "
                        f"limit of {max_pixels} (raise it with --max-pixels, or "
                        "data.max_image_pixels in training, if the file is trusted)"
                    )
                image.load()  # force the full decode: truncation errors surface here
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except KeySegDataError:
        raise
    except Image.DecompressionBombError as error:
        raise KeySegDataError(f"{path}: refused as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise KeySegDataError(f"{path}: not a readable image file") from error
    except (OSError, SyntaxError, ValueError) as error:
        # Truncated data ("image file is truncated"), broken headers, bad EXIF, ...
        raise KeySegDataError(f"{path}: cannot decode image ({error})") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; high-bit-depth grey is scaled, not clipped."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert() clips 16-bit values at 255, which turns most 16-bit scans white.
        array = np.asarray(image).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max(initial=0) <= 1.0 else 1.0  # [0,1] floats vs 0-255 floats
        grey = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        # Through RGBA so palette transparency is handled by Pillow, then drop alpha.
        image = image.convert("RGBA")
    # Alpha is dropped (the colour under it is kept), matching how OpenCV readers behave.
    return image.convert("RGB")


def as_rgb_image(obj: str | Path | Image.Image | np.ndarray, **load_kwargs: object) -> Image.Image:
    """Accept a path, a PIL image or a uint8 array and return an RGB ``PIL.Image``.

    Args:
        obj: a file path (loaded with :func:`load_image`, ``load_kwargs`` passed on), a PIL
            image of any mode, or a ``uint8`` numpy array of shape ``(H, W, 3)`` (RGB order),
            ``(H, W, 4)`` (RGBA, alpha dropped), ``(H, W, 1)`` or ``(H, W)`` (grey).

    Raises:
        KeySegDataError: unsupported type, dtype or shape.
    """
    if isinstance(obj, (str, Path)):
        return load_image(obj, **load_kwargs)  # type: ignore[arg-type]
    if isinstance(obj, Image.Image):
        return _to_rgb(obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8:
            raise KeySegDataError(f"image array must be uint8, got {obj.dtype}")
        if obj.ndim == 3 and obj.shape[2] == 1:
            obj = obj[:, :, 0]
        if obj.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(obj)).convert("RGB")
        if obj.ndim == 3 and obj.shape[2] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(obj[:, :, :3]))
        raise KeySegDataError(
            f"image array must have shape (H, W, 3), (H, W, 4) or (H, W), got {obj.shape}"
        )
    raise KeySegDataError(f"cannot use a {type(obj).__name__} as an image")


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
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    padded = torch.zeros(3, target_length, target_length, dtype=torch.float32)
    padded[:, :new_h, :new_w] = (pixels - mean_t) / std_t
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
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return SamInput(
        pixel_values=(pixels - mean_t) / std_t,
        resized_size=(target_length, target_length),
        original_size=(height, width),
    )
