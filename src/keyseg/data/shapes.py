"""A seeded procedural reasoning-segmentation world: the embedded default's training data.

Each image shows 2-6 coloured shapes (circle, square, triangle, star, ring, cross, diamond,
octagon in six colours) over a textured background, with overlaps. Masks are exact: every
instance is rasterised once (PIL ``ImageDraw`` on a binary canvas at the image's own
resolution, no anti-aliasing) and the image is *painted from* those rasters in z-order, so
an instance's mask is exactly the set of pixels that show its colour layer.

Queries come in graded difficulty and their *core concept* (the keyword) often differs from
the literal words:

================  ===========================================  ===========================
difficulty        example query                                keyword
================  ===========================================  ===========================
``direct``        "red triangle", "Where is the blue star?"   "red triangle", "blue star"
``relational``    "the largest shape", "the shape left of the  the target's "colour kind"
                  green ring"
``indirect``      "Which one looks like a stop sign?",         "octagon", "yellow"
                  "Which shape is the colour of a banana?"
``multi``         "all the circles" -> k masks, k ``[SEG]``   "circle"
``negative``      "purple cross" (none in the image)           "purple cross"
================  ===========================================  ===========================

A negative referent has **one all-zero mask** and an answer such as
"There is no such shape, [SEG]." - it still holds one ``[SEG]`` so every training sample has
the same structure (the mask decoder learns to output an empty mask), matching how
``Referent`` documents an all-zero target.

Keywords are 1-2 words from :data:`KEYWORD_VOCAB` (kinds, colours, "colour kind").

Splits: image seeds are ``split_code * 2**32 + index`` (:func:`image_seed`), so train / val /
test never share an image; and query templates in :data:`HELDOUT_TEMPLATE_IDS` are used only
in val and test, so the test split measures generalisation to unseen wordings.

:func:`export_reason_seg` writes a split in the ReasonSeg on-disk format (SPEC §5) plus a
keyword file, so the real readers can be exercised on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

# ShapesConfig (the world's settings) is defined with the other configs: YAML sets all of it.
from keyseg.config import SHAPES_DIFFICULTIES, ShapesConfig
from keyseg.data.sample import Referent, SegRecord
from keyseg.errors import KeySegConfigError
from keyseg.io import atomic_write_json

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


def _check_split(split: str) -> None:
    if split not in SPLIT_CODES:
        raise KeySegConfigError(f"unknown shapes split {split!r} (use train, val or test)")


def image_seed(split: str, index: int) -> int:
    """The image seed of record ``index`` of ``split``; disjoint across splits by construction."""
    _check_split(split)
    if not 0 <= index < 2**32:
        raise IndexError(f"shapes index {index} out of range")
    return SPLIT_CODES[split] * 2**32 + index


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ShapeObject:
    """One drawn instance. ``z`` is its drawing order (higher is on top)."""

    kind: str
    colour: str
    cx: float
    cy: float
    radius: float  # circumradius in pixels
    angle: float  # rotation in radians
    z: int

    @property
    def description(self) -> str:
        """``"red triangle"``: the 2-word concept naming this instance."""
        return f"{self.colour} {self.kind}"


def _regular(n: int, r: float, phase: float) -> np.ndarray:
    """``(n, 2)`` vertices of a regular n-gon of circumradius ``r`` around the origin."""
    t = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _unit_parts(kind: str, r: float) -> list[tuple[np.ndarray, bool]]:
    """Un-rotated polygons of ``kind`` at the origin: (vertices (n, 2), filled?) in order."""
    up = -math.pi / 2  # image y points down: phase -90 deg puts a vertex at the top
    if kind == "circle":
        return [(_regular(72, r, 0.0), True)]
    if kind == "ring":
        # The hole is painted as background after the disc: a ring is outer minus inner.
        return [(_regular(72, r, 0.0), True), (_regular(72, 0.55 * r, 0.0), False)]
    if kind == "square":
        return [(_regular(4, r, math.pi / 4), True)]
    if kind == "diamond":
        return [(np.array([[0, -r], [0.62 * r, 0], [0, r], [-0.62 * r, 0]]), True)]
    if kind == "triangle":
        return [(_regular(3, r, up), True)]
    if kind == "octagon":
        return [(_regular(8, r, math.pi / 8), True)]
    if kind == "star":
        outer, inner = _regular(5, r, up), _regular(5, 0.42 * r, up + math.pi / 5)
        return [(np.stack([outer, inner], axis=1).reshape(10, 2), True)]
    if kind == "cross":
        a, b = 0.34 * r, r
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        return [(np.array(pts, dtype=float), True)]
    raise KeySegConfigError(f"unknown shape kind {kind!r} (known: {', '.join(KINDS)})")


def shape_polygons(obj: ShapeObject) -> list[tuple[list[tuple[float, float]], bool]]:
    """The drawing recipe of ``obj`` in image coordinates.

    Returns:
        a list of ``(polygon, filled)``: draw each polygon in order with value 1 when
        ``filled`` else 0 (a ring's hole); polygons are lists of ``(x, y)`` floats.
    """
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    rot = np.array([[c, -s], [s, c]])
    out = []
    for pts, filled in _unit_parts(obj.kind, obj.radius):
        xy = pts @ rot.T + np.array([obj.cx, obj.cy])
        out.append(([(float(x), float(y)) for x, y in xy], filled))
    return out


def render_object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """``(size, size)`` bool: the pixels ``obj`` covers when drawn alone (before occlusion)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, filled in shape_polygons(obj):
        draw.polygon(poly, fill=1 if filled else 0)
    return np.asarray(canvas, dtype=bool)


# --------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """A generated image before queries: objects in z-order and their pixel masks.

    Attributes:
        objects: instances, index == z (0 drawn first).
        full: ``(n, S, S)`` bool, each object drawn alone.
        visible: ``(n, S, S)`` bool, the pixels each object shows after occlusion
            (pairwise disjoint; their union is every non-background pixel).
    """

    objects: list[ShapeObject]
    full: np.ndarray
    visible: np.ndarray
    areas: np.ndarray = field(init=False)
    centroids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n, h, w = self.visible.shape
        self.areas = self.visible.reshape(n, -1).sum(1)
        # Centroids from row/column projections: far cheaper than (n, H, W) coordinate grids.
        cx = self.visible.sum(1) @ np.arange(w) / self.areas
        cy = self.visible.sum(2) @ np.arange(h) / self.areas
        self.centroids = np.stack([cx, cy], axis=1)


def _visible(full: np.ndarray) -> np.ndarray:
    """Visible masks from full masks in z-order: each minus everything drawn above it."""
    vis = full.copy()
    above = np.zeros(full.shape[1:], dtype=bool)
    for i in range(len(full) - 1, -1, -1):
        vis[i] &= ~above
        above |= full[i]
    return vis


def _make_scene(
    rng: np.random.Generator, cfg: ShapesConfig, same: Literal["kind", "colour"] | None
) -> Scene:
    """Place objects with rejection so each keeps ``min_visible`` of its area visible.

    ``same`` forces a second object to share the first one's kind or colour (multi-target
    queries need duplicates, which uniform sampling gives too rarely).
    """
    size = cfg.image_size
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[ShapeObject] = []
    fulls: list[np.ndarray] = []
    for i in range(n_target):
        for _ in range(30):
            kind = KINDS[int(rng.integers(len(KINDS)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            if same and i in (1, 2) and objects and (i == 1 or rng.random() < 0.3):
                if same == "kind":
                    kind = objects[0].kind
                else:
                    colour = objects[0].colour
            radius = float(rng.uniform(cfg.min_radius, cfg.max_radius)) * size
            cx, cy = rng.uniform(radius + 1, size - radius - 1, size=2)
            # Keep squares/crosses upright-ish so "plus sign" and "square" stay true.
            spread = {"triangle": 0.35, "square": 0.25, "cross": 0.2, "diamond": 0.2}.get(
                kind, math.pi
            )
            obj = ShapeObject(
                kind,
                colour,
                float(cx),
                float(cy),
                radius,
                float(rng.uniform(-spread, spread)),
                len(objects),
            )
            mask = render_object_mask(obj, size)
            cand = np.stack([*fulls, mask])
            vis = _visible(cand)
            kept = vis.reshape(len(cand), -1).sum(1) / cand.reshape(len(cand), -1).sum(1)
            if kept.min() >= cfg.min_visible:
                objects.append(obj)
                fulls.append(mask)
                break
    if len(objects) < cfg.min_objects:  # crowded image: try again with a fresh layout
        return _make_scene(rng, cfg, same)
    full = np.stack(fulls)
    return Scene(objects, full, _visible(full))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(S, S, 3)`` float32 textured background in muted (low-saturation) colours."""
    base = (rng.uniform(70, 200) + rng.uniform(-18, 18, size=3)).astype(np.float32)
    style = int(rng.integers(4))
    axis = np.arange(size, dtype=np.float32) / size
    xx, yy = axis[None, :], axis[:, None]  # broadcast to (S, S) only when combined
    if style == 0:  # smooth blotches: low-res noise upsampled
        low = rng.uniform(-25, 25, size=(6, 6)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC))
    elif style == 1:  # stripes at a random angle
        t, freq = rng.uniform(0, math.pi), rng.uniform(6, 16)
        pattern = 14 * np.sin(2 * math.pi * freq * (xx * math.cos(t) + yy * math.sin(t)))
    elif style == 2:  # checkerboard
        cells = int(rng.integers(4, 12))
        pattern = 22.0 * (((xx * cells).astype(int) + (yy * cells).astype(int)) % 2)
    else:  # linear gradient
        t = rng.uniform(0, 2 * math.pi)
        pattern = 60 * ((xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t))
    noise = rng.integers(-10, 11, size=(size, size), dtype=np.int8)
    grey = (pattern + noise).astype(np.float32)
    return grey[..., None] + base


