"""Safe image loading: the one door through which image files enter KeySeg.

``load_image`` decodes the whole file (so a truncated JPEG fails here, naming the file, not
deep inside a training step), applies the EXIF orientation, refuses decompression bombs and
returns an 8-bit RGB image whatever the source mode (16-bit grey, palette, CMYK, LA/RGBA, ...);
``as_rgb_image`` accepts a path, a PIL image or a uint8 array.

A leaf module (Pillow, numpy, errors): the processor's transforms (:mod:`keyseg.transforms`),
the data readers (through :mod:`keyseg.data.images`) and the pipeline all read images here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from keyseg.errors import KeySegDataError

#: Default pixel limit (width * height) for :func:`load_image`: 64 megapixels, far above any
#: COCO/ReasonSeg image (ReasonSeg's largest are ~25 MP) yet well below what would exhaust memory.
DEFAULT_MAX_PIXELS: int = 64_000_000


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
