"""The shapes world's vocabulary (kinds, colours, difficulties), its config and its
splits (disjoint image seeds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
DIFFICULTIES: tuple[str, ...] = ("direct", "relational", "indirect", "multi", "negative")


@dataclass(frozen=True)
class ShapesConfig:
    """How the shapes world is generated.

    Attributes:
        image_size: side of the square images in pixels (160-256; 192 keeps CPU training
            of the embedded default within ~30 minutes).
        min_objects / max_objects: objects per image (inclusive range).
        min_radius / max_radius: object circumradius as a fraction of ``image_size``.
        min_visible: an object must keep at least this fraction of its pixels visible
            after later (higher) objects are drawn over it.
        train_size / val_size / test_size: records per split.
        queries_per_image: referents per record (each its own query and target).
        difficulty_weights: relative frequency of each query difficulty.
        seed: world seed mixed into every image's random stream.
    """

    image_size: int = 192
    min_objects: int = 2
    max_objects: int = 6
    min_radius: float = 0.07
    max_radius: float = 0.15
    min_visible: float = 0.6
    train_size: int = 20000
    val_size: int = 200
    test_size: int = 500
    queries_per_image: int = 1
    difficulty_weights: tuple[tuple[str, float], ...] = (
        ("direct", 0.2),
        ("relational", 0.2),
        ("indirect", 0.35),
        ("multi", 0.125),
        ("negative", 0.125),
    )
    seed: int = 0

    def __post_init__(self) -> None:
        if not 64 <= self.image_size <= 1024:
            raise KeySegConfigError(
                f"ShapesConfig.image_size={self.image_size}: use 64-1024 (160-256 advised)"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise KeySegConfigError(
                f"ShapesConfig objects range {self.min_objects}..{self.max_objects}: need "
                "1 <= min_objects <= max_objects <= 8"
            )
        if not 0 < self.min_radius <= self.max_radius <= 0.3:
            raise KeySegConfigError("ShapesConfig radii: need 0 < min_radius <= max_radius <= 0.3")
        unknown = {name for name, _ in self.difficulty_weights} - set(DIFFICULTIES)
        if unknown or not any(w > 0 for _, w in self.difficulty_weights):
            raise KeySegConfigError(
                f"ShapesConfig.difficulty_weights: unknown {sorted(unknown)} or no positive "
                f"weight (difficulties: {', '.join(DIFFICULTIES)})"
            )
        if self.queries_per_image < 1:
            raise KeySegConfigError("ShapesConfig.queries_per_image must be >= 1")

    def split_size(self, split: str) -> int:
        """Number of records in ``split``."""
        check_split(split)
        return {"train": self.train_size, "val": self.val_size, "test": self.test_size}[split]


def check_split(split: str) -> None:
    if split not in SPLIT_CODES:
        raise KeySegConfigError(f"unknown shapes split {split!r} (use train, val or test)")


def image_seed(split: str, index: int) -> int:
    """The image seed of record ``index`` of ``split``; disjoint across splits by construction."""
    check_split(split)
    if not 0 <= index < 2**32:
        raise IndexError(f"shapes index {index} out of range")
    return SPLIT_CODES[split] * 2**32 + index
