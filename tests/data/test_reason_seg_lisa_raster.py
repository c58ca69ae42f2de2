"""ReasonSeg masks equal LISA's own, pixel for pixel (``shared/fixtures/reason_seg_raster``).

The fixture holds 60 LabelMe annotations (float vertices, some outside the image, overlapping
polygons, tiny ones, ``ignore`` and ``flag`` labels) and the masks LISA's
``get_mask_from_json`` drew for them with OpenCV; the image size is the file's
``imageHeight`` / ``imageWidth``.
"""

from __future__ import annotations

import json

import numpy as np

from helpers import shared_path
from keyseg.data.reason_seg import RasterStats, rasterize_shapes


def test_every_fixture_mask_is_reproduced_exactly():
    root = shared_path("fixtures/reason_seg_raster")
    expected = np.load(root / "lisa_masks.npz")
    paths = sorted((root / "annotations").glob("*.json"))
    assert len(paths) == len(expected.files) == 60
    stats = RasterStats()
    differing = {}
    for path in paths:
        data = json.loads(path.read_text())
        mask = rasterize_shapes(data["shapes"], data["imageHeight"], data["imageWidth"], stats)
        lisa = expected[path.stem]
        assert mask.shape == lisa.shape and mask.dtype == lisa.dtype == np.uint8
        if not np.array_equal(mask, lisa):
            differing[path.stem] = int((mask != lisa).sum())
    assert differing == {}  # annotation -> number of differing pixels
    # The fixture exercises what it says: skipped flags and clipped vertices.
    assert stats.flag_shapes > 0 and stats.points_outside > 0
    assert {int(v) for name in expected.files for v in np.unique(expected[name])} == {0, 1, 255}
