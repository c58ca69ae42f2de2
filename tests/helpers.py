"""Small fixture builders shared by tests (importable as ``helpers``)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from keyseg.data.sample import Referent, SegRecord


def make_record(height: int = 40, width: int = 60, seed: int = 0) -> SegRecord:
    """A random image with two referents: one mask with a keyword, two masks with one."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    first = np.zeros((1, height, width), np.uint8)
    first[0, 5:20, 10:30] = 1
    first[0, 0:2, 0:2] = 255  # an ignore region
    second = np.zeros((2, height, width), np.uint8)
    second[0, 20:30, 5:15] = 1
    second[1, 25:35, 40:55] = 1
    return SegRecord(
        sample_id=f"img{seed}",
        source="fixture",
        image=image,
        referents=[
            Referent("What would you use to eat soup?", True, first, keyword="spoon"),
            Referent("both circles", False, second, keyword="circle"),
        ],
    )
