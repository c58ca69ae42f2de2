"""The procedural shapes world: determinism, exact masks, splits, queries, ReasonSeg export."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from keyseg.data.shapes import (
    COLOURS,
    DIFFICULTIES,
    HELDOUT_TEMPLATE_IDS,
    KEYWORD_VOCAB,
    KIND_CLUES,
    ShapesConfig,
    ShapesDataset,
    export_reason_seg,
    generate_sample,
    image_seed,
    objects_from_meta,
    shape_polygons,
    template_ids,
)
from keyseg.data.shapes.queries import write_answer
from keyseg.errors import KeySegConfigError

CFG = ShapesConfig(train_size=120, val_size=120, test_size=40)


@pytest.fixture(scope="module")
def val_records() -> list:
    return list(ShapesDataset("val", CFG))


@pytest.fixture(scope="module")
def train_records() -> list:
    return list(ShapesDataset("train", CFG))


def test_same_seed_gives_the_same_record_and_other_seeds_differ() -> None:
    a = generate_sample(image_seed("train", 7), "train", CFG)
    b = ShapesDataset("train", CFG)[7]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.sample_id == b.sample_id and a.meta == b.meta
    for ra, rb in zip(a.referents, b.referents, strict=True):
        assert (ra.text, ra.keyword, ra.answer) == (rb.text, rb.keyword, rb.answer)
        assert np.array_equal(ra.masks, rb.masks)
    c = generate_sample(image_seed("train", 8), "train", CFG)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    other_world = generate_sample(image_seed("train", 7), "train", ShapesConfig(seed=1))
    assert not np.array_equal(np.asarray(a.image), np.asarray(other_world.image))


def _id_map(meta: dict, size: int) -> np.ndarray:
    """Independent re-rendering: paint each object's polygons in z-order with its id + 1."""
    ids = np.zeros((size, size), np.int32)
    for obj in objects_from_meta(meta):
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for poly, filled in shape_polygons(obj):
            draw.polygon(poly, fill=255 if filled else 0)
        ids[np.asarray(canvas) > 0] = obj.z + 1
    return ids


def test_masks_are_exactly_the_pixels_painted_with_each_shape(val_records: list) -> None:
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    names = list(COLOURS)
    for record in val_records[:25]:
        size = record.image.size[0]
        ids = _id_map(record.meta, size)
        img = np.asarray(record.image).astype(np.int16)
        # Objects are saturated, the background is grey-ish: saturation finds painted pixels.
        saturated = (img.max(-1) - img.min(-1)) > 80
        assert np.array_equal(saturated, ids > 0), record.sample_id
        for z, obj in enumerate(record.meta["objects"]):
            pixels = img[ids == z + 1].astype(np.float32)
            assert len(pixels) == obj["visible_area"] > 0
            nearest = np.argmin(((pixels[:, None] - palette[None]) ** 2).sum(-1), axis=1)
            assert {names[i] for i in nearest} == {obj["colour"]}
        for ref, q in zip(record.referents, record.meta["queries"], strict=True):
            if q["targets"]:
                expected = np.stack([(ids == t + 1) for t in q["targets"]]).astype(np.uint8)
                assert np.array_equal(ref.masks, expected)
            else:
                assert ref.masks.shape == (1, size, size) and not ref.masks.any()