def _paint(rng: np.random.Generator, scene: Scene, size: int) -> Image.Image:
    """Paint the background, then every object's visible pixels in its (noisy) colour."""
    img = _background(rng, size)
    for obj, vis in zip(scene.objects, scene.visible, strict=True):
        colour = np.array(COLOURS[obj.colour], dtype=np.float32) + rng.uniform(-12, 12)
        n = int(vis.sum())
        img[vis] = colour + rng.integers(-8, 9, size=(n, 1)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class Template:
    """A query template.

    ``slot`` says what the realiser fills in (see ``_REALISERS``); ``heldout`` templates are
    only used in val/test.
    """

    id: str
    difficulty: str
    pattern: str
    is_sentence: bool
    slot: str
    arg: str = ""
    heldout: bool = False


@dataclass(frozen=True)
class Query:
    """A realised query: text, concept, target object ids (empty for negatives)."""

    template: Template
    text: str
    keyword: str
    targets: tuple[int, ...]
    description: str  # what the answer names: "red triangle", "circles", ...


# Indirect clues per kind: the last one of each list is held out (val/test only).
KIND_CLUES: dict[str, list[str]] = {
    "circle": [
        "Which shape could roll down a slope?",
        "Which shape has no corners at all?",
        "Which one looks like a coin seen from above?",
        "Which shape is round and filled all the way through?",
    ],
    "square": [
        "Which shape has four equal sides and four right angles?",
        "Which one looks like a single cell of a chessboard?",
        "Which shape has the outline of a face of a dice?",
        "Which shape would a sticky note have?",
    ],
    "triangle": [
        "Which shape has three corners?",
        "Which one looks like a slice of pizza?",
        "Which shape looks like a mountain peak?",
        "Which shape is made of exactly three straight sides?",
    ],
    "star": [
        "Which shape has five points?",
        "What would you put on top of a Christmas tree?",
        "Which one looks like what twinkles in the night sky?",
        "Which shape is on a sheriff's badge?",
    ],
    "ring": [
        "What could you wear on a finger?",
        "Which shape has a hole in the middle?",
        "Which one looks like a donut?",
        "Which shape looks like a life buoy?",
    ],
    "cross": [
        "Which one looks like a plus sign?",
        "Which shape is the symbol of first aid?",
        "Which symbol means addition?",
        "Which shape has four equal arms meeting in the middle?",
    ],
    "diamond": [
        "Which shape looks like a kite?",
        "Which one looks like a rhombus standing on its tip?",
        "Which shape looks like a gem on a playing card?",
        "Which shape has four sides and stands on a point?",
    ],
    "octagon": [
        "Which one looks like a stop sign?",
        "Which shape has eight sides?",
        "Which shape has eight corners?",
        "Which shape looks like an umbrella seen from above?",
    ],
}
KIND_CLUES_PLURAL: dict[str, str] = {
    "circle": "Segment all the shapes that could roll down a slope.",
    "square": "Segment every shape with four equal sides and four right angles.",
    "triangle": "Segment all the shapes with three corners.",
    "star": "Segment every shape with five points.",
    "ring": "Segment all the shapes with a hole in the middle.",
    "cross": "Segment every shape that looks like a plus sign.",
    "diamond": "Segment all the shapes that look like a kite.",
    "octagon": "Segment every shape that looks like a stop sign.",
}
COLOUR_CLUES: dict[str, list[str]] = {
    "red": ["the colour of a fire truck", "the colour of a ripe tomato", "the colour of blood"],
    "green": ["the colour of fresh grass", "the colour of a lime", "the colour of a frog"],
    "blue": ["the colour of a clear sky", "the colour of the sea", "the colour of blueberries"],
    "yellow": ["the colour of a ripe banana", "the colour of a lemon", "the colour of sunflowers"],
    "purple": ["the colour of grapes", "the colour of lavender", "the colour of an eggplant"],
    "orange": ["the colour of a pumpkin", "the colour of a carrot", "the colour of a tangerine"],
}


def _build_templates() -> dict[str, Template]:
    t: list[Template] = [
        # direct: the concept is named (kind, colour or both)
        Template("direct.ck", "direct", "{colour} {kind}", False, "ck"),
        Template("direct.the_ck", "direct", "the {colour} {kind}", False, "ck"),
        Template("direct.k", "direct", "{kind}", False, "k"),
        Template("direct.c", "direct", "{colour} shape", False, "c"),
        Template("direct.segment_ck", "direct", "Segment the {colour} {kind}.", True, "ck"),
        Template("direct.where_ck", "direct", "Where is the {colour} {kind}?", True, "ck"),
        Template(
            "direct.ck_coloured",
            "direct",
            "the {kind} coloured {colour}",
            False,
            "ck",
            heldout=True,
        ),
        Template(
            "direct.find_k", "direct", "Find the {kind} in the picture.", True, "k", heldout=True
        ),
        # relational / attribute: the target is named by a comparison
        Template(
            "relational.largest", "relational", "the largest shape", False, "extreme", "largest"
        ),
        Template(
            "relational.smallest", "relational", "the smallest shape", False, "extreme", "smallest"
        ),
        Template(
            "relational.leftmost", "relational", "the leftmost shape", False, "extreme", "leftmost"
        ),
        Template(
            "relational.rightmost",
            "relational",
            "the rightmost shape",
            False,
            "extreme",
            "rightmost",
        ),
        Template(
            "relational.topmost",
            "relational",
            "the shape nearest the top",
            False,
            "extreme",
            "topmost",
        ),
        Template("relational.lowest", "relational", "the lowest shape", False, "extreme", "lowest"),
        Template(
            "relational.left_of",
            "relational",
            "the shape left of the {colour} {kind}",
            False,
            "relation",
            "left",
        ),
        Template(
            "relational.right_of",
            "relational",
            "the shape right of the {colour} {kind}",
            False,
            "relation",
            "right",
        ),
        Template(
            "relational.above",
            "relational",
            "the shape above the {colour} {kind}",
            False,
            "relation",
            "above",
        ),
        Template(
            "relational.below",
            "relational",
            "the shape below the {colour} {kind}",
            False,
            "relation",
            "below",
        ),
        Template(
            "relational.same_colour",
            "relational",
            "the shape with the same colour as the {kind}",
            False,
            "same_colour",
        ),
        Template(
            "relational.largest_k",
            "relational",
            "the largest {kind}",
            False,
            "extreme_k",
            "largest",
        ),
        Template(
            "relational.biggest",
            "relational",
            "Which shape is the biggest one?",
            True,
            "extreme",
            "largest",
            heldout=True,
        ),
        Template(
            "relational.furthest_left",
            "relational",
            "Which shape is furthest to the left?",
            True,
            "extreme",
            "leftmost",
            heldout=True,
        ),
        Template(
            "relational.shares_colour",
            "relational",
            "Which shape shares its colour with the {kind}?",
            True,
            "same_colour",
            heldout=True,
        ),
        # multi: several targets, one [SEG] each
        Template("multi.all_k", "multi", "all the {kinds}", False, "multi_k"),
        Template("multi.every_k", "multi", "every {kind}", False, "multi_k"),
        Template("multi.all_c", "multi", "all {colour} shapes", False, "multi_c"),
        Template(
            "multi.segment_k", "multi", "Segment all the {kinds} in the image.", True, "multi_k"
        ),
        Template("multi.clue", "multi", "{clue}", True, "multi_clue"),
        Template(
            "multi.find_k",
            "multi",
            "Find every {kind} in the picture.",
            True,
            "multi_k",
            heldout=True,
        ),
        Template(
            "multi.every_c", "multi", "every shape that is {colour}", False, "multi_c", heldout=True
        ),
        # negative: the concept is absent; one empty mask
        Template("negative.ck", "negative", "the {colour} {kind}", False, "neg_ck"),
        Template("negative.k", "negative", "{kind}", False, "neg_k"),
        Template("negative.clue", "negative", "{clue}", True, "neg_clue"),
        Template(
            "negative.segment_k",
            "negative",
            "Segment the {kind} in this picture.",
            True,
            "neg_k",
            heldout=True,
        ),
    ]
    for kind, clues in KIND_CLUES.items():
        for i, clue in enumerate(clues):
            t.append(
                Template(
                    f"indirect.{kind}.{i}",
                    "indirect",
                    clue,
                    True,
                    "clue_k",
                    kind,
                    heldout=i == len(clues) - 1,
                )
            )
    for colour, clues in COLOUR_CLUES.items():
        for i, clue in enumerate(clues):
            t.append(
                Template(
                    f"indirect.{colour}.{i}",
                    "indirect",
                    f"Which shape is {clue}?",
                    True,
                    "clue_c",
                    colour,
                    heldout=i == len(clues) - 1,
                )
            )
    return {x.id: x for x in t}


TEMPLATES: dict[str, Template] = _build_templates()
HELDOUT_TEMPLATE_IDS: frozenset[str] = frozenset(k for k, v in TEMPLATES.items() if v.heldout)


def template_ids(split: str) -> frozenset[str]:
    """Ids of the templates ``split`` may use: train never sees the held-out ones."""
    _check_split(split)
    if split == "train":
        return frozenset(TEMPLATES) - HELDOUT_TEMPLATE_IDS
    return frozenset(TEMPLATES)


_MARGIN = 0.04  # fraction of the image: spatial comparisons must be this clear-cut


def _unique(scene: Scene, key: Callable[[ShapeObject], str]) -> list[int]:
    """Ids of objects whose ``key`` no other object shares."""
    keys = [key(o) for o in scene.objects]
    return [i for i, k in enumerate(keys) if keys.count(k) == 1]


def _extreme(scene: Scene, which: str, ids: Sequence[int], size: int) -> int | None:
    """The object of ``ids`` that is clearly the most ``which``, or None when not clear-cut."""
    if len(ids) < 2:
        return None
    if which in ("largest", "smallest"):
        vals = scene.areas[list(ids)].astype(float)
        order = np.argsort(-vals if which == "largest" else vals)
        first, second = vals[order[0]], vals[order[1]]
        # Sizes must differ clearly (30 %) for "largest"/"smallest" to be unambiguous.
        clear = first >= 1.3 * second if which == "largest" else second >= 1.3 * first
        return int(ids[order[0]]) if clear else None
    axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "lowest": (1, -1)}[
        which
    ]
    vals = sign * scene.centroids[list(ids), axis]
    order = np.argsort(vals)
    if vals[order[1]] - vals[order[0]] < _MARGIN * size:
        return None
    return int(ids[order[0]])


