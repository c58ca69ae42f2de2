"""Visual QA on the shapes world (keyseg.data.shapes.qa): answers checked against scenes
built by hand, occlusion and ambiguity, held-out templates, determinism."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from keyseg.data.shapes import (
    ALL_QUESTION_TYPES,
    COLOURS,
    KINDS,
    PLURALS,
    QA_HELDOUT_TEMPLATE_IDS,
    QA_SLOTS,
    QA_TEMPLATES,
    QUESTION_TYPES,
    REGIONS,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    answer,
    normalise_answer,
    qa_template_ids,
    record_qa,
    scene_from_objects,
    scene_qa,
    view_scene,
)

SIZE = 192


def _scene(*specs: tuple[str, str, float, float, float]):
    """A scene of (colour, kind, cx, cy, radius) in z-order (later ones on top), upright."""
    objects = [ShapeObject(k, c, x, y, r, 0.0, z) for z, (c, k, x, y, r) in enumerate(specs)]
    return scene_from_objects(objects, SIZE)


# Five visible shapes; a yellow square lies entirely under the orange octagon (its inscribed
# radius, 25 cos 22.5 deg = 23 px, exceeds the square's circumradius 15).
MAIN = [
    ("red", "circle", 35, 35, 18),  # top left, ~1000 px
    ("blue", "star", 160, 35, 20),  # top right, ~500 px
    ("green", "ring", 96, 100, 22),  # middle, ~1060 px
    ("red", "circle", 40, 160, 12),  # bottom left, ~450 px
    ("yellow", "square", 160, 160, 15),  # hidden
    ("orange", "octagon", 160, 160, 25),  # bottom right, ~1770 px
]
VISIBLE = [("red", "circle"), ("blue", "star"), ("green", "ring"), ("red", "circle"),
           ("orange", "octagon")]
WHERE = {("red", "circle"): None, ("blue", "star"): "top right", ("green", "ring"): "middle",
         ("orange", "octagon"): "bottom right"}
# Three shapes on one row, well apart.
ROW = [("red", "circle", 30, 96, 18), ("blue", "star", 96, 96, 20), ("green", "ring", 165, 96, 18)]


@pytest.fixture(scope="module")
def main_view():
    return view_scene(_scene(*MAIN))


def test_counts_existence_and_colours_follow_what_is_visible(main_view) -> None:
    assert answer("count.k", main_view, kind="circle") == "two"
    assert answer("count.c", main_view, colour="red") == "two"
    assert answer("count.all", main_view) == "five"  # the hidden square is not counted
    assert answer("count.k", main_view, kind="square") == "zero"
    assert answer("existence.k", main_view, kind="square") == "no"
    assert answer("existence.ck", main_view, colour="yellow", kind="square") == "no"
    assert answer("existence.c", main_view, colour="yellow") == "no"
    assert answer("existence.ck", main_view, colour="red", kind="circle") == "yes"
    assert answer("existence.ck", main_view, colour="blue", kind="circle") == "no"
    assert answer("colour.k", main_view, kind="ring") == "green"
    assert answer("colour.k", main_view, kind="circle") is None  # two circles
    assert answer("what.colour", main_view, colour="blue") == "star"
    assert answer("what.colour", main_view, colour="red") is None  # two red shapes


def test_where_uses_the_grid_and_needs_a_unique_referent(main_view) -> None:
    assert answer("where.ck", main_view, colour="blue", kind="star") == "top right"
    assert answer("where.k", main_view, kind="star") == "top right"
    assert answer("where.ck", main_view, colour="orange", kind="octagon") == "bottom right"
    assert answer("where.k", main_view, kind="ring") == "middle"
    assert answer("where.k", main_view, kind="circle") is None
    assert answer("what.region", main_view, region="top right") == "blue star"
    assert answer("colour.region", main_view, region="middle") == "green"
    assert answer("what.region", main_view, region="top") is None  # nothing there
    # a centroid on a grid line (x = 64) has no clear cell
    edge = view_scene(_scene(("red", "circle", 64, 30, 15), ("blue", "star", 160, 160, 20)))
    assert answer("where.k", edge, kind="circle") is None
    assert answer("where.k", edge, kind="star") == "bottom right"
    assert set(REGIONS) >= {"top left", "top right", "bottom left", "bottom right", "middle"}


def test_sizes_need_a_clear_winner(main_view) -> None:
    assert answer("size.largest", main_view) == "orange octagon"
    assert answer("size.smallest", main_view) is None  # ~450 vs ~500 px: too close
    assert answer("size.pair", main_view, first="blue star", second="green ring") == "green ring"
    assert answer("size.pair", main_view, first="orange octagon",
                  second="blue star") == "orange octagon"
    assert answer("size.pair", main_view, first="red circle", second="blue star") is None


def test_relations_and_description_on_a_row() -> None:
    row = view_scene(_scene(*ROW))
    assert answer("relation.left", row, colour="blue", kind="star") == "red circle"
    assert answer("relation.right", row, colour="blue", kind="star") == "green ring"
    assert answer("relation.left", row, colour="red", kind="circle") is None  # nothing there
    assert answer("relation.right", row, colour="red", kind="circle") is None  # two there
    assert answer("relation.above", row, colour="blue", kind="star") is None  # same height
    assert answer("relation.leftmost", row) == "red circle"
    assert answer("relation.rightmost", row) == "green ring"
    assert answer("relation.topmost", row) is None
    assert answer("describe.list", row) == "a red circle, a blue star and a green ring"
    column = view_scene(_scene(("orange", "star", 96, 30, 18), ("purple", "cross", 96, 150, 18)))
    assert answer("relation.above", column, colour="purple", kind="cross") == "orange star"
    assert answer("relation.below", column, colour="orange", kind="star") == "purple cross"
    assert answer("relation.topmost", column) == "orange star"
    assert answer("describe.list", column) is None  # one above the other: no left-to-right


def test_lists_name_every_shape_of_a_colour_or_kind_left_to_right(main_view) -> None:
    row = view_scene(_scene(("red", "circle", 30, 96, 18), ("blue", "star", 96, 96, 20),
                            ("red", "ring", 165, 96, 18), ("green", "star", 160, 30, 15)))
    assert answer("list.c", row, colour="red") == "the red circle and the red ring"
    assert answer("list.k", row, kind="star") == "the blue star and the green star"
    assert answer("list.k", row, kind="ring") == "the red ring"
    assert answer("list.c", row, colour="purple") is None  # nothing to list
    # two red circles share a name: no order can tell them apart in words
    assert answer("list.k", main_view, kind="circle") is None
    assert answer("list.c", main_view, colour="blue") == "the blue star"
    # the yellow square is hidden under the octagon: nothing yellow is listed
    assert answer("list.c", main_view, colour="yellow") is None
    # too close in x for a left-to-right order
    stacked = view_scene(_scene(("red", "circle", 96, 30, 15), ("red", "star", 100, 150, 15)))
    assert answer("list.c", stacked, colour="red") is None


def test_list_is_asked_only_when_named() -> None:
    records = list(ShapesDataset("train", ShapesConfig(train_size=100)))
    assert all(p.qtype != "list" for r in records for p in record_qa(r, seed=0))
    pairs = [p for r in records for p in record_qa(r, seed=0, types=("list",))]
    assert {p.qtype for p in pairs} == {"list"} and len(pairs) > 80
    # groups of several come first: most scenes that have one are asked about it
    several = sum(" and " in p.answer for p in pairs)
    assert several > 0.3 * len(pairs)
    assert all(p.answer.startswith("the ") for p in pairs)


def test_doubtful_objects_never_decide_an_answer() -> None:
    # two red shapes that overlap read as one red blob: nothing about red is asked
    blob = view_scene(_scene(("red", "square", 60, 96, 20), ("red", "triangle", 80, 96, 20),
                             ("blue", "circle", 160, 96, 20)))
    assert len(blob.seen) == 3 and len(blob.clear) == 1
    for slot, params in [("what.colour", {"colour": "red"}), ("count.c", {"colour": "red"}),
                         ("existence.c", {"colour": "red"}), ("count.all", {}),
                         ("existence.k", {"kind": "square"}), ("describe.list", {}),
                         ("relation.left", {"colour": "blue", "kind": "circle"})]:
        assert answer(slot, blob, **params) is None, slot
    assert answer("what.colour", blob, colour="blue") == "circle"
    assert answer("existence.k", blob, kind="star") == "no"
    assert answer("where.ck", blob, colour="blue", kind="circle") == "right"
    # a diamond showing a sliver beside the square covering it is doubtful as well
    sliver = view_scene(_scene(("purple", "diamond", 100, 100, 20),
                               ("green", "square", 100, 108, 26)))
    assert [o.kind for o in sliver.seen] == ["diamond", "square"]
    assert [o.kind for o in sliver.clear] == ["square"]
    assert answer("count.all", sliver) is None
    assert answer("existence.k", sliver, kind="diamond") is None


def _mentioned(question: str) -> tuple[set[str], set[str]]:
    words = set(re.findall(r"[a-z]+", question.lower()))
    plural = {v: k for k, v in PLURALS.items()}
    kinds = {w for w in words if w in KINDS} | {plural[w] for w in words if w in plural}
    return {w for w in words if w in COLOURS}, kinds


def test_generated_questions_agree_with_the_hand_written_truth(main_view) -> None:
    """Every count / existence / where question asked about the hand-built scene, in any
    wording, has the answer read off the scene by hand (an oracle independent of qa.py)."""

    checked = Counter()
    for seed in range(150):
        for pair in scene_qa(main_view, "val", np.random.default_rng(seed), per_type=3):
            colours, kinds = _mentioned(pair.question)
            assert "yellow" not in pair.answer and "square" not in pair.answer
            matching = [(c, k) for c, k in VISIBLE
                        if (not colours or c in colours) and (not kinds or k in kinds)]
            if pair.qtype == "count":
                words = ["zero", "one", "two", "three", "four", "five", "six"]
                assert pair.answer == words[len(matching)], pair
            elif pair.qtype == "existence":
                assert pair.answer == ("yes" if matching else "no"), pair
            elif pair.qtype == "where":
                (colour,) = colours or {c for c, k in VISIBLE if k in kinds}
                (kind,) = kinds
                assert pair.answer == WHERE[colour, kind], pair
            elif pair.qtype == "describe":
                pytest.fail(f"the scene has no clear left-to-right order: {pair}")
            checked[pair.qtype] += 1
    assert checked["count"] > 50 and checked["existence"] > 50 and checked["where"] > 50


def test_templates_cover_every_type_and_train_never_asks_the_heldout_ones() -> None:
    assert {t.qtype for t in QA_TEMPLATES.values()} == set(ALL_QUESTION_TYPES)
    assert {t.slot for t in QA_TEMPLATES.values()} == set(QA_SLOTS)
    for slot in QA_SLOTS:  # several wordings per slot, one of them held out
        ids = [k for k, t in QA_TEMPLATES.items() if t.slot == slot]
        assert len(ids) >= 4 and len(set(ids) & QA_HELDOUT_TEMPLATE_IDS) == 1, slot
    assert any(not t.is_sentence for t in QA_TEMPLATES.values())
    train_patterns = {t.pattern for t in QA_TEMPLATES.values() if not t.heldout}
    assert not train_patterns & {QA_TEMPLATES[k].pattern for k in QA_HELDOUT_TEMPLATE_IDS}
    assert qa_template_ids("train") == frozenset(QA_TEMPLATES) - QA_HELDOUT_TEMPLATE_IDS
    assert qa_template_ids("test") == frozenset(QA_TEMPLATES)

    config = ShapesConfig(train_size=200, val_size=200)
    train_ids = {p.template_id for r in ShapesDataset("train", config)
                 for p in record_qa(r, per_type=3)}
    assert not train_ids & QA_HELDOUT_TEMPLATE_IDS and len(train_ids) > 80
    val_pairs = [p for r in ShapesDataset("val", config) for p in record_qa(r, per_type=3)]
    assert any(p.heldout for p in val_pairs)
    assert all(p.heldout == (p.template_id in QA_HELDOUT_TEMPLATE_IDS) for p in val_pairs)


def test_records_give_every_type_with_fair_yes_no_and_seeded_questions() -> None:
    records = list(ShapesDataset("train", ShapesConfig(train_size=300)))
    pairs = [p for r in records for p in record_qa(r, seed=0)]
    by_type = Counter(p.qtype for p in pairs)
    assert set(by_type) == set(QUESTION_TYPES)
    assert by_type["count"] == by_type["existence"] == len(records)  # always askable
    yes = sum(p.answer == "yes" for p in pairs if p.qtype == "existence")
    assert 0.4 < yes / by_type["existence"] < 0.6
    assert all(p.question.endswith(("?", ".")) and p.answer for p in pairs)
    # same record + seed -> same questions; another seed asks other things
    again = [p for r in records[:20] for p in record_qa(r, seed=0)]
    assert again == pairs[: len(again)]
    other = [p for r in records[:20] for p in record_qa(r, seed=1)]
    assert other != again


def test_normalised_answers_compare_equal() -> None:
    assert normalise_answer("The Red circle.") == normalise_answer("red circle")
    assert normalise_answer("2") == normalise_answer("two")
    assert normalise_answer("Top-left") == normalise_answer("top left")
    assert normalise_answer("a red circle, a blue star and a green ring") == (
        "red circle blue star and green ring")
    assert normalise_answer("yes") != normalise_answer("no")


def test_restated_existence_answers_name_the_thing_then_the_same_verdict() -> None:
    scene = _scene(("red", "star", 50, 50, 20), ("blue", "circle", 140, 140, 22))
    for seed in range(30):
        plain = scene_qa(scene, "train", np.random.default_rng(seed), types=("existence",))
        restated = scene_qa(scene, "train", np.random.default_rng(seed), types=("existence",),
                            restate=True)
        assert [p.question for p in restated] == [p.question for p in plain]
        for p, q in zip(plain, restated, strict=True):
            thing, _, verdict = q.answer.partition(": ")
            assert verdict == p.answer in ("yes", "no")
            # the named thing is the one asked about ("red ring" in "Any red rings?")
            assert all(word in q.question.lower() for word in thing.split() if word != "shape")
            present = any(thing in (f"{c} {k}", k, f"{c} shape")
                          for c, k in (("red", "star"), ("blue", "circle")))
            assert (verdict == "yes") == present
    # other question types are untouched
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    assert scene_qa(scene, "train", rng_a, types=("count", "what")) == scene_qa(
        scene, "train", rng_b, types=("count", "what"), restate=True)


def test_shapes_qa_dataset_asks_record_qa_about_the_shapes_image() -> None:
    """``shapes_qa`` record i: the image of ``shapes`` record i, one text-only referent per
    configured type the scene answers, exactly :func:`record_qa`'s pairs, and no masks."""
    from keyseg.data.shapes import ShapesQADataset

    config = ShapesConfig(train_size=3, qa_types=("colour", "count", "list"),
                          qa_restate_existence=True)
    images, questions = ShapesDataset("train", config), ShapesQADataset("train", config)
    assert len(questions) == 3
    for index in range(3):
        record, asked = images[index], questions[index]
        assert np.array_equal(np.asarray(record.image), np.asarray(asked.image))
        pairs = record_qa(record, types=config.qa_types, restate=True)
        assert [(r.text, r.answer) for r in asked.referents] == [
            (p.question, p.answer) for p in pairs]
        assert {p.qtype for p in pairs} <= {"colour", "count", "list"}
        for referent in asked.referents:
            assert referent.text_only and referent.keyword is None
            assert referent.masks.shape == (0, config.image_size, config.image_size)
            assert "[SEG]" not in referent.answer
        assert asked.source == "shapes_qa" and asked.sample_id != record.sample_id


