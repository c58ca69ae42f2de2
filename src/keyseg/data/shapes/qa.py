"""Visual questions and answers about a shapes scene: the supervision that teaches the tiny
VLM to see (which shapes, what colour, where, how many) and to talk, before KeySeg.

Question types (:data:`QUESTION_TYPES`), each realised by a few *slots* (sub-intents) with
many paraphrase templates:

=============  ===========================================  ================================
type           example question                             answer
=============  ===========================================  ================================
``what``       "What shape is the red one?"                  "circle"
               "What is in the top left part of the image?"  "red circle"
``where``      "Where is the blue star?"                     "top right" (a 3x3 grid:
                                                             :data:`REGIONS`)
``colour``     "What colour is the star?"                    "blue"
``size``       "Which shape is the largest?"                 "red circle"
               "Which is bigger, the red circle or the ...?"
``count``      "How many circles are there?"                 "two" (words, "zero" included)
``existence``  "Is there a purple cross?"                    "yes" / "no" (about half each)
``relation``   "Which shape is left of the blue star?"       "green ring"
               "Which shape is furthest to the left?"
``describe``   "What shapes are in this image?"              "a red circle, a blue star and a
                                                             green ring" (left to right)
``list``       "Which shapes are blue?"                      "the blue circle and the blue
               "List the stars."                             ring" (left to right; only when
                                                             asked for, see below)
=============  ===========================================  ================================

``list`` is the QA form of a multi-target query (every shape of a colour or a kind, named
left to right). It is one of :data:`OPTIONAL_QUESTION_TYPES`: asked only when ``types`` names
it, so the recipes recorded before it existed draw the same questions as they did.

Answers are short and follow from the scene alone, so accuracy is an exact match after
:func:`normalise_answer`. A question is asked only when its answer is unambiguous for what
the image *shows*:

* positions and sizes are those of the visible pixels (after occlusion); an object with no
  visible pixel is not in the image;
* an object that shows too little of itself, or touches another object of its colour (the two
  read as one blob), is *doubtful*: a question is kept only if its answer is the same with
  and without the doubtful objects (and a doubtful object is never the subject);
* a referent ("the blue star", "the star") must be unique; spatial answers need clear-cut
  positions (a margin of :data:`MARGIN` of the image side from every grid line or rival),
  sizes a clear ratio (:data:`SIZE_RATIO`).

Noun-phrase templates ("the colour of the star") are wrapped in a question the way
``keyseg.tokens.SHORT_QUESTIONS`` wrap a class name ("What is the colour of the star in this
image?", "Can you tell me ...?"); sentence templates may get a suffix as ``LONG_QUESTIONS``
do. The last template of each slot is held out (:data:`QA_HELDOUT_TEMPLATE_IDS`): only val
and test ask it (:func:`qa_template_ids`), as :mod:`~keyseg.data.shapes.queries` does.
:func:`record_qa` is seeded: the same record and seed give the same questions.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from keyseg.config import SHAPES_QA_TYPES
from keyseg.data.sample import SegRecord
from keyseg.data.shapes.dataset import objects_from_meta
from keyseg.data.shapes.geometry import Scene, scene_from_objects
from keyseg.data.shapes.world import COLOURS, KINDS, PLURALS, check_split
from keyseg.errors import KeySegConfigError

#: Types asked only when named (``types=``); see the module docstring.
OPTIONAL_QUESTION_TYPES: tuple[str, ...] = ("list",)
#: Every question type (defined with the configs, which name them in YAML).
ALL_QUESTION_TYPES: tuple[str, ...] = SHAPES_QA_TYPES
#: The question types asked by default.
QUESTION_TYPES: tuple[str, ...] = tuple(t for t in ALL_QUESTION_TYPES
                                        if t not in OPTIONAL_QUESTION_TYPES)

MARGIN = 0.05
"""Fraction of the image side: how clearly a centroid must sit inside a grid cell, or beyond
a rival, for a spatial answer."""
SIZE_RATIO = 1.3
"""The largest (smallest) visible area must beat the runner-up by this factor."""
MIN_VISIBLE_FRACTION = 0.25
"""An object showing less of its own area than this is doubtful."""
MIN_VISIBLE_PIXELS = 0.002
"""... and so is one showing fewer pixels than this fraction of the image."""

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "middle", "right")


def _region_name(row: int, col: int) -> str:
    if row == 1:
        return _COLS[col]
    if col == 1:
        return _ROWS[row]
    return f"{_ROWS[row]} {_COLS[col]}"


#: The answers of ``where``: the cells of a 3x3 grid, by row ("middle" is the centre cell).
REGIONS: tuple[str, ...] = tuple(_region_name(r, c) for r in range(3) for c in range(3))
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class QATemplate:
    """A question template: ``slot`` names the sub-intent that fills and answers it (see
    :func:`answer`); a noun phrase (``is_sentence`` False) is wrapped in a question."""

    id: str
    qtype: str
    slot: str
    pattern: str
    is_sentence: bool
    heldout: bool = False


@dataclass(frozen=True)
class QAPair:
    """One realised question with its answer (see :func:`normalise_answer`)."""

    qtype: str
    template_id: str
    question: str
    answer: str
    heldout: bool = False


# Per slot: (pattern, is_sentence); "~" marks a noun phrase. The last one is held out.
# Fields: {colour} {kind} {kinds} (plural) {region} {an} (article + noun phrase, existence)
# {first} {second} (two object names, size.pair).
_PATTERNS: dict[str, tuple[str, list[str]]] = {
    "what.colour": ("what", [
        "What shape is the {colour} one?",
        "Which shape is {colour}?",
        "What kind of shape is {colour}?",
        "What is the {colour} shape?",
        "Name the {colour} shape.",
        "What is the {colour} object in this image?",
        "~the shape of the {colour} object",
        "~the kind of shape that is {colour}",
        "Which kind of figure is drawn in {colour}?",
    ]),
    "what.region": ("what", [
        "What is in the {region} part of the image?",
        "Which shape is in the {region} part?",
        "What shape do you see in the {region} part of the picture?",
        "Name the shape in the {region} part of the image.",
        "~the shape in the {region} part of the image",
        "~the object in the {region} part",
        "What occupies the {region} part of the picture?",
    ]),
    "where.ck": ("where", [
        "Where is the {colour} {kind}?",
        "Where is the {colour} {kind} in this image?",
        "In which part of the image is the {colour} {kind}?",
        "Which part of the image shows the {colour} {kind}?",
        "Where can you see the {colour} {kind}?",
        "~the location of the {colour} {kind}",
        "~the position of the {colour} {kind}",
        "Whereabouts is the {colour} {kind}?",
    ]),
    "where.k": ("where", [
        "Where is the {kind}?",
        "In which part of the picture is the {kind}?",
        "Where is the {kind} located?",
        "~the location of the {kind}",
        "~the part of the picture with the {kind}",
        "Where would I find the {kind}?",
    ]),
    "colour.k": ("colour", [
        "What colour is the {kind}?",
        "What is the colour of the {kind}?",
        "Which colour does the {kind} have?",
        "What color is the {kind}?",
        "The {kind} is which colour?",
        "~the colour of the {kind}",
        "~the {kind}'s colour",
        "In what colour is the {kind} painted?",
    ]),
    "colour.region": ("colour", [
        "What colour is the shape in the {region} part of the image?",
        "Which colour is the shape in the {region} part?",
        "~the colour of the shape in the {region} part",
        "What color is the object in the {region} part of the picture?",
    ]),
    "size.largest": ("size", [
        "Which shape is the largest?",
        "What is the largest shape?",
        "Which shape is the biggest?",
        "Which shape covers the most area?",
        "~the largest shape",
        "~the biggest shape",
        "Which shape takes up the most space?",
    ]),
    "size.smallest": ("size", [
        "Which shape is the smallest?",
        "What is the smallest shape?",
        "Which shape is the tiniest?",
        "Which shape covers the least area?",
        "~the smallest shape",
        "~the tiniest shape",
        "Which shape takes up the least space?",
    ]),
    "size.pair": ("size", [
        "Which is bigger, the {first} or the {second}?",
        "Which is larger: the {first} or the {second}?",
        "Which shape is bigger, the {first} or the {second}?",
        "~the bigger of the {first} and the {second}",
        "Of the {first} and the {second}, which one is larger?",
    ]),
    "count.k": ("count", [
        "How many {kinds} are there?",
        "How many {kinds} are in this image?",
        "How many {kinds} can you see?",
        "Count the {kinds}.",
        "~the number of {kinds}",
        "~the number of {kinds} in the picture",
        "How many {kinds} do you count?",
    ]),
    "count.c": ("count", [
        "How many {colour} shapes are there?",
        "How many shapes are {colour}?",
        "Count the {colour} shapes.",
        "~the number of {colour} shapes",
        "How many of the shapes are {colour}?",
    ]),
    "count.all": ("count", [
        "How many shapes are there?",
        "How many shapes are in this image?",
        "How many objects can you see?",
        "Count the shapes.",
        "~the number of shapes",
        "How many figures are drawn in the picture?",
    ]),
    "existence.ck": ("existence", [
        "Is there {an}?",
        "Is there {an} in this image?",
        "Can you see {an}?",
        "Does the image contain {an}?",
        "Are there any {colour} {kinds}?",
        "Any {colour} {kinds}?",
        "Do you spot {an} anywhere?",
    ]),
    "existence.k": ("existence", [
        "Is there {an}?",
        "Are there any {kinds}?",
        "Does this image have {an}?",
        "Can you find {an} in the picture?",
        "Any {kinds}?",
        "Do you see {an} anywhere?",
    ]),
    "existence.c": ("existence", [
        "Is there {an}?",
        "Is any shape {colour}?",
        "Are there {colour} shapes?",
        "Is anything coloured {colour}?",
    ]),
    "relation.left": ("relation", [
        "Which shape is left of the {colour} {kind}?",
        "What is to the left of the {colour} {kind}?",
        "Which shape is on the left side of the {colour} {kind}?",
        "~the shape left of the {colour} {kind}",
        "~the shape to the left of the {colour} {kind}",
        "Which shape lies to the left of the {colour} {kind}?",
    ]),
    "relation.right": ("relation", [
        "Which shape is right of the {colour} {kind}?",
        "What is to the right of the {colour} {kind}?",
        "Which shape is on the right side of the {colour} {kind}?",
        "~the shape right of the {colour} {kind}",
        "~the shape to the right of the {colour} {kind}",
        "Which shape lies to the right of the {colour} {kind}?",
    ]),
    "relation.above": ("relation", [
        "Which shape is above the {colour} {kind}?",
        "What is above the {colour} {kind}?",
        "Which shape is higher up than the {colour} {kind}?",
        "~the shape above the {colour} {kind}",
        "Which shape sits over the {colour} {kind}?",
    ]),
    "relation.below": ("relation", [
        "Which shape is below the {colour} {kind}?",
        "What is beneath the {colour} {kind}?",
        "Which shape is under the {colour} {kind}?",
        "~the shape below the {colour} {kind}",
        "Which shape lies lower than the {colour} {kind}?",
    ]),
    "relation.leftmost": ("relation", [
        "Which shape is the leftmost?",
        "Which shape is furthest to the left?",
        "What is the leftmost shape?",
        "~the leftmost shape",
        "Which shape is closest to the left edge?",
    ]),
    "relation.rightmost": ("relation", [
        "Which shape is the rightmost?",
        "Which shape is furthest to the right?",
        "What is the rightmost shape?",
        "~the rightmost shape",
        "Which shape is closest to the right edge?",
    ]),
    "relation.topmost": ("relation", [
        "Which shape is the highest?",
        "Which shape is nearest the top?",
        "What is the topmost shape?",
        "~the topmost shape",
        "Which shape is closest to the top edge?",
    ]),
    "relation.lowest": ("relation", [
        "Which shape is the lowest?",
        "Which shape is nearest the bottom?",
        "What is the bottom-most shape?",
        "~the lowest shape",
        "Which shape is closest to the bottom edge?",
    ]),
    "describe.list": ("describe", [
        "Describe the image.",
        "What shapes are in this image?",
        "What do you see in this image?",
        "List the shapes in this image.",
        "List the shapes from left to right.",
        "Which shapes can you see?",
        "Name every shape in the picture.",
        "Tell me which shapes are drawn here.",
    ]),
    "list.k": ("list", [
        "Which shapes are {kinds}?",
        "List the {kinds}.",
        "Name each {kind} in the image.",
        "What {kinds} are there?",
        "~the {kinds} you can see",
        "Which {kinds} can you see?",
    ]),
    "list.c": ("list", [
        "Which shapes are {colour}?",
        "List the {colour} shapes.",
        "Name each {colour} shape in the image.",
        "What are the {colour} shapes?",
        "~the {colour} shapes you can see",
        "Which of the shapes are {colour}?",
    ]),
}

#: How a noun-phrase template becomes a question (``{x}``: the phrase; ``{X}``: capitalised),
#: after ``keyseg.tokens.SHORT_QUESTIONS``.
PHRASE_WRAPPERS: tuple[str, ...] = (
    "What is {x} in this image?",
    "Can you tell me {x}?",
    "Please tell me {x}.",
    "What is {x}?",
    "Tell me {x}.",
    "{X}?",
)
#: How a sentence template is asked, after ``keyseg.tokens.LONG_QUESTIONS``.
SENTENCE_WRAPPERS: tuple[str, ...] = (
    "{sent}",
    "{sent}",
    "{sent} Please answer briefly.",
    "{sent} Answer in a few words.",
    "Look at the image. {sent}",
)


def _build_templates() -> dict[str, QATemplate]:
    out: dict[str, QATemplate] = {}
    for slot, (qtype, patterns) in _PATTERNS.items():
        if qtype not in ALL_QUESTION_TYPES or not slot.startswith(qtype + "."):
            raise KeySegConfigError(f"QA slot {slot!r}: bad question type {qtype!r}")
        for i, pattern in enumerate(patterns):
            phrase = pattern.startswith("~")
            template = QATemplate(
                f"{slot}.{i}", qtype, slot, pattern.removeprefix("~"), not phrase,
                heldout=i == len(patterns) - 1,
            )
            out[template.id] = template
    return out


QA_TEMPLATES: dict[str, QATemplate] = _build_templates()
#: The sub-intents, each with its answer rule (:func:`answer`): ``"count.k"``, ...
QA_SLOTS: tuple[str, ...] = tuple(_PATTERNS)
QA_HELDOUT_TEMPLATE_IDS: frozenset[str] = frozenset(
    k for k, v in QA_TEMPLATES.items() if v.heldout
)


def qa_template_ids(split: str) -> frozenset[str]:
    """Ids of the QA templates ``split`` may use: train never sees the held-out ones."""
    check_split(split)
    if split == "train":
        return frozenset(QA_TEMPLATES) - QA_HELDOUT_TEMPLATE_IDS
    return frozenset(QA_TEMPLATES)


# --------------------------------------------------------------------------- the scene as seen


@dataclass(frozen=True)
class SeenObject:
    """One object as the image shows it: visible area (pixels) and visible centroid."""

    index: int
    kind: str
    colour: str
    area: float
    x: float
    y: float

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class SceneView:
    """What questions may rely on. ``clear``: the objects that show well; ``seen``: those
    plus the doubtful ones (see the module docstring); objects with nothing visible are in
    neither. ``size``: the image side in pixels."""

    clear: tuple[SeenObject, ...]
    seen: tuple[SeenObject, ...]
    size: int


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether masks ``a`` and ``b`` (``(S, S)`` bool) overlap or are 8-neighbours."""
    grown = np.pad(a, 1)
    near = np.zeros_like(a)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= grown[dy : dy + a.shape[0], dx : dx + a.shape[1]]
    return bool((near & b).any())