def test_splits_share_no_image_seed_and_train_never_uses_heldout_templates(
    train_records: list, val_records: list
) -> None:
    seeds = {s: set(ShapesDataset(s, CFG).image_seeds()) for s in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"])
    assert not seeds["val"] & seeds["test"]
    assert HELDOUT_TEMPLATE_IDS and not HELDOUT_TEMPLATE_IDS & template_ids("train")
    assert HELDOUT_TEMPLATE_IDS <= template_ids("val") == template_ids("test")

    train_used = {q["template_id"] for r in train_records for q in r.meta["queries"]}
    assert train_used <= template_ids("train")
    val_used = {q["template_id"] for r in val_records for q in r.meta["queries"]}
    assert val_used & HELDOUT_TEMPLATE_IDS, "val should exercise held-out templates"
    # The held-out clue sentences never appear as train text (negatives included).
    heldout_clues = {clues[-1] for clues in KIND_CLUES.values()}
    assert not heldout_clues & {ref.text for r in train_records for ref in r.referents}


def test_every_difficulty_is_produced_with_valid_keywords(val_records: list) -> None:
    refs = [ref for r in val_records for ref in r.referents]
    assert set(Counter(ref.difficulty for ref in refs)) == set(DIFFICULTIES)
    for ref in refs:
        assert ref.keyword in KEYWORD_VOCAB and 1 <= len(ref.keyword.split()) <= 2
        assert isinstance(ref.is_sentence, bool) and ref.text


def test_answer_has_one_seg_per_mask_and_negatives_have_one_empty_mask(
    val_records: list,
) -> None:
    for record in val_records:
        for ref in record.referents:
            k = ref.masks.shape[0]
            assert ref.answer.count("[SEG]") == k
            assert ref.masks.dtype == np.uint8 and set(np.unique(ref.masks)) <= {0, 1}
            if ref.difficulty == "negative":
                assert k == 1 and not ref.masks.any()
            else:
                assert all(m.any() for m in ref.masks)
                assert (k >= 2) == (ref.difficulty == "multi")


def test_single_difficulty_config_produces_that_difficulty() -> None:
    cfg = ShapesConfig(difficulty_weights=(("multi", 1.0),), queries_per_image=2)
    refs = [ref for i in range(30) for ref in generate_sample(i, "test", cfg).referents]
    assert sum(ref.difficulty == "multi" for ref in refs) >= 0.9 * len(refs)


def test_train_difficulty_weights_change_only_the_train_split() -> None:
    base = ShapesConfig(queries_per_image=2)
    cfg = ShapesConfig(queries_per_image=2, train_difficulty_weights=(("negative", 1.0),))
    train = [ref for i in range(20) for ref in generate_sample(i, "train", cfg).referents]
    assert all(ref.difficulty == "negative" for ref in train)
    for split in ("val", "test"):
        for i in range(10):
            ours, theirs = generate_sample(i, split, cfg), generate_sample(i, split, base)
            assert [r.text for r in ours.referents] == [r.text for r in theirs.referents]
            assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))


def _styled_and_lisa_referents(style: str, images: int):
    """(referent under ``style``, the same referent LISA-worded, its query meta) for the
    first ``images`` train images, both worlds checked to hold the same records otherwise."""
    lisa = ShapesConfig(queries_per_image=2)
    styled = ShapesConfig(queries_per_image=2, answer_style=style)
    for i in range(images):
        ours, theirs = generate_sample(i, "train", styled), generate_sample(i, "train", lisa)
        assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))
        for mine, base, meta in zip(ours.referents, theirs.referents, ours.meta["queries"],
                                    strict=True):
            assert (mine.text, mine.keyword, mine.difficulty) == (
                base.text, base.keyword, base.difficulty)
            assert mine.answer.count("[SEG]") == base.answer.count("[SEG]") >= 1
            yield mine, base, meta


def test_restated_answers_name_the_target_and_decide_right_after_it() -> None:
    seen = Counter()
    for mine, base, meta in _styled_and_lisa_referents("restate", 60):
        name = meta["explanation"].removeprefix("It is the ").removeprefix(
            "There is no ").removesuffix(" in the image.").removesuffix(".")
        if len(meta["targets"]) > 1:
            assert mine.answer == base.answer
            seen["multi"] += 1
        elif meta["targets"]:
            assert mine.answer in (f"The {name} [SEG].", f"Sure, the {name} [SEG].")
            seen["single"] += 1
        else:
            # the same start as a positive answer up to the name, then the denial
            assert mine.answer in (f"The {name}: there is no such shape, [SEG].",
                                   f"Sure, the {name}: no such shape in the image, [SEG].")
            seen["negative"] += 1
    assert min(seen.values()) > 3
    with pytest.raises(KeySegConfigError, match="answer style"):
        write_answer(None, np.random.default_rng(0), style="short")  # type: ignore[arg-type]


def _single_target_answers(style: str, images: int):
    """(referent, name before the verdict, the rest, query meta) of each single-target or
    negative referent under a named ``style``; multi-target answers checked to be LISA's."""
    for mine, base, meta in _styled_and_lisa_referents(style, images):
        if len(meta["targets"]) > 1:
            assert mine.answer == base.answer
            continue
        head, _, tail = mine.answer.partition(": ")
        yield mine, head.removeprefix("Sure, the ").removeprefix("The "), tail, meta


def test_verdict_answers_say_yes_or_no_right_after_the_name() -> None:
    """``answer_style: verdict``: the restated name, then the stage 2 lookup's verdict word."""
    seen = Counter()
    for _, head, tail, meta in _single_target_answers("verdict", 40):
        assert head.lower() in (
            meta["explanation"].lower())
        word = "yes" if meta["targets"] else "no"
        assert tail.startswith(word + ", ")
        seen[word] += 1
    assert min(seen.values()) > 3


