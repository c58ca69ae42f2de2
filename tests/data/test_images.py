"""Safe image loading and SAM's input transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from keyseg.data.images import as_rgb_image, load_image
from keyseg.errors import KeySegDataError
from keyseg.transforms import SAM_PIXEL_MEAN, SAM_PIXEL_STD, sam_preprocess, sam_resized_size


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_load_image_applies_exif_orientation(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20] = 255  # left half white in the stored pixels
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.png"
    image.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert loaded.size == (20, 40)  # (W, H) after the 90-degree turn
    out = np.asarray(loaded)
    # Stored left half becomes the displayed top half.
    assert out[:20].min() == 255 and out[20:].max() == 0


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "RGBA", "L", "1"])
def test_load_image_converts_any_mode_to_rgb(tmp_path, mode):
    source = Image.fromarray(_rgb(8, 8)).convert(mode)
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    if mode == "CMYK":
        source.save(path, quality=95)
    else:
        source.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 8)
    if mode in ("RGBA", "P", "L"):
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(source.convert("RGB")))


def test_load_image_scales_16_bit_grey_instead_of_clipping(tmp_path):
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    loaded = np.asarray(load_image(path))
    np.testing.assert_array_equal(loaded[..., 0], [[0, 100], [255, 200]])
    assert (loaded[..., 0] == loaded[..., 2]).all()


def test_load_image_refuses_images_over_the_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    with pytest.raises(KeySegDataError, match=r"big\.png.*100x50 = 5000 pixels"):
        load_image(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).size == (100, 50)


def test_load_image_names_file_for_truncated_empty_and_non_images(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for path, pattern in [(truncated, "cut.jpg"), (empty, "empty.jpg.*0 bytes"),
                          (text, "text.jpg.*not a readable image"),
                          (tmp_path / "absent.jpg", "absent.jpg.*not found")]:
        with pytest.raises(KeySegDataError, match=pattern):
            load_image(path)


def test_as_rgb_image_accepts_arrays_and_pil():
    array = _rgb(5, 7)
    np.testing.assert_array_equal(np.asarray(as_rgb_image(array)), array)
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7)
    assert np.asarray(as_rgb_image(grey))[..., 1].tolist() == grey.tolist()
    assert as_rgb_image(Image.fromarray(array).convert("RGBA")).mode == "RGB"
    with pytest.raises(KeySegDataError, match="uint8"):
        as_rgb_image(array.astype(np.float32))
    with pytest.raises(KeySegDataError, match="shape"):
        as_rgb_image(np.zeros((4, 4, 2), dtype=np.uint8))


@pytest.mark.parametrize(("hw", "target", "expected"), [
    ((480, 640), 1024, (768, 1024)),
    ((640, 480), 1024, (1024, 768)),
    ((333, 500), 1024, (682, 1024)),  # 681.98 rounds half-up to 682
    ((3, 1000), 64, (1, 64)),  # 0.19 would round to 0: kept at one row
    ((100, 100), 32, (32, 32)),
])
def test_sam_resized_size_rounds_like_resize_longest_side(hw, target, expected):
    assert sam_resized_size(*hw, target_length=target) == expected


def test_sam_preprocess_resizes_normalises_and_pads():
    array = np.full((30, 60, 3), (200, 100, 50), dtype=np.uint8)
    out = sam_preprocess(array, target_length=32)
    assert out.pixel_values.shape == (3, 32, 32) and out.pixel_values.dtype == torch.float32
    assert out.original_size == (30, 60) and out.resized_size == (16, 32)
    expected = [(v - m) / s for v, m, s in zip((200, 100, 50), SAM_PIXEL_MEAN, SAM_PIXEL_STD,
                                               strict=True)]
    content = out.pixel_values[:, :16, :32]
    for channel in range(3):
        torch.testing.assert_close(content[channel], torch.full((16, 32), expected[channel]))
    assert out.pixel_values[:, 16:, :].abs().max() == 0  # bottom padding is exactly zero


def test_sam_preprocess_keeps_content_in_the_top_left():
    array = np.zeros((40, 20, 3), dtype=np.uint8)
    array[:20] = 255  # top half white
    out = sam_preprocess(Image.fromarray(array), target_length=16)
    assert out.resized_size == (16, 8)
    white = (255 - SAM_PIXEL_MEAN[0]) / SAM_PIXEL_STD[0]
    black = -SAM_PIXEL_MEAN[0] / SAM_PIXEL_STD[0]
    assert out.pixel_values[0, 2, 3].item() == pytest.approx(white, abs=1e-4)
    assert out.pixel_values[0, 13, 3].item() == pytest.approx(black, abs=1e-4)
    assert out.pixel_values[:, :, 8:].abs().max() == 0  # right padding