def view_scene(scene: Scene) -> SceneView:
    """The :class:`SceneView` of ``scene``: visible objects, split into clear and doubtful."""
    n, size, _ = scene.visible.shape
    full_areas = scene.full.reshape(n, -1).sum(1)
    shown = scene.areas > 0
    doubtful = shown & ((scene.areas < MIN_VISIBLE_FRACTION * np.maximum(full_areas, 1))
                        | (scene.areas < MIN_VISIBLE_PIXELS * size * size))
    for i in range(n):
        for j in range(i + 1, n):
            if (shown[i] and shown[j] and scene.objects[i].colour == scene.objects[j].colour
                    and _touches(scene.visible[i], scene.visible[j])):
                doubtful[i] = doubtful[j] = True
    seen = [
        SeenObject(i, o.kind, o.colour, float(scene.areas[i]),
                   float(scene.centroids[i, 0]), float(scene.centroids[i, 1]))
        for i, o in enumerate(scene.objects) if shown[i]
    ]
    return SceneView(tuple(o for o in seen if not doubtful[o.index]), tuple(seen), size)


def scene_from_record(record: SegRecord) -> Scene:
    """The :class:`Scene` of a shapes record, rebuilt from its ``meta`` at its image size."""
    return scene_from_objects(objects_from_meta(record.meta), record.image.size[0])