def _fill(template: Template, **slots: str) -> str:
    return template.pattern.format(**slots)


def _realise(
    template: Template, scene: Scene, rng: np.random.Generator, size: int, heldout_ok: bool
) -> Query | None:
    """Fill ``template`` for ``scene`` so that it has exactly the intended targets.

    ``heldout_ok`` (val/test) lets templates that borrow clue sentences use held-out ones.
    """
    objs = scene.objects

    def pick(xs: Sequence) -> object:
        return xs[int(rng.integers(len(xs)))]

    slot = template.slot
    if slot in ("ck", "k", "c"):
        key = {"ck": lambda o: o.description, "k": lambda o: o.kind, "c": lambda o: o.colour}
        ids = _unique(scene, key[slot])
        if not ids:
            return None
        i = pick(ids)
        o = objs[i]
        text = _fill(template, colour=o.colour, kind=o.kind)
        kw = key[slot](o)
        return Query(template, text, kw, (i,), o.description)
    if slot == "clue_k" or slot == "clue_c":
        attr = "kind" if slot == "clue_k" else "colour"
        matches = [i for i, o in enumerate(objs) if getattr(o, attr) == template.arg]
        if len(matches) != 1:
            return None
        return Query(
            template, template.pattern, template.arg, (matches[0],), objs[matches[0]].description
        )
    if slot == "extreme":
        i = _extreme(scene, template.arg, list(range(len(objs))), size)
        if i is None:
            return None
        return Query(template, template.pattern, objs[i].description, (i,), objs[i].description)
    if slot == "extreme_k":
        kinds = sorted({o.kind for o in objs})
        rng.shuffle(kinds)
        for kind in kinds:
            ids = [i for i, o in enumerate(objs) if o.kind == kind]
            i = _extreme(scene, template.arg, ids, size)
            if i is not None:
                text = _fill(template, kind=kind)
                return Query(template, text, objs[i].description, (i,), objs[i].description)
        return None
    if slot == "relation":
        axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[
            template.arg
        ]
        anchors = _unique(scene, lambda o: o.description)
        rng.shuffle(anchors)
        m = _MARGIN * size
        for a in anchors:
            d = sign * (scene.centroids[:, axis] - scene.centroids[a, axis])
            others = [i for i in range(len(objs)) if i != a]
            hits = [i for i in others if d[i] > m]
            # Exactly one object on that side and none borderline: the relation is unambiguous.
            if len(hits) == 1 and all(d[i] < -m for i in others if i not in hits):
                t = hits[0]
                text = _fill(template, colour=objs[a].colour, kind=objs[a].kind)
                return Query(template, text, objs[t].description, (t,), objs[t].description)
        return None
    if slot == "same_colour":
        anchors = _unique(scene, lambda o: o.kind)
        rng.shuffle(anchors)
        for a in anchors:
            same = [i for i, o in enumerate(objs) if i != a and o.colour == objs[a].colour]
            if len(same) == 1:
                t = same[0]
                text = _fill(template, kind=objs[a].kind)
                return Query(template, text, objs[t].description, (t,), objs[t].description)
        return None
    if slot in ("multi_k", "multi_c", "multi_clue"):
        attr = "colour" if slot == "multi_c" else "kind"
        groups: dict[str, list[int]] = {}
        for i, o in enumerate(objs):
            groups.setdefault(getattr(o, attr), []).append(i)
        values = sorted(v for v, ids in groups.items() if len(ids) >= 2)
        if not values:
            return None
        v = pick(values)
        # Left-to-right order gives the k masks a stable, explainable order.
        ids = sorted(groups[v], key=lambda i: scene.centroids[i, 0])
        if slot == "multi_clue":
            text = KIND_CLUES_PLURAL[v]
        elif slot == "multi_k":
            text = _fill(template, kind=v, kinds=PLURALS[v])
        else:
            text = _fill(template, colour=v)
        desc = PLURALS[v] if attr == "kind" else f"{v} shapes"
        return Query(template, text, v, tuple(ids), desc)
    if slot in ("neg_ck", "neg_k", "neg_clue"):
        present_k = {o.kind for o in objs}
        present_ck = {o.description for o in objs}
        if slot == "neg_ck":
            # Hard negatives first: both words appear in the image, never together.
            cands = [f"{o.colour} {k}" for o in objs for k in present_k]
            cands = sorted({c for c in cands if c not in present_ck})
            if not cands:
                cands = sorted(
                    f"{c} {k}" for c in COLOURS for k in KINDS if f"{c} {k}" not in present_ck
                )
            kw = pick(cands)
            colour, kind = kw.split(" ")
            text = _fill(template, colour=colour, kind=kind)
            return Query(template, text, kw, (), kw)
        absent = [k for k in KINDS if k not in present_k]
        if not absent:
            return None
        kind = pick(absent)
        if slot == "neg_k":
            text = _fill(template, kind=kind)
        else:  # an indirect clue; train never borrows the held-out (last) clue
            text = pick(KIND_CLUES[kind] if heldout_ok else KIND_CLUES[kind][:-1])
        return Query(template, text, kind, (), kind)
    raise KeySegConfigError(f"template {template.id}: unknown slot {slot!r}")


