"""REFER reader: masks from polygons/RLE, splits, refs JSON vs pickle, keywords, skips."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from keyseg.data.refer import (
    ReferDataset,
    annotation_to_mask,
    convert_refs_pickle_to_json,
    head_noun,
    in_refer_split,
    load_refs,
    refs_path,
)
from keyseg.errors import KeySegDataError

H, W = 12, 16


def box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE written by hand: column-major runs, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


POLY_MASK = box_mask(2, 3, 8, 7)
UNCOMPRESSED_MASK = box_mask(10, 0, 16, 4)
COMPRESSED_MASK = np.zeros((H, W), dtype=np.uint8)
COMPRESSED_MASK[5:12, 9:11] = 1
COMPRESSED_MASK[8, 0:16] = 1


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}  # as in JSON files


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, *sents: str) -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "category_id": 1, "sentences": [{"sent": s, "sent_id": i} for i, s in enumerate(sents)]}


REFS = [
    _ref(1, 11, 1, "train", "man in red shirt on left", "left guy"),
    _ref(2, 12, 1, "train", "white car"),
    _ref(3, 13, 2, "val", "dog near the door"),
    _ref(4, 11, 3, "testA", "woman with umbrella"),  # image 3 has no file on disk
    _ref(5, 14, 2, "testB", "red bus"),
    _ref(6, 99, 2, "testB", "ghost annotation"),  # annotation id that does not exist
]


@pytest.fixture
def refer_root(tmp_path: Path) -> Path:
    folder = tmp_path / "refer_seg" / "refcoco"
    folder.mkdir(parents=True)
    images = tmp_path / "refer_seg/images/mscoco/images/train2014"
    images.mkdir(parents=True)
    coco_images = []
    for image_id in (1, 2, 3):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        coco_images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        if image_id != 3:
            Image.new("RGB", (W, H)).save(images / name)
    instances = {
        "images": coco_images,
        "annotations": [
            # Polygon of the box 2..8 x 3..7 (COCO polygons run along pixel edges).
            {"id": 11, "image_id": 1, "category_id": 1,
             "segmentation": [[2, 3, 8, 3, 8, 7, 2, 7]]},
            {"id": 12, "image_id": 1, "category_id": 1,
             "segmentation": uncompressed_rle(UNCOMPRESSED_MASK)},
            {"id": 13, "image_id": 2, "category_id": 1,
             "segmentation": _compressed(COMPRESSED_MASK)},
            {"id": 14, "image_id": 2, "category_id": 1, "segmentation": {"bogus": 1}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    with open(refs_path(folder, "unc", ".p"), "wb") as handle:
        pickle.dump(REFS, handle)
    return tmp_path


def _converted(root: Path) -> Path:
    folder = root / "refer_seg" / "refcoco"
    return convert_refs_pickle_to_json(refs_path(folder, "unc", ".p"))


def test_annotation_to_mask_decodes_polygon_and_both_rle_forms():
    np.testing.assert_array_equal(annotation_to_mask([[2, 3, 8, 3, 8, 7, 2, 7]], H, W), POLY_MASK)
    np.testing.assert_array_equal(
        annotation_to_mask(uncompressed_rle(UNCOMPRESSED_MASK), H, W), UNCOMPRESSED_MASK)
    np.testing.assert_array_equal(annotation_to_mask(_compressed(COMPRESSED_MASK), H, W),
                                  COMPRESSED_MASK)
    with pytest.raises(KeySegDataError, match="unrecognised segmentation"):
        annotation_to_mask({"bogus": 1}, H, W)


def test_segmentation_lists_of_rle_and_polygons_are_united_or_summed_and_counted():
    from collections import Counter

    left, right = box_mask(0, 0, 6, 4), box_mask(4, 0, 10, 4)  # overlap: columns 4-5
    parts = [_compressed(left), [4, 0, 10, 0, 10, 4, 4, 4]]  # an RLE dict and a polygon
    issues: Counter = Counter()
    np.testing.assert_array_equal(annotation_to_mask(parts, H, W, issues=issues), left | right)
    summed = annotation_to_mask(parts, H, W, sum_parts=True)
    np.testing.assert_array_equal(summed, left.astype(int) + right)
    assert summed.max() == 2 and issues == {"overlapping_parts": 1}
    np.testing.assert_array_equal(annotation_to_mask([uncompressed_rle(POLY_MASK)], H, W),
                                  POLY_MASK)
    issues.clear()
    assert not annotation_to_mask([[1, 1, 9, 9]], H, W, issues=issues).any()  # 2 vertices
    assert not annotation_to_mask([], H, W, issues=issues).any()
    assert issues == {"degenerate_polygons": 1, "empty_segmentations": 1}
    with pytest.raises(KeySegDataError, match="odd number of coordinates"):
        annotation_to_mask([[1, 1, 9, 9, 3]], H, W)
    with pytest.raises(KeySegDataError, match="size"):
        annotation_to_mask({"size": [H + 1, W], "counts": "abc"}, H, W)


@pytest.mark.parametrize(("ref_split", "split", "member"), [
    ("testAB", "testA", True), ("testAB", "testB", True), ("testA", "testB", False),
    ("testB", "test", True), ("val", "val", True), ("testAB", "val", False),
    ("train", "testA", False), ("val", "train", False),
])
def test_refs_are_selected_as_refer_selects_them(ref_split, split, member):
    assert in_refer_split(ref_split, split) is member


def test_reader_without_json_refuses_pickle_and_says_how_to_convert(refer_root):
    with pytest.raises(KeySegDataError, match=r"keyseg data convert-refer .* --name refcoco"):
        ReferDataset(refer_root, "refcoco", "train")


def test_pickle_is_read_only_with_explicit_opt_in(refer_root):
    data = ReferDataset(refer_root, "refcoco", "train", allow_pickle=True)
    assert len(data) == 1


def test_pickle_with_class_references_is_refused_even_with_opt_in(tmp_path):
    with open(refs_path(tmp_path, "unc", ".p"), "wb") as handle:
        pickle.dump([{"ref_id": 1, "path": Path("x")}], handle)
    with pytest.raises(KeySegDataError, match="pathlib"):
        load_refs(tmp_path, "unc", allow_pickle=True)


def test_convert_writes_json_atomically_and_reader_uses_it(refer_root, monkeypatch):
    folder = refer_root / "refer_seg" / "refcoco"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    # Fail after the data went into the temp file: nothing but the inputs may be left.
    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RuntimeError):
        _converted(refer_root)
    assert sorted(p.name for p in folder.iterdir()) == ["instances.json", "refs(unc).p"]
    monkeypatch.undo()
    dst = _converted(refer_root)
    assert dst == folder / "refs(unc).json"
    assert json.loads(dst.read_text()) == REFS
    refs_path(folder, "unc", ".p").unlink()  # the JSON alone is enough from now on
    assert len(ReferDataset(refer_root, "refcoco", "train")) == 1


def test_records_group_sentences_per_image_with_exact_masks(refer_root):
    _converted(refer_root)
    (record,) = list(ReferDataset(refer_root, "refcoco", "train"))
    assert record.image_path.name == "COCO_train2014_000000000001.jpg"
    assert record.image_path.is_file()
    texts = [r.text for r in record.referents]
    assert texts == ["man in red shirt on left", "left guy", "white car"]
    assert record.meta["ref_ids"] == [1, 1, 2]
    for referent, expected in zip(record.referents,
                                  [POLY_MASK, POLY_MASK, UNCOMPRESSED_MASK], strict=True):
        assert referent.masks.shape == (1, H, W) and not referent.is_sentence
        np.testing.assert_array_equal(referent.masks[0], expected)
    assert [r.keyword for r in record.referents] == texts  # default: sentence = keyword


def test_split_membership_and_counted_skips(refer_root):
    _converted(refer_root)
    val = ReferDataset(refer_root, "refcoco", "val")
    assert [r.text for rec in val for r in rec.referents] == ["dog near the door"]
    np.testing.assert_array_equal(val[0].referents[0].masks[0], COMPRESSED_MASK)

    test_a = ReferDataset(refer_root, "refcoco", "testA")
    assert len(test_a) == 0 and test_a.report.skipped == {"missing_image": 1}

    test_b = ReferDataset(refer_root, "refcoco", "testB")
    assert test_b.report.skipped == {"missing_annotation": 1}
    assert list(test_b) == []  # the bogus segmentation is counted, not raised
    assert test_b.report.skipped["bad_annotation"] == 1
    with pytest.raises(KeySegDataError, match="annotation 14"):
        test_b[0]

    with pytest.raises(KeySegDataError, match=r"'testC'.*testA, testB, test"):
        ReferDataset(refer_root, "refcoco", "testC")


def test_refcocog_uses_umd_refs(refer_root):
    with pytest.raises(KeySegDataError, match=r"refs\(umd\)\.json"):
        ReferDataset(refer_root, "refcocog", "test")


def test_head_noun_keyword_mode(refer_root):
    _converted(refer_root)
    data = ReferDataset(refer_root, "refcoco", "train", keyword_mode="head-noun")
    assert [r.keyword for r in data[0].referents] == ["man", "guy", "car"]


@pytest.mark.parametrize(("expression", "head"), [
    ("man in red shirt on left", "man"),
    ("the tall red shirt man", "man"),
    ("guy wearing a hat", "guy"),
    ("left white car", "car"),
    ("that bowl of soup", "bowl"),
    ("on the left", "on the left"),
])
def test_head_noun_heuristic(expression, head):
    assert head_noun(expression) == head


def test_cli_convert_refer_then_check(refer_root, capsys):
    from keyseg.cli import main

    assert main(["data", "check", str(refer_root)]) == 0
    assert "convert-refer" in capsys.readouterr().out  # the pickle-only state is pointed out
    assert main(["data", "convert-refer", str(refer_root), "--name", "refcoco"]) == 0
    json_file = refer_root / "refer_seg" / "refcoco" / "refs(unc).json"
    assert json.loads(json_file.read_text()) == REFS
    assert main(["data", "convert-refer", str(refer_root), "--name", "refcoco"]) == 0
    assert "exists, skipped" in capsys.readouterr().out
    assert main(["data", "convert-refer", str(refer_root), "--name", "refcocog"]) == 2
    assert "refs(umd).p: refs pickle not found" in capsys.readouterr().err
    assert main(["data", "check", str(refer_root)]) == 0
    out = capsys.readouterr().out
    assert "ok      refer_seg/refcoco/refs(unc).json" in out
    assert "missing refer_seg/refcocog/instances.json" in out