# --------------------------------------------------------------------------- answers


def _regions(o: SeenObject, size: int) -> set[str]:
    """Grid cells ``o``'s centroid may be read as lying in (two or four when near a line)."""
    third, margin = size / 3, MARGIN * size

    def cells(v: float) -> list[int]:
        return [c for c in range(3) if c * third - margin <= v <= (c + 1) * third + margin]

    return {_region_name(r, c) for r in cells(o.y) for c in cells(o.x)}


def _one(objs: Iterable[SeenObject]) -> SeenObject | None:
    found = list(objs)
    return found[0] if len(found) == 1 else None


def _in_region(view: Sequence[SeenObject], region: str, size: int) -> SeenObject | None:
    """The one object that can be read as lying in ``region``, if it lies clearly there."""
    o = _one(x for x in view if region in _regions(x, size))
    return o if o is not None and _regions(o, size) == {region} else None


def _extreme(view: Sequence[SeenObject], which: str, size: int) -> SeenObject | None:
    if len(view) < 2:
        return None
    if which in ("largest", "smallest"):
        order = sorted(view, key=lambda o: o.area, reverse=which == "largest")
        first, second = order[0].area, order[1].area
        clear = first >= SIZE_RATIO * second if which == "largest" else (
            second >= SIZE_RATIO * first)
        return order[0] if clear else None
    key: Callable[[SeenObject], float] = {
        "leftmost": lambda o: o.x, "rightmost": lambda o: -o.x,
        "topmost": lambda o: o.y, "lowest": lambda o: -o.y,
    }[which]
    order = sorted(view, key=key)
    return order[0] if key(order[1]) - key(order[0]) >= MARGIN * size else None


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(names: Sequence[str], article: Callable[[str], str] = _article) -> str:
    """``"a red circle, a blue star and a green ring"`` (``article``: how each is named)."""
    items = [article(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _left_to_right(objs: Iterable[SeenObject], size: int) -> list[SeenObject] | None:
    """``objs`` sorted left to right, or None when two are too close in x to be ordered."""
    order = sorted(objs, key=lambda o: o.x)
    if any(b.x - a.x < MARGIN * size for a, b in pairwise(order)):
        return None
    return order


def _rule(slot: str, p: dict[str, str], view: Sequence[SeenObject], size: int) -> str | None:
    """The answer of ``slot`` with parameters ``p`` on the objects ``view``; None when the
    question has no unique, clear-cut answer there."""
    family, _, arg = slot.partition(".")
    colour, kind = p.get("colour"), p.get("kind")
    if slot == "what.colour":
        o = _one(x for x in view if x.colour == colour)
        return o.kind if o else None
    if slot in ("what.region", "colour.region"):
        o = _in_region(view, p["region"], size)
        return None if o is None else (o.name if family == "what" else o.colour)
    if family == "where":
        o = _one(x for x in view if x.kind == kind and (arg == "k" or x.colour == colour))
        regions = _regions(o, size) if o else set()
        return regions.pop() if len(regions) == 1 else None
    if slot == "colour.k":
        o = _one(x for x in view if x.kind == kind)
        return o.colour if o else None
    if slot in ("size.largest", "size.smallest"):
        o = _extreme(view, arg, size)
        return o.name if o else None
    if slot == "size.pair":
        a = _one(x for x in view if x.name == p["first"])
        b = _one(x for x in view if x.name == p["second"])
        if a is None or b is None:
            return None
        big, small = (a, b) if a.area >= b.area else (b, a)
        return big.name if big.area >= SIZE_RATIO * small.area else None
    if family in ("count", "existence"):
        n = sum(1 for x in view if (kind is None or x.kind == kind)
                and (colour is None or x.colour == colour))
        if family == "count":
            return NUMBER_WORDS[n]
        return "yes" if n else "no"
    if family == "relation" and arg in ("left", "right", "above", "below"):
        anchor = _one(x for x in view if x.colour == colour and x.kind == kind)
        if anchor is None:
            return None
        sign, attr = {"left": (-1, "x"), "right": (1, "x"), "above": (-1, "y"),
                      "below": (1, "y")}[arg]
        others = [x for x in view if x.index != anchor.index]
        d = {x.index: sign * (getattr(x, attr) - getattr(anchor, attr)) for x in others}
        margin = MARGIN * size
        hits = [x for x in others if d[x.index] > margin]
        # exactly one object on that side, every other one clearly on the opposite side
        if len(hits) == 1 and all(d[x.index] < -margin for x in others if x is not hits[0]):
            return hits[0].name
        return None
    if family == "relation":
        o = _extreme(view, arg, size)
        return o.name if o else None
    if slot == "describe.list":
        order = _left_to_right(view, size)
        return _listing([o.name for o in order]) if order else None
    if family == "list":
        attr = "kind" if arg == "k" else "colour"
        group = _left_to_right((x for x in view if getattr(x, attr) == p[attr]), size)
        names = [o.name for o in group or ()]
        if not names or len(set(names)) < len(names):  # no two may share a name
            return None
        return _listing(names, lambda n: f"the {n}")
    raise KeySegConfigError(f"QA slot {slot!r} has no answer rule")


def answer(slot: str, view: SceneView, **params: str) -> str | None:
    """The answer to a question of ``slot`` (a key of :data:`QA_SLOTS`) about ``view``, with
    the slot's parameters (``colour``, ``kind``, ``region``, ``first``/``second``: object
    names): None when it has no unique, clear-cut answer, or when the doubtful objects would
    change it."""
    if slot not in _PATTERNS:
        raise KeySegConfigError(f"unknown QA slot {slot!r} (known: {', '.join(_PATTERNS)})")
    clear = _rule(slot, params, view.clear, view.size)
    if clear is None or clear != _rule(slot, params, view.seen, view.size):
        return None
    return clear


def _choices(slot: str, view: SceneView, rng: np.random.Generator) -> list[dict[str, str]]:
    """Candidate parameters of ``slot`` for ``view``, in a seeded random order; subjects
    come from the clear objects, absent things from the whole vocabulary."""
    family, _, arg = slot.partition(".")
    clear, size = view.clear, view.size

    def shuffled(items: Iterable) -> list:
        items = sorted(set(items))
        return [items[int(i)] for i in rng.permutation(len(items))]

    if slot == "what.colour":
        return [{"colour": c} for c in shuffled(o.colour for o in clear)]
    if arg == "region":
        cells = [_regions(o, size) for o in clear]
        return [{"region": r} for r in shuffled(next(iter(c)) for c in cells if len(c) == 1)]
    if slot in ("where.ck", "relation.left", "relation.right", "relation.above",
                "relation.below"):
        return [{"colour": c, "kind": k} for c, k in shuffled((o.colour, o.kind) for o in clear)]
    if slot in ("where.k", "colour.k"):
        return [{"kind": k} for k in shuffled(o.kind for o in clear)]
    if slot == "size.pair":
        names = shuffled(o.name for o in clear)
        pairs = [(a, b) for a in names for b in names if a != b]
        return [{"first": a, "second": b} for a, b in (pairs[int(i)]
                                                       for i in rng.permutation(len(pairs)))]
    if family == "list":  # groups of several first: the multi-target case
        attr = "kind" if arg == "k" else "colour"
        sizes = Counter(getattr(o, attr) for o in clear)
        order = (shuffled(v for v, n in sizes.items() if n > 1)
                 + shuffled(v for v, n in sizes.items() if n == 1))
        return [{attr: v} for v in order]
    if family in ("count", "existence") and arg != "all":
        attr = {"k": ("kind",), "c": ("colour",), "ck": ("colour", "kind")}[arg]
        present = shuffled(tuple(getattr(o, a) for a in attr) for o in clear)
        everything = {"kind": KINDS, "colour": tuple(COLOURS)}
        seen = {tuple(getattr(o, a) for a in attr) for o in view.seen}
        combos = [()]
        for a in attr:
            combos = [(*c, v) for c in combos for v in everything[a]]
        absent = [c for c in combos if c not in seen]
        if arg == "ck":  # hard negatives first: both words in the image, never together
            words = {o.colour for o in view.seen}, {o.kind for o in view.seen}
            hard = [c for c in absent if c[0] in words[0] and c[1] in words[1]]
            absent = shuffled(hard) + shuffled(set(absent) - set(hard))
        else:
            absent = shuffled(absent)
        # existence: "yes" and "no" about equally often; count: mostly things that are there
        first_absent = rng.random() < (0.5 if family == "existence" else 0.2)
        order = absent + present if first_absent else present + absent
        return [dict(zip(attr, c, strict=True)) for c in order[:1]]
    return [{}]


def _noun(p: dict[str, str]) -> str:
    """The thing a count or existence question asks about: "red star", "star", "red shape"."""
    colour, kind = p.get("colour", ""), p.get("kind", "")
    return f"{colour} {kind}".strip() if kind else f"{colour} shape"


def _fill(template: QATemplate, p: dict[str, str], rng: np.random.Generator) -> str:
    colour, kind = p.get("colour", ""), p.get("kind", "")
    noun = _noun(p)
    text = template.pattern.format(
        colour=colour, kind=kind, kinds=PLURALS.get(kind, ""), region=p.get("region", ""),
        an=_article(noun), first=p.get("first", ""), second=p.get("second", ""),
    )
    if template.is_sentence:
        return SENTENCE_WRAPPERS[int(rng.integers(len(SENTENCE_WRAPPERS)))].format(sent=text)
    wrapper = PHRASE_WRAPPERS[int(rng.integers(len(PHRASE_WRAPPERS)))]
    return wrapper.format(x=text, X=text[0].upper() + text[1:])


def realise(template: QATemplate, view: SceneView, rng: np.random.Generator,
            restate: bool = False) -> QAPair | None:
    """Ask ``template`` about ``view`` if some choice of its parameters has a clear answer
    that the doubtful objects do not change; None otherwise.

    ``restate``: an existence answer names what was asked before its yes/no ("red star:
    no"), so the answer is decided at the position right after the thing's own word."""
    for p in _choices(template.slot, view, rng):
        reply = answer(template.slot, view, **p)
        if reply is not None:
            if restate and template.qtype == "existence":
                reply = f"{_noun(p)}: {reply}"
            return QAPair(template.qtype, template.id, _fill(template, p, rng), reply,
                          template.heldout)
    return None


def scene_qa(scene: Scene | SceneView, split: str, rng: np.random.Generator,
             per_type: int = 1, types: Sequence[str] = QUESTION_TYPES,
             restate: bool = False) -> list[QAPair]:
    """Up to ``per_type`` distinct questions of each of ``types`` about ``scene``, in the
    order of ``types`` (fewer where the scene supports fewer), from the templates ``split``
    may use (``restate``: see :func:`realise`)."""
    unknown = [t for t in types if t not in ALL_QUESTION_TYPES]
    if unknown:
        raise KeySegConfigError(f"unknown QA question type {unknown[0]!r} "
                                f"(known: {', '.join(ALL_QUESTION_TYPES)})")
    view = scene if isinstance(scene, SceneView) else view_scene(scene)
    allowed = qa_template_ids(split)
    out: list[QAPair] = []
    for qtype in types:
        pool = [t for t in QA_TEMPLATES.values() if t.qtype == qtype and t.id in allowed]
        asked: set[str] = set()
        for j in rng.permutation(len(pool)):
            if len(asked) >= per_type:
                break
            pair = realise(pool[int(j)], view, rng, restate)
            if pair is not None and pair.question not in asked:
                asked.add(pair.question)
                out.append(pair)
    return out


def record_qa(record: SegRecord, seed: int = 0, per_type: int = 1,
              types: Sequence[str] = QUESTION_TYPES, restate: bool = False) -> list[QAPair]:
    """:func:`scene_qa` for a shapes record (its split from ``meta``), seeded by ``seed``
    and the record's own seeds: the same record and seed give the same questions."""
    meta = record.meta
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(seed), int(meta["image_seed"]), int(meta.get("world_seed", 0))]))
    return scene_qa(scene_from_record(record), meta["split"], rng, per_type, types, restate)


_NORMAL = {str(i): w for i, w in enumerate(NUMBER_WORDS)} | {"none": "zero", "color": "colour"}


def normalise_answer(text: str) -> str:
    """Lower case, words only, articles dropped, digits as words: ``"The Red circle."`` and
    ``"red circle"`` compare equal, as do ``"2"`` and ``"two"``."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return " ".join(_NORMAL.get(w, w) for w in words if w not in ("a", "an", "the"))