def test_qa_types_are_checked_by_the_config() -> None:
    from keyseg.config import ConfigProblems, load_config

    with pytest.raises(ConfigProblems, match=r"data\.shapes\.qa_types.*'colours'"):
        load_config(None, ["data.shapes.qa_types=[what,colours]"])
    cfg = load_config(None, ["data.datasets=[shapes,shapes_qa]", "data.sample_rates=[3,1]"])
    assert cfg.data.datasets == ("shapes", "shapes_qa")


def test_a_mixture_with_shapes_qa_draws_both_and_names_them() -> None:
    from keyseg.config import load_config
    from keyseg.data.check import totals_lines
    from keyseg.data.datasets import build_mixture

    cfg = load_config(None, ["data.datasets=[shapes,shapes_qa]", "data.sample_rates=[1,1]",
                             "data.shapes.train_size=50", "data.max_referents_per_image=2"])
    mixture = build_mixture(cfg.data, seed=0)
    records = mixture.take(40)
    qa = [r for r in records if r.source == "shapes_qa"]
    assert 0 < len(qa) < 40
    assert all(len(r.referents) == 2 and all(x.text_only for x in r.referents) for r in qa)
    assert not any(x.text_only for r in records if r.source != "shapes_qa"
                   for x in r.referents)
    lines = totals_lines(mixture)
    assert lines[0].startswith("shapes:train: 50 records")
    assert lines[1].startswith("shapes_qa:train: 50 records of visual QA (what, where")