_SINGLE_ANSWERS = (
    "Sure, it is [SEG].",
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
    "It is the {desc} [SEG].",
    "Sure, it is the {desc}, [SEG].",
)
_MULTI_ANSWERS = ("Sure, they are {segs}.", "The {desc} are {segs}.", "{segs}.")
_NEGATIVE_ANSWERS = (
    "There is no such shape, [SEG].",
    "Nothing in the image matches, [SEG].",
    "No shape fits that description, [SEG].",
)


def _answer(query: Query, rng: np.random.Generator) -> tuple[str, str]:
    """(answer with exactly k ``[SEG]``, explanation without ``[SEG]`` for the keyword file)."""
    k = len(query.targets)
    if k == 0:
        answer = _NEGATIVE_ANSWERS[int(rng.integers(len(_NEGATIVE_ANSWERS)))]
        return answer, f"There is no {query.description} in the image."
    if k == 1:
        answer = _SINGLE_ANSWERS[int(rng.integers(len(_SINGLE_ANSWERS)))]
        return answer.format(desc=query.description), f"It is the {query.description}."
    segs = ", ".join(["[SEG]"] * (k - 1)) + " and [SEG]"
    answer = _MULTI_ANSWERS[int(rng.integers(len(_MULTI_ANSWERS)))]
    return answer.format(segs=segs, desc=query.description), (
        f"There are {k} {query.description} in the image."
    )


