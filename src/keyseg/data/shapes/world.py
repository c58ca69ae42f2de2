"""The shapes world's vocabulary (kinds, colours, difficulties), its config and its
splits (disjoint image seeds)."""

from __future__ import annotations

from typing import Literal

# ShapesConfig (the world's settings) is defined with the other configs: YAML sets all of it.
from keyseg.config import SHAPES_DIFFICULTIES, ShapesConfig  # noqa: F401 (re-exported)
from keyseg.errors import KeySegConfigError

Split = Literal["train", "val", "test"]
SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2, "test": 3}
SOURCE = "shapes"

KINDS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "diamond",
    "octagon",
)
PLURALS: dict[str, str] = {k: ("crosses" if k == "cross" else k + "s") for k in KINDS}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 55, 190),
    "orange": (245, 135, 25),
}
KEYWORD_VOCAB: frozenset[str] = frozenset(
    [*KINDS, *COLOURS, *(f"{c} {k}" for c in COLOURS for k in KINDS)]
)
DIFFICULTIES: tuple[str, ...] = SHAPES_DIFFICULTIES


def check_split(split: str) -> None:
    if split not in SPLIT_CODES:
        raise KeySegConfigError(f"unknown shapes split {split!r} (use train, val or test)")


def image_seed(split: str, index: int) -> int:
    """The image seed of record ``index`` of ``split``; disjoint across splits by construction."""
    check_split(split)
    if not 0 <= index < 2**32:
        raise IndexError(f"shapes index {index} out of range")
    return SPLIT_CODES[split] * 2**32 + index
