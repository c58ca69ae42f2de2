"""experiments/lab_report.py: the issue's acceptance numbers from hand-written eval rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import experiment_module

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "lab_report.py"


def _module():
    return experiment_module("lab_report")


def _row(difficulty, iou, answer="Sure, [SEG].", overlap=None, unions=(10,)):
    return {"difficulty": difficulty, "iou": iou, "answer": answer, "max_pred_overlap": overlap,
            "U": list(unions)}


def test_summary_and_checks_from_rows(tmp_path):
    lab = _module()
    rows = [
        _row("direct", 0.9), _row("direct", 0.7),
        _row("negative", 1.0, "There is no such shape, [SEG].", unions=(0,)),
        _row("negative", 0.0, "Sure, it is the red star, [SEG]."),
        _row("multi", 0.6, overlap=0.1), _row("multi", 0.4, overlap=0.9),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"batch_end": 1}\n{"torn')
    summary = lab.summarise(lab.read_rows(path))
    assert summary["samples"] == 6
    assert abs(summary["giou"] - 3.6 / 6) < 1e-9
    assert summary["by_difficulty"]["direct"]["giou"] == 0.8
    assert summary["negatives_answered"] == 0.5 and summary["negatives_empty_mask"] == 0.5
    assert summary["positives_denied"] == 0.0
    denied = lab.summarise([*rows, _row("direct", 0.0, "Nothing in the image matches, [SEG].")])
    assert denied["positives_denied"] == 1 / 5
    assert summary["multi_share_distinct"] == 0.5 and summary["multi_mean_overlap"] == 0.5
    results = dict((text.split(" ")[0], ok) for text, ok in lab.checks(summary, None))
    assert results["direct"] is True and results["multi"] is True  # 0.8 and 0.5 >= 0.5
    assert results["gIoU"] is False and results["negatives"] is False
    export = dict(summary, giou=summary["giou"] + 0.05)
    assert lab.checks(summary, export)[-1][1] is False  # a 0.05 gap is outside 0.03


def test_by_concept_splits_denials_by_what_the_query_names():
    lab = _module()
    no, yes = "The circle: no, there is no such shape, [SEG].", "The circle: yes, [SEG]."
    rows = [
        {**_row("direct", 0.0, no), "target_keyword": "circle"},
        {**_row("direct", 0.9, yes), "target_keyword": "circle"},
        {**_row("negative", 1.0, no), "target_keyword": "circle"},
        {**_row("negative", 1.0, no), "target_keyword": "red star"},
        {**_row("direct", 0.8, yes), "target_keyword": "red"},
        {**_row("indirect", 0.0, no), "target_keyword": "star"},  # neither side: left out
        _row("direct", 0.5),  # no keyword recorded: left out
    ]
    assert lab.by_concept(rows) == {
        "colour": {"present": {"said_no": 0.0, "n": 1}},
        "colour kind": {"absent": {"said_no": 1.0, "n": 1}},
        "kind": {"absent": {"said_no": 1.0, "n": 1}, "present": {"said_no": 0.5, "n": 2}},
    }
    assert lab.by_concept([_row("direct", 0.5)]) is None


def test_by_wording_compares_absent_and_present_shapes_asked_alike():
    from keyseg.data.shapes import ShapesDataset

    lab = _module()
    test = ShapesDataset("test")
    rows, kinds = [], {}
    for index in range(120):
        record = test[index]
        template = record.meta["queries"][0]["template_id"]
        difficulty, wording = template.split(".", 1)
        if difficulty not in ("negative", "direct"):
            continue
        kinds.setdefault(wording, set()).add(difficulty)
        # A model that says "no" to every negative and to no direct query: it looks.
        answer = "There is no such shape, [SEG]." if difficulty == "negative" else "Sure, [SEG]."
        rows.append({"source": "shapes", "record": record.sample_id, "index": index, "ref": 0,
                     "difficulty": difficulty, "answer": answer, "iou": 1.0, "U": [0]})
    shared = sorted(w for w, d in kinds.items() if d == {"negative", "direct"})
    assert shared  # the first 120 test records ask some wording both ways
    result = lab.by_wording(rows)
    assert result["wordings"] == shared and result["absent"] == 1.0 and result["present"] == 0.0
    # One that says "no" whatever it sees: equal shares.
    same = lab.by_wording([dict(r, answer="Nothing in the image matches, [SEG].") for r in rows])
    assert same["absent"] == same["present"] == 1.0
    assert lab.by_wording([{"answer": "x", "iou": 0.0}]) is None  # not shapes rows
    bad = [dict(rows[0], index=rows[0]["index"] + 1)]
    with pytest.raises(SystemExit, match="is not shapes:test"):
        lab.by_wording(bad)


def test_by_naming_splits_generated_iou_by_the_teachers_wording():
    lab = _module()
    teacher = [
        {"id": "a", "iou": 0.9, "answer": "The square: yes, [SEG]."},
        {"id": "b", "iou": 0.8, "answer": "The square: yes, [SEG]."},
        {"id": "c", "iou": 0.7, "answer": "Sure, [SEG]."},
        {"id": "d", "iou": 0.6, "answer": "Sure, [SEG]."},  # no generated row: left out
    ]
    generated = [
        {**_row("direct", 0.85, "the square: YES,  [SEG] [KEY] red square"), "id": "a"},  # same
        {**_row("direct", 0.0, "The blue square: yes, [SEG]."), "id": "b"},
        {**_row("relational", 0.5, "It is [SEG]."), "id": "c"},  # filler only, as "Sure,"
        {**_row("relational", 0.5, "Sure, [SEG]."), "id": "e"},  # no teacher row: left out
    ]
    split = lab.by_naming(generated, teacher)
    assert split["direct"] == {"n": 2, "same_share": 0.5, "iou_same": 0.85,
                               "iou_different": 0.0, "teacher_iou_on_different": 0.8}
    assert split["relational"]["n"] == 1 and split["relational"]["same_share"] == 1.0
    assert split["relational"]["iou_different"] is None
    with pytest.raises(SystemExit, match="no row id in common"):
        lab.by_naming(generated, [{"id": "z", "iou": 1.0, "answer": "x"}])


def test_iou_by_concept_averages_direct_and_attribute_by_what_the_query_names():
    lab = _module()
    rows = [
        {**_row("direct", 0.2), "target_keyword": "square"},
        {**_row("direct", 0.4), "target_keyword": "circle"},
        {**_row("direct", 0.9), "target_keyword": "red star"},
        {**_row("attribute", 0.7), "target_keyword": "blue"},
        {**_row("relational", 0.0), "target_keyword": "square"},  # not direct/attribute
        {**_row("direct", 0.0), "target_keyword": "the shape"},  # names neither: left out
    ]
    cells = lab.iou_by_concept(rows)
    assert cells == {"attribute, colour": {"iou": 0.7, "n": 1},
                     "direct, colour kind": {"iou": 0.9, "n": 1},
                     "direct, kind": {"iou": pytest.approx(0.3), "n": 2}}
    assert lab.iou_by_concept([_row("direct", 0.5)]) is None


def test_multi_by_group_splits_multi_target_queries_by_what_their_shapes_share():
    lab = _module()
    rows = [
        {**_row("multi", 0.8, overlap=0.0), "target_keyword": "star"},
        {**_row("multi", 0.6, overlap=0.7), "target_keyword": "star"},
        {**_row("multi", 0.4, overlap=1.0), "target_keyword": "blue"},
        {**_row("multi", 0.2, overlap=None), "target_keyword": "blue"},  # one mask: no pair
        {**_row("direct", 0.9), "target_keyword": "blue"},  # not a multi-target query
        {**_row("multi", 0.5, overlap=0.0), "target_keyword": "red star"},  # neither group
    ]
    groups = lab.multi_by_group(rows)
    assert set(groups) == {"colour", "kind"}
    assert groups["kind"] == {"n": 2, "giou": pytest.approx(0.7), "share_distinct": 0.5}
    assert groups["colour"] == {"n": 2, "giou": pytest.approx(0.3), "share_distinct": 0.0}
    assert lab.multi_by_group([_row("direct", 0.5)]) is None