def _choose_query(
    rng: np.random.Generator, scene: Scene, split: str, difficulty: str, size: int
) -> Query | None:
    allowed = template_ids(split)
    pool = [t for t in TEMPLATES.values() if t.difficulty == difficulty and t.id in allowed]
    order = rng.permutation(len(pool))
    for j in order:
        q = _realise(pool[int(j)], scene, rng, size, heldout_ok=split != "train")
        if q is not None:
            return q
    return None


def generate_sample(seed: int, split: str, config: ShapesConfig | None = None) -> SegRecord:
    """Generate one record (image + ``config.queries_per_image`` referents).

    Args:
        seed: the image seed (see :func:`image_seed`); with ``config.seed`` it fixes
            everything, so the same arguments always give the same record.
        split: "train", "val" or "test"; decides which query templates may be used.
        config: world settings (defaults: :class:`ShapesConfig`).

    Returns:
        a :class:`SegRecord` with ``image`` set (RGB, ``S x S``); each referent's ``masks``
        is ``(k, S, S)`` uint8 in {0, 1}. ``meta`` holds the objects (kind, colour,
        geometry, z), each referent's template id and target object ids, and explanations.
    """
    cfg = config or ShapesConfig()
    _check_split(split)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, seed]))
    weights_by_name = dict(cfg.difficulty_weights)
    names = [n for n, w in cfg.difficulty_weights if w > 0]
    weights = np.array([w for _, w in cfg.difficulty_weights if w > 0], dtype=float)
    wanted = [
        names[int(i)]
        for i in rng.choice(len(names), cfg.queries_per_image, p=weights / weights.sum())
    ]
    # Multi-target queries need a duplicated kind/colour: ask the layout for one.
    same = None
    if "multi" in wanted:
        same = "kind" if rng.random() < 0.7 else "colour"
    scene = _make_scene(rng, cfg, same)
    image = _paint(rng, scene, cfg.image_size)

    referents: list[Referent] = []
    queries_meta: list[dict] = []
    for difficulty in wanted:
        enabled = [d for d in ("indirect", "direct") if weights_by_name.get(d, 0) > 0]
        # Fall back when the scene cannot support the wanted difficulty; a negative on an
        # absent colour+kind always exists, so the last resort never fails.
        query = None
        for d in dict.fromkeys([difficulty, *enabled, "negative"]):
            query = _choose_query(rng, scene, split, d, cfg.image_size)
            if query is not None:
                break
        assert query is not None
        answer, explanation = _answer(query, rng)
        if query.targets:
            masks = scene.visible[list(query.targets)].astype(np.uint8)
        else:
            masks = np.zeros((1, cfg.image_size, cfg.image_size), dtype=np.uint8)
        referents.append(
            Referent(
                text=query.text,
                is_sentence=query.template.is_sentence,
                masks=masks,
                keyword=query.keyword,
                answer=answer,
                difficulty=query.template.difficulty,
            )
        )
        queries_meta.append(
            {
                "template_id": query.template.id,
                "targets": list(query.targets),
                "explanation": explanation,
            }
        )
    meta = {
        "split": split,
        "image_seed": int(seed),
        "world_seed": cfg.seed,
        "objects": [
            {
                "kind": o.kind,
                "colour": o.colour,
                "cx": o.cx,
                "cy": o.cy,
                "radius": o.radius,
                "angle": o.angle,
                "z": o.z,
                "visible_area": int(a),
            }
            for o, a in zip(scene.objects, scene.areas, strict=True)
        ],
        "queries": queries_meta,
    }
    return SegRecord(
        sample_id=f"shapes_{split}_{seed:x}",
        source=SOURCE,
        referents=referents,
        image=image,
        meta=meta,
    )