def test_asked_answers_name_what_the_query_asked_for_whatever_the_verdict() -> None:
    """``answer_style: asked``: the name before the verdict is the query's keyword (a bare
    colour as "{colour} shape"), for present and absent shapes alike, so it never gives the
    verdict away; a present shape's full name follows when it adds to that."""
    from keyseg.data.shapes import COLOURS

    seen = Counter()
    for mine, head, tail, meta in _single_target_answers("asked", 60):
        asked = f"{mine.keyword} shape" if mine.keyword in COLOURS else mine.keyword
        assert head == asked
        if not meta["targets"]:
            assert tail.startswith("no, there is no such shape")
            seen["no"] += 1
            continue
        full = meta["explanation"].removeprefix("It is the ").removesuffix(".")
        named = tail.removeprefix("yes, ").removeprefix("the ").removesuffix(" [SEG].")
        assert tail.startswith("yes, ")
        assert named == ("[SEG]." if full == asked else full), mine.answer
        seen["yes, " + ("same" if full == asked else "named")] += 1
    assert min(seen.values()) > 3 and len(seen) == 3, seen


def test_asked_only_answers_never_name_what_the_query_did_not_give() -> None:
    """``answer_style: asked_only``: "The circle: yes, [SEG]." with no colour after it; no
    name at all when only the image gives the concept ("the smallest diamond"); multi-target
    answers count their targets ("the first [SEG] and the second [SEG]")."""
    from keyseg.data.shapes import COLOURS, KINDS

    ordinals = ("first", "second", "third", "fourth", "fifth", "sixth")
    seen = Counter()
    for mine, _, meta in _styled_and_lisa_referents("asked_only", 80):
        k = len(meta["targets"])
        words = set(mine.answer.lower().replace(":", " ").replace(",", " ").split())
        # the only colour or kind words are the keyword's (a clue's kind or colour included)
        assert words & (set(COLOURS) | set(KINDS)) <= set(mine.keyword.split()), mine.answer
        if k > 1:
            segs = [f"the {ordinals[i]} [SEG]" for i in range(k)]
            counted = ", ".join(segs[:-1]) + " and " + segs[-1] + "."
            assert mine.answer.endswith(": " + counted), mine.answer
            seen["multi"] += 1
        elif k == 0:
            assert ": no, there is no such shape" in mine.answer
            seen["no"] += 1
        elif mine.answer in ("Sure, [SEG].", "It is [SEG]."):
            # unnamed only where the keyword is the target's own name, not said by the query
            assert meta["explanation"] == f"It is the {mine.keyword}."
            assert mine.keyword.lower() not in mine.text.lower()
            seen["unnamed"] += 1
        else:
            asked = f"{mine.keyword} shape" if mine.keyword in COLOURS else mine.keyword
            assert mine.answer in (f"The {asked}: yes, [SEG].", f"Sure, the {asked}: yes, [SEG].")
            assert mine.difficulty != "relational"
            seen["yes"] += 1
    assert min(seen.values()) > 3 and len(seen) == 4, seen


