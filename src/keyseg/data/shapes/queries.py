"""The query language: templates by difficulty, their realisation on a scene (exactly
the intended targets), and the answers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from keyseg.data.shapes.geometry import Scene, ShapeObject
from keyseg.data.shapes.world import COLOURS, KINDS, PLURALS, check_split
from keyseg.errors import KeySegConfigError


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


# Visual properties for attribute queries: phrase -> the kinds that have it. A query names a
# property (and maybe a colour) that exactly one visible object has.
PROPERTIES: dict[str, tuple[str, ...]] = {
    "round": ("circle", "ring"),
    "with a hole": ("ring",),
    "with no corners": ("circle", "ring"),
    "with three corners": ("triangle",),
    "with four corners": ("square", "diamond"),
    "with five points": ("star",),
    "with eight sides": ("octagon",),
    "shaped like a plus": ("cross",),
    "standing on a corner": ("diamond",),
    "with straight sides": ("square", "triangle", "diamond", "octagon", "cross", "star"),
}
#: Properties used only in val/test (their phrasing is new, the concept is not).
HELDOUT_PROPERTIES = frozenset({"with eight sides", "standing on a corner"})


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
        Template("direct.the_c", "direct", "the {colour} one", False, "c"),
        Template("direct.can_ck", "direct", "Can you segment the {colour} {kind}?", True, "ck"),
        Template("direct.show_k", "direct", "Show me the {kind}.", True, "k"),
        Template("direct.which_c", "direct", "Which shape is {colour}?", True, "c"),
        Template("direct.please_ck", "direct", "Please segment the {colour} {kind}.", True, "ck"),
        Template("direct.k_only", "direct", "the {kind}", False, "k"),
        Template("direct.wheres_c", "direct", "Where's the {colour} shape?", True, "c",
                 heldout=True),
        Template("direct.mask_ck", "direct", "mask of the {colour} {kind}", False, "ck",
                 heldout=True),
        # attribute: the target is described by what it looks like (a property, a colour)
        Template("attribute.p", "attribute", "the shape {prop}", False, "attr"),
        Template("attribute.cp", "attribute", "the {colour} shape {prop}", False, "attr_c"),
        Template("attribute.which_p", "attribute", "Which is the shape {prop}?", True, "attr"),
        Template("attribute.segment_cp", "attribute", "Segment the {colour} shape {prop}.", True,
                 "attr_c"),
        Template("attribute.one_p", "attribute", "the one {prop}", False, "attr"),
        Template("attribute.find_p", "attribute", "Can you find the shape {prop}?", True, "attr",
                 heldout=True),
        Template("attribute.which_cp", "attribute", "Which is the {colour} shape {prop}?", True,
                 "attr_c", heldout=True),
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
        Template("relational.which_largest", "relational", "Which shape is the largest?", True,
                 "extreme", "largest"),
        Template("relational.which_smallest", "relational", "Which one is the smallest?", True,
                 "extreme", "smallest"),
        Template("relational.far_right", "relational", "the shape on the far right", False,
                 "extreme", "rightmost"),
        Template("relational.top", "relational", "the topmost shape", False, "extreme",
                 "topmost"),
        Template("relational.what_left_of", "relational",
                 "What is to the left of the {colour} {kind}?", True, "relation", "left"),
        Template("relational.under", "relational", "Segment the shape under the {colour} {kind}.",
                 True, "relation", "below"),
        Template("relational.smallest_k", "relational", "the smallest {kind}", False, "extreme_k",
                 "smallest"),
        Template("relational.bottom", "relational", "the shape at the very bottom", False,
                 "extreme", "lowest", heldout=True),
        Template("relational.what_above", "relational",
                 "Which shape is above the {colour} {kind}?", True, "relation", "above",
                 heldout=True),
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
        Template("multi.kinds", "multi", "{kinds}", False, "multi_k"),
        Template("multi.where_k", "multi", "Where are all the {kinds}?", True, "multi_k"),
        Template("multi.show_c", "multi", "Show me every {colour} shape.", True, "multi_c"),
        Template("multi.c_ones", "multi", "the {colour} ones", False, "multi_c"),
        Template("multi.both_k", "multi", "Segment each {kind} you can see.", True, "multi_k",
                 heldout=True),
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
        Template("negative.where_ck", "negative", "Where is the {colour} {kind}?", True, "neg_ck"),
        Template("negative.segment_ck", "negative", "Segment the {colour} {kind}.", True,
                 "neg_ck"),
        Template("negative.show_k", "negative", "Show me the {kind}.", True, "neg_k"),
        Template("negative.the_k", "negative", "the {kind}", False, "neg_k"),
        Template("negative.can_ck", "negative", "Can you find the {colour} {kind}?", True,
                 "neg_ck", heldout=True),
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
    check_split(split)
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
    if slot in ("attr", "attr_c"):
        props = sorted(p for p in PROPERTIES if heldout_ok or p not in HELDOUT_PROPERTIES)
        rng.shuffle(props)
        for prop in props:
            having = [i for i, o in enumerate(objs) if o.kind in PROPERTIES[prop]]
            if slot == "attr" and len(having) == 1:
                i = having[0]
                keyword = objs[i].kind if len(PROPERTIES[prop]) == 1 else objs[i].description
                return Query(template, _fill(template, prop=prop), keyword, (i,),
                             objs[i].description)
            if slot == "attr_c" and len(having) >= 2:
                # the colour must be needed: several objects have the property
                colours = [objs[i].colour for i in having]
                unique = [i for i in having if colours.count(objs[i].colour) == 1]
                if unique:
                    i = pick(unique)
                    return Query(template, _fill(template, prop=prop, colour=objs[i].colour),
                                 objs[i].description, (i,), objs[i].description)
        return None
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
_MULTI_ANSWERS = ("Sure, they are {segs}.", "The {desc} are {segs}.", "They are {segs}.")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
_NEGATIVE_ANSWERS = (
    "There is no such shape, [SEG].",
    "Nothing in the image matches, [SEG].",
    "No shape fits that description, [SEG].",
)


# answer_style "restate": positive and negative answers share their start up to the target's
# name, so the answer is decided at the position right after it.
_RESTATED_SINGLE_ANSWERS = ("The {desc} [SEG].", "Sure, the {desc} [SEG].")
_RESTATED_NEGATIVE_ANSWERS = (
    "The {desc}: there is no such shape, [SEG].",
    "Sure, the {desc}: no such shape in the image, [SEG].",
)
# "verdict": the name, then the stage 2 lookup's own verdict word ("red star: yes"), so the
# answer is decided where and as `experiments/pretrain_vlm.py --lookup-turn` trains it.
_VERDICT_SINGLE_ANSWERS = ("The {desc}: yes, [SEG].", "Sure, the {desc}: yes, [SEG].")
_VERDICT_NEGATIVE_ANSWERS = (
    "The {desc}: no, there is no such shape, [SEG].",
    "Sure, the {desc}: no, there is no such shape in the image, [SEG].",
)
# "asked": as "verdict", but the name before the verdict is what the query asked for ("The
# circle: yes, the blue circle [SEG]."), as a negative answer's is ("The circle: no, ...").
# Under "verdict" a present circle is named with its colour and an absent one without, so
# the verdict falls on the word after "The", where "yes" is split over six colours and
# "no" is one word; here it falls on one binary choice at the lookup's position.
_ASKED_SINGLE_ANSWERS = ("The {asked}: yes, {which}[SEG].", "Sure, the {asked}: yes, {which}[SEG].")
# "asked_only": as "asked", but the answer never names what only the image tells (a colour
# the query did not give, the target of "the smallest diamond"): the LM of the lab cannot
# bind colours to kinds, and the mask follows the name it writes, so a wrong name costs the
# whole mask while SAM's decoder finds the asked kind itself. A query whose concept only the
# image gives gets no name at all, and multi-target answers count their targets instead of
# naming them (left to right, as the targets are ordered).
_ASKED_ONLY_SINGLE_ANSWERS = ("The {asked}: yes, [SEG].", "Sure, the {asked}: yes, [SEG].")
_UNASKED_ANSWERS = ("Sure, [SEG].", "It is [SEG].")
_COUNTED_MULTI_ANSWERS = ("The {desc}: {segs}.", "Sure, the {desc}: {segs}.")
_ANSWER_POOLS = {  # style -> (single-target answers, negative answers)
    "lisa": (_SINGLE_ANSWERS, _NEGATIVE_ANSWERS),
    "restate": (_RESTATED_SINGLE_ANSWERS, _RESTATED_NEGATIVE_ANSWERS),
    "verdict": (_VERDICT_SINGLE_ANSWERS, _VERDICT_NEGATIVE_ANSWERS),
    "asked": (_ASKED_SINGLE_ANSWERS, _VERDICT_NEGATIVE_ANSWERS),
    "asked_only": (_ASKED_ONLY_SINGLE_ANSWERS, _VERDICT_NEGATIVE_ANSWERS),
}
ANSWER_STYLES = tuple(_ANSWER_POOLS)


def asked_name(query: Query) -> str:
    """What a single-target or negative query asks for, as a noun phrase: its keyword, with
    "shape" after a bare colour ("circle", "red star", "yellow shape")."""
    return f"{query.keyword} shape" if query.keyword in COLOURS else query.keyword


def query_gives_keyword(query: Query) -> bool:
    """Whether the query itself says its concept (its kind, colour or both, or a clue that
    means one), rather than leaving it to the image ("the smallest diamond" -> "green
    diamond"). Negatives always do."""
    return (not query.targets or query.keyword != query.description
            or query.template.slot == "ck")


def target_names(query: Query, scene: Scene) -> list[str]:
    """One name per target of a multi-target query, in target order (left to right): its
    colour and kind, with an ordinal where two targets share both ("the first red circle")."""
    names = [scene.objects[i].description for i in query.targets]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if names.count(name) > 1:
            out.append(f"the {_ORDINALS[seen.get(name, 0)]} {name}")
            seen[name] = seen.get(name, 0) + 1
        else:
            out.append(f"the {name}")
    return out


def write_answer(query: Query, rng: np.random.Generator,
                 scene: Scene | None = None, style: str = "lisa") -> tuple[str, str]:
    """(answer with exactly k ``[SEG]``, explanation without ``[SEG]`` for the keyword file).

    A multi-target answer names each target before its ``[SEG]`` ("the red circle [SEG] and
    the blue circle [SEG]") when ``scene`` is given: the state that prompts each mask then
    follows a different object's name, so the masks of one answer can differ. ``style``
    (``ShapesConfig.answer_style``) words single-target and negative answers, and under
    ``asked_only`` counts multi-target ones instead ("The circles: the first [SEG] and the
    second [SEG].")."""
    if style not in ANSWER_STYLES:
        raise KeySegConfigError(f"unknown answer style {style!r} (known: "
                                f"{', '.join(ANSWER_STYLES)})")
    k = len(query.targets)
    if k == 0:
        pool = _ANSWER_POOLS[style][1]
        answer = pool[int(rng.integers(len(pool)))]
        return (answer.format(desc=query.description),
                f"There is no {query.description} in the image.")
    if k == 1 and style == "asked_only" and not query_gives_keyword(query):
        answer = _UNASKED_ANSWERS[int(rng.integers(len(_UNASKED_ANSWERS)))]
        return answer, f"It is the {query.description}."
    if k == 1:
        pool = _ANSWER_POOLS[style][0]
        answer = pool[int(rng.integers(len(pool)))]
        asked = asked_name(query)
        which = "" if asked == query.description else f"the {query.description} "
        return (answer.format(desc=query.description, asked=asked, which=which),
                f"It is the {query.description}.")
    if style == "asked_only":
        named = [f"the {_ORDINALS[i]} [SEG]" for i in range(k)]
        pool = _COUNTED_MULTI_ANSWERS
    else:
        named = ([f"{name} [SEG]" for name in target_names(query, scene)]
                 if scene is not None else ["[SEG]"] * k)
        pool = _MULTI_ANSWERS
    segs = ", ".join(named[:-1]) + " and " + named[-1]
    answer = pool[int(rng.integers(len(pool)))]
    return answer.format(segs=segs, desc=query.description), (
        f"There are {k} {query.description} in the image."
    )


def choose_query(
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