def objects_from_meta(meta: dict) -> list[ShapeObject]:
    """Rebuild the :class:`ShapeObject` list (z-order) stored in a record's ``meta``."""
    return [
        ShapeObject(o["kind"], o["colour"], o["cx"], o["cy"], o["radius"], o["angle"], o["z"])
        for o in meta["objects"]
    ]


class ShapesDataset(Sequence[SegRecord]):
    """One split of the shapes world as a deterministic sequence of :class:`SegRecord`.

    ``dataset[i]`` is generated on demand (a few ms) and is the same on every call and
    machine; nothing is cached, so memory stays flat for any split size.
    """

    def __init__(self, split: str, config: ShapesConfig | None = None) -> None:
        _check_split(split)
        self.split = split
        self.config = config or ShapesConfig()

    def __len__(self) -> int:
        return self.config.split_size(self.split)

    def __getitem__(self, index: int) -> SegRecord:  # type: ignore[override]
        if not isinstance(index, int | np.integer):
            raise TypeError("ShapesDataset indices must be integers")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"shapes {self.split} index {index} out of range (size {n})")
        return generate_sample(image_seed(self.split, int(index)), self.split, self.config)

    def __iter__(self) -> Iterator[SegRecord]:
        for i in range(len(self)):
            yield self[i]

    def image_seeds(self) -> list[int]:
        """The image seed of every record, in order."""
        return [image_seed(self.split, i) for i in range(len(self))]