def _rasterise_reason_seg(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """SPEC §5 rasterisation: largest polygon first, outline + fill, ignore -> 255."""

    def area(points: list) -> float:
        p = np.asarray(points, dtype=float)
        x, y = p[:, 0], p[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for shape in sorted(shapes, key=lambda s: area(s["points"]), reverse=True):
        if "flag" in shape["label"]:
            continue
        value = 255 if "ignore" in shape["label"] else 1
        points = [tuple(p) for p in shape["points"]]
        draw.polygon(points, fill=value, outline=value, width=1)
    return np.asarray(canvas)


def test_reason_seg_export_round_trips(tmp_path, val_records: list) -> None:
    records = val_records[:15]
    names = export_reason_seg(records, tmp_path)
    assert len(names) == sum(len(r.referents) for r in records)
    entries = json.loads((tmp_path / "keyword_outputs.json").read_text())
    assert [e["json"] for e in entries] == [f"{n}.json" for n in names]
    for name, entry, record in zip(names, entries, records, strict=True):
        ref = record.referents[0]
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["text"] == [ref.text] and doc["is_sentence"] == ref.is_sentence
        assert entry["keyword"] == ref.keyword and entry["query"] == ref.text
        assert "[SEG]" not in entry["outputs"] and entry["image"] == f"{name}.jpg"
        with Image.open(tmp_path / f"{name}.jpg") as im:
            assert im.size == record.image.size and im.format == "JPEG"
        h, w = ref.masks.shape[1:]
        mask = _rasterise_reason_seg(doc["shapes"], h, w) == 1
        target = ref.masks.any(axis=0)
        union = (mask | target).sum()
        iou = 1.0 if union == 0 else (mask & target).sum() / union
        assert iou > 0.9, (name, iou)
        if ref.difficulty == "negative":
            assert doc["shapes"] == []


def test_bad_config_is_rejected() -> None:
    with pytest.raises(KeySegConfigError, match="image_size"):
        ShapesConfig(image_size=8)
    with pytest.raises(KeySegConfigError, match="difficulty_weights"):
        ShapesConfig(difficulty_weights=(("easy", 1.0),))
    with pytest.raises(KeySegConfigError, match="split"):
        ShapesDataset("dev", CFG)
    with pytest.raises(IndexError):
        ShapesDataset("test", CFG)[len(ShapesDataset("test", CFG))]


def test_generation_is_fast_enough() -> None:
    start = time.perf_counter()
    for i in range(40):
        generate_sample(image_seed("train", 1000 + i), "train", CFG)
    # Budget is ~10 ms per 192-px image; allow 4x for a busy shared 2-core machine.
    assert (time.perf_counter() - start) / 40 < 0.04


def test_export_is_read_back_by_the_reason_seg_reader(tmp_path, val_records: list) -> None:
    from keyseg.data.reason_seg import ReasonSegDataset

    split_dir = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    keyword_file = (
        tmp_path / "reason_seg" / "ReasonSeg" / "explanatory_key" / "keyword_outputs.json"
    )
    export_reason_seg(val_records[:12], split_dir, keyword_file=keyword_file)
    read = {r.sample_id: r for r in ReasonSegDataset(tmp_path, "val")}
    assert set(read) == {r.sample_id for r in val_records[:12]}
    for record in val_records[:12]:
        original, back = record.referents[0], read[record.sample_id].referents[0]
        assert back.text == original.text and back.keyword == original.keyword
        # The traced polygons, drawn by the reader's (LISA's) rasteriser, give the exact mask.
        np.testing.assert_array_equal(back.masks[0], original.masks.any(axis=0))


def _scene(*specs: tuple[str, str, float, float]):
    """A hand-built, non-overlapping scene of (kind, colour, cx, cy) on a 192 px canvas."""
    from keyseg.data.shapes import Scene, ShapeObject, render_object_mask

    objects = [ShapeObject(kind, colour, cx, cy, 18.0, 0.0, z)
               for z, (kind, colour, cx, cy) in enumerate(specs)]
    full = np.stack([render_object_mask(o, 192) for o in objects])
    return Scene(objects, full, full.copy())


def _realise(template_id: str, scene, seed: int = 0):
    from keyseg.data.shapes.queries import TEMPLATES, _realise

    return _realise(TEMPLATES[template_id], scene, np.random.default_rng(seed), 192,
                    heldout_ok=True)


def test_attribute_queries_name_a_property_exactly_one_object_has() -> None:
    scene = _scene(("ring", "red", 40, 40), ("square", "blue", 150, 40),
                   ("diamond", "blue", 40, 150), ("triangle", "green", 150, 150))
    for seed in range(20):
        query = _realise("attribute.p", scene, seed)
        # ring: "with a hole" / "round" / "no corners"; triangle: "three corners"; diamond:
        # "standing on a corner". The square and diamond share "four corners", and three
        # have "straight sides": those never qualify alone.
        prop = query.text.removeprefix("the shape ")
        target = scene.objects[query.targets[0]]
        expected = {"with three corners": "triangle", "standing on a corner": "diamond"}
        assert prop in {"round", "with a hole", "with no corners", *expected}, prop
        assert target.kind == expected.get(prop, "ring")
    # with a colour: "four corners" is shared by the square and the diamond, both blue, so
    # the colour cannot separate them; "straight sides" (square, diamond, triangle) can,
    # only for the green triangle.
    for seed in range(20):
        query = _realise("attribute.cp", scene, seed)
        assert query.text == "the green shape with straight sides"
        assert scene.objects[query.targets[0]].description == "green triangle"
        assert query.keyword == "green triangle"


def test_heldout_properties_stay_out_of_train() -> None:
    from keyseg.data.shapes.queries import HELDOUT_PROPERTIES, TEMPLATES, _realise

    scene = _scene(("octagon", "red", 40, 40), ("diamond", "blue", 150, 150))
    texts = {_realise(TEMPLATES["attribute.p"], scene, np.random.default_rng(s), 192,
                      heldout_ok=False).text for s in range(30)}
    assert texts and not any(p in t for t in texts for p in HELDOUT_PROPERTIES)


def test_multi_target_answers_name_every_target_in_order() -> None:
    from keyseg.data.shapes.queries import write_answer

    scene = _scene(("circle", "red", 30, 60), ("circle", "blue", 100, 60),
                   ("circle", "red", 170, 60), ("star", "green", 100, 160))
    query = _realise("multi.all_k", scene)
    assert query.targets == (0, 1, 2)  # left to right
    for seed in range(10):
        answer, _ = write_answer(query, np.random.default_rng(seed), scene)
        names = [part.strip(" ,.").split(" and ")[-1].removeprefix("they are ")
                 for part in answer.split("[SEG]")[:-1]]
        assert answer.count("[SEG]") == 3
        assert [n.split("the ", 1)[-1] for n in names] == [
            "first red circle", "blue circle", "second red circle"], answer
