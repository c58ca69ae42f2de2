"""Shapes as polygons, their exact binary masks, and scene layout (objects placed in
z-order so each keeps enough of itself visible)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from keyseg.data.shapes.world import COLOURS, KINDS, ShapesConfig
from keyseg.errors import KeySegConfigError

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
        # Centroids from row/column projections: far cheaper than (n, H, W) coordinate grids;
        # (0, 0) for an object with nothing visible (only hand-built scenes have one).
        cx = self.visible.sum(1) @ np.arange(w) / np.maximum(self.areas, 1)
        cy = self.visible.sum(2) @ np.arange(h) / np.maximum(self.areas, 1)
        self.centroids = np.stack([cx, cy], axis=1)


def _visible(full: np.ndarray) -> np.ndarray:
    """Visible masks from full masks in z-order: each minus everything drawn above it."""
    vis = full.copy()
    above = np.zeros(full.shape[1:], dtype=bool)
    for i in range(len(full) - 1, -1, -1):
        vis[i] &= ~above
        above |= full[i]
    return vis


def scene_from_objects(objects: list[ShapeObject], size: int) -> Scene:
    """The :class:`Scene` of ``objects`` (in z-order, ``objects[i].z == i``) on a ``size`` px
    image: a record's scene again from its ``meta`` (see ``objects_from_meta``), or a
    hand-built one."""
    if not objects:
        raise KeySegConfigError("a scene needs at least one object")
    full = np.stack([render_object_mask(o, size) for o in objects])
    return Scene(list(objects), full, _visible(full))


def cell_labels(scene: Scene, grid: int) -> np.ndarray:
    """``(2, grid * grid)`` int64: per cell of a ``grid x grid`` split of the image
    (row-major), the colour and the kind of the object that shows most in it (1-based
    indices into ``COLOURS`` / ``KINDS``; 0 = background, or no object covers 40 %). Dense
    targets for a vision encoder's patch features (the lab's stand-in for the semantic
    pretraining real encoders arrive with)."""
    n, size, _ = scene.visible.shape
    cell = size // grid
    cover = scene.visible[:, :grid * cell, :grid * cell].reshape(
        n, grid, cell, grid, cell).mean(axis=(2, 4))  # (n, grid, grid)
    best, share = cover.argmax(0).reshape(-1), cover.max(0).reshape(-1)
    colours = np.array([list(COLOURS).index(o.colour) + 1 for o in scene.objects])
    kinds = np.array([KINDS.index(o.kind) + 1 for o in scene.objects])
    keep = share >= 0.4
    return np.stack([np.where(keep, colours[best], 0), np.where(keep, kinds[best], 0)])


def make_scene(
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
        return make_scene(rng, cfg, same)
    full = np.stack(fulls)
    return Scene(objects, full, _visible(full))