# --------------------------------------------------------------------------- export


def mask_to_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """Polygons whose ReasonSeg rasterisation reproduces ``mask`` exactly.

    The rasteriser is the ReasonSeg reader's (:func:`keyseg.data.reason_seg.rasterize_shapes`,
    LISA's: integer vertices, a 1-pixel outline plus fill). Boundaries are traced along pixel
    edges (4-connected foreground), then moved half a pixel inwards so vertices sit on the
    centres of boundary pixels, where the outline is drawn; the fill covers the inside. Holes
    are joined to their enclosing outline by a zero-width bridge (the fill's even-odd rule
    leaves them empty), since the ReasonSeg format has no holes.

    Args:
        mask: ``(H, W)`` bool/uint8, foreground non-zero.

    Returns:
        one polygon ``[[x, y], ...]`` per connected outer boundary (holes merged in).
    """
    m = np.pad(np.asarray(mask) != 0, 1)
    fg = m[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Directed pixel-edge segments with the foreground on a fixed side; corner (X, Y) is
    # the top-left corner of pixel (row Y, col X).
    rows, cols = np.nonzero(fg & ~m[:-2, 1:-1])  # top edges, walk -x
    segs = [((c + 1, r), (c, r)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    rows, cols = np.nonzero(fg & ~m[2:, 1:-1])  # bottom edges, walk +x
    segs += [
        ((c, r + 1), (c + 1, r + 1)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    rows, cols = np.nonzero(fg & ~m[1:-1, :-2])  # left edges, walk +y
    segs += [((c, r), (c, r + 1)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)]
    rows, cols = np.nonzero(fg & ~m[1:-1, 2:])  # right edges, walk -y
    segs += [
        ((c + 1, r + 1), (c + 1, r)) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
    ]
    for a, b in segs:
        edges.setdefault(a, []).append(b)

    loops: list[list[tuple[int, int]]] = []
    while edges:
        start = next(iter(edges))
        loop = [start]
        cur, prev_dir = start, None
        while True:
            outs = edges[cur]
            if len(outs) == 1 or prev_dir is None:
                nxt = outs.pop(0)
            else:
                # Saddle vertex: turn towards the interior, keeping diagonal pixels apart.
                inward = (prev_dir[1], -prev_dir[0])
                nxt = min(outs, key=lambda p: 0 if (p[0] - cur[0], p[1] - cur[1]) == inward else 1)
                outs.remove(nxt)
            if not outs:
                del edges[cur]
            prev_dir = (nxt[0] - cur[0], nxt[1] - cur[1])
            cur = nxt
            if cur == start:
                break
            loop.append(cur)
        loops.append(loop)

    def corners(loop: list[tuple[int, int]]) -> np.ndarray:
        """Direction-change vertices moved half a pixel inwards -> pixel centres (x, y)."""
        pts = np.array(loop)
        d_in = pts - np.roll(pts, 1, axis=0)
        d_out = np.roll(pts, -1, axis=0) - pts
        keep = np.any(d_in != d_out, axis=1)
        n_in = np.stack([d_in[:, 1], -d_in[:, 0]], axis=1)
        n_out = np.stack([d_out[:, 1], -d_out[:, 0]], axis=1)
        shifted = pts * 2 - 1 + n_in + n_out  # doubled coordinates: stay integer
        return (shifted[keep] // 2).astype(int)

    def signed_area(loop: list[tuple[int, int]]) -> float:
        p = np.array(loop, dtype=float)
        return 0.5 * float(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))

    def contains(loop: list[tuple[int, int]], x: float, y: float) -> bool:
        p = np.array(loop, dtype=float)
        q = np.roll(p, -1, axis=0)
        crosses = (p[:, 1] > y) != (q[:, 1] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xs = p[:, 0] + (y - p[:, 1]) * (q[:, 0] - p[:, 0]) / (q[:, 1] - p[:, 1])
        return bool(np.count_nonzero(crosses & (xs > x)) % 2)

    areas = [signed_area(lp) for lp in loops]
    # Outer loops run one way round, holes the other; the outer sign is that of the biggest.
    outer_sign = np.sign(areas[int(np.argmax(np.abs(areas)))]) if loops else 1.0
    outers = [i for i, a in enumerate(areas) if np.sign(a) == outer_sign]
    polys = {i: corners(loops[i]) for i in outers}
    for h, a in enumerate(areas):
        if np.sign(a) == outer_sign:
            continue
        # A point strictly inside the hole: the centre of the background pixel next to
        # the hole's first edge (pixel centres never lie on pixel edges).
        (x0, y0), (x1, y1) = loops[h][0], loops[h][1]
        dx, dy = x1 - x0, y1 - y0
        px, py = (x0 + x1) / 2 - dy * 0.5, (y0 + y1) / 2 + dx * 0.5  # corner coordinates
        holders = [i for i in outers if contains(loops[i], px, py)]
        if not holders:
            continue
        owner = min(holders, key=lambda i: abs(areas[i]))
        hole = corners(loops[h])
        outer = polys[owner]
        dist = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        # outer[..i] -> hole[j..] -> hole[..j] -> outer[i..]: a zero-width bridge.
        polys[owner] = np.concatenate([outer[: i + 1], hole[j:], hole[: j + 1], outer[i:]], axis=0)
    return [polys[i].tolist() for i in outers]


def export_reason_seg(
    dataset: Sequence[SegRecord],
    out_dir: str | Path,
    keyword_file: str | Path | None = None,
    limit: int | None = None,
) -> list[str]:
    """Write records in the ReasonSeg on-disk format (SPEC §5) plus a keyword file.

    For each referent: ``NAME.jpg`` (JPEG quality 95) and ``NAME.json`` with ``shapes``
    (one ``{"label": "target", "points": [[x, y], ...]}`` per traced polygon of the union of
    its masks; none for a negative), ``text`` (``[query]``) and ``is_sentence``. ReasonSeg
    has one mask per file, so a multi-target referent is exported as the union of its
    masks. The keyword file (``keyword_outputs.json`` format: a list of ``{query, outputs,
    image, json, keyword}``) goes to ``keyword_file`` (default ``out_dir /
    "keyword_outputs.json"``).

    Returns:
        the exported NAMEs, in order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    names: list[str] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for idx in range(n):
        record = dataset[idx]
        if record.image is None:
            raise KeySegConfigError(f"{record.sample_id}: export needs records with .image set")
        queries = record.meta.get("queries", [{}] * len(record.referents))
        for j, (ref, qmeta) in enumerate(zip(record.referents, queries, strict=True)):
            name = record.sample_id if len(record.referents) == 1 else f"{record.sample_id}_{j}"
            union = np.any((ref.masks != 0) & (ref.masks != 255), axis=0)
            shapes = [
                {"label": "target", "points": poly, "shape_type": "polygon"}
                for poly in mask_to_polygons(union)
            ]
            record.image.convert("RGB").save(out / f"{name}.jpg", quality=95)
            doc = {"shapes": shapes, "text": [ref.text], "is_sentence": ref.is_sentence}
            atomic_write_json(out / f"{name}.json", doc, indent=1)
            entries.append(
                {
                    "query": ref.text,
                    "outputs": qmeta.get("explanation", ref.answer or ""),
                    "image": f"{name}.jpg",
                    "json": f"{name}.json",
                    "keyword": ref.keyword,
                }
            )
            names.append(name)
    atomic_write_json(
        Path(keyword_file) if keyword_file else out / "keyword_outputs.json", entries, indent=1
    )
    return names
