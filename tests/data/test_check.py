"""``keyseg data check --deep``, ``keyseg data shapes-export`` and the reader totals that
training, evaluation and the check print alike."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keyseg.cli import main as cli_main
from keyseg.data.check import deep_check, parse_check_splits
from keyseg.data.reason_seg import ReasonSegDataset, load_reason_seg_sample
from keyseg.errors import KeySegDataError

IMAGES = "refer_seg/images/mscoco/images/train2014"
KEYWORDS = "reason_seg/ReasonSeg/explanatory_key/keyword_outputs.json"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """``keyseg data shapes-export`` output: val (6) and test (3) in ReasonSeg format."""
    root = tmp_path_factory.mktemp("exported")
    assert cli_main(["data", "shapes-export", str(root), "--split", "val", "--size", "6",
                     "--image-size", "64", "--no-progress"]) == 0
    assert cli_main(["data", "shapes-export", str(root), "--split", "test", "--size", "3",
                     "--image-size", "64", "--no-progress"]) == 0
    return root


def _coco_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path, quality=95)


def _refer(root: Path, name: str, refs: list[dict], annotations: list[dict],
           images: list[dict], pickle_only: bool = False) -> None:
    folder = root / "refer_seg" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": []}))
    if pickle_only:
        with open(folder / "refs(unc).p", "wb") as handle:
            pickle.dump(refs, handle)
    else:
        (folder / "refs(unc).json").write_text(json.dumps(refs))


def _ref(ref_id: int, ann_id: int, image_id: int, split: str = "val") -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "sentences": [{"sent": f"thing {ref_id}"}], "category_id": 1}


POLYGON = [[2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]]


@pytest.fixture
def bad_tree(exported, tmp_path) -> tuple[Path, dict[str, str]]:
    """An exported tree with one bad file of each kind; returns (root, {file: reason})."""
    root = tmp_path / "dataset"
    shutil.copytree(exported, root)
    val = root / "reason_seg" / "ReasonSeg" / "val"
    jsons = sorted(val.glob("*.json"))
    bad: dict[str, str] = {}
    # ReasonSeg: a broken image (header fine, pixels cut), malformed JSON, a missing image,
    # an annotation without its query text.
    image = jsons[0].with_suffix(".jpg")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    bad[str(image)] = "cannot decode image"
    jsons[1].write_text('{"shapes": [}')
    bad[str(jsons[1])] = "invalid JSON"
    jsons[2].with_suffix(".jpg").unlink()
    bad[str(jsons[2].with_suffix(".jpg"))] = "image file not found"
    doc = json.loads(jsons[3].read_text())
    del doc["text"]
    jsons[3].write_text(json.dumps(doc))
    bad[str(jsons[3])] = "'text' missing"
    # Keyword file: an entry without its keyword.
    keywords = root / KEYWORDS
    entries = json.loads(keywords.read_text())
    del entries[2]["keyword"]
    keywords.write_text(json.dumps(entries))
    bad[str(keywords)] = "entry 2 lacks string field(s) ['keyword']"
    # refcoco: only a pickle, and it references a class (refused by the plain unpickler).
    _coco_image(root / IMAGES / "a.jpg", 0)
    images = [{"id": 1, "file_name": "a.jpg", "height": 12, "width": 16}]
    _refer(root, "refcoco", OrderedDict(refs=[_ref(1, 10, 1)]),  # type: ignore[arg-type]
           [{"id": 10, "image_id": 1, "segmentation": POLYGON}], images, pickle_only=True)
    bad[str(root / "refer_seg/refcoco/refs(unc).p")] = "collections.OrderedDict"
    bad[str(root / "refer_seg/refcoco/refs(unc).json")] = "only the pickle"  # not converted
    # refcoco+: a malformed segmentation, a missing image, a broken image.
    _coco_image(root / IMAGES / "b.jpg", 1)
    (root / IMAGES / "c.jpg").write_bytes(b"not a jpeg at all")
    images = [{"id": i, "file_name": f"{n}.jpg", "height": 12, "width": 16}
              for i, n in ((1, "a"), (2, "b"), (3, "missing"), (4, "c"))]
    annotations = [{"id": 10, "image_id": 1, "segmentation": POLYGON},
                   {"id": 20, "image_id": 2, "segmentation": {"counts": 7}},
                   {"id": 30, "image_id": 3, "segmentation": POLYGON},
                   {"id": 40, "image_id": 4, "segmentation": POLYGON}]
    refs = [_ref(1, 10, 1), _ref(2, 20, 2), _ref(3, 30, 3), _ref(4, 40, 4),
            _ref(5, 10, 1, split="testA")]
    _refer(root, "refcoco+", refs, annotations, images)
    bad[str(root / "refer_seg/refcoco+/instances.json")] = "annotation 20 (ref 2)"
    bad[str(root / IMAGES / "missing.jpg")] = "image file not found"
    bad[str(root / IMAGES / "c.jpg")] = "not a readable image"
    return root, bad


def test_deep_check_names_every_bad_file_with_its_reason_and_fails(bad_tree, capsys):
    root, bad = bad_tree
    code = cli_main(["data", "check", "--deep", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    listed = lines[lines.index(next(x for x in lines if x.startswith("bad files"))) + 1:]
    listed = [x.strip() for x in listed if x.startswith("  ")]
    for file, reason in bad.items():
        hits = [x for x in listed if x.startswith(f"{file}: ") and reason in x]
        assert hits, f"{file} ({reason}) not reported:\n{out}"
    assert f"bad files ({len(bad)}):" in out  # nothing else is reported as bad
    assert "deep check of" in lines[0] and f"{len(bad)} bad" in lines[-1]


def test_deep_check_findings_are_what_the_readers_reject(bad_tree):
    root, _ = bad_tree
    report = deep_check(root, progress=False)
    val = root / "reason_seg" / "ReasonSeg" / "val"
    reader = ReasonSegDataset(root, "val", keyword_file=False)
    rejected = {message for _, message in reader.report.skipped_files}
    # Every sample the reader skips while scanning is listed, with the reader's own message.
    assert len(rejected) == 3 and rejected <= {reason for _, reason in report.bad}
    # The strict loader agrees on the files the deep check calls bad.
    for json_path in sorted(val.glob("*.json")):
        flagged = any(str(json_path) == f or str(json_path.with_suffix(".jpg")) == f
                      for f, _ in report.bad)
        try:
            from keyseg.data.images import load_image

            load_image(load_reason_seg_sample(json_path).image_path)
            readable = True
        except KeySegDataError:
            readable = False
        assert flagged == (not readable), json_path


def test_deep_check_on_split_subset_and_bad_split_names(bad_tree, capsys):
    root, _ = bad_tree
    assert parse_check_splits(["test"], root) == [("reason_seg", "test")]  # refcoco: testA/B
    assert parse_check_splits(["refcoco+:testA"], root) == [("refcoco+", "testA")]
    # reason_seg test is clean, but the keyword file is always checked.
    assert cli_main(["data", "check", "--deep", str(root), "--split", "reason_seg:test",
                     "--no-progress"]) == 1
    assert "keyword_outputs.json" in capsys.readouterr().out
    assert cli_main(["data", "check", "--deep", str(root), "--split", "testC"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "testC" in err
    empty = root / "empty"
    empty.mkdir()
    assert cli_main(["data", "check", "--deep", str(empty)]) == 2  # nothing to check
    assert "no split to check" in capsys.readouterr().err


def test_shapes_export_is_accepted_by_the_reader_and_the_deep_check(exported, capsys):
    for split, size in (("val", 6), ("test", 3)):
        reader = ReasonSegDataset(exported, split)
        assert len(reader) == size and reader.report.skipped_total == 0
        assert reader.report.keywords.matched == size  # one keyword file for both splits
        assert all(r.referents[0].keyword for r in reader)
    assert cli_main(["data", "check", "--deep", str(exported), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 bad: OK" in out and "reason_seg:val: 6 samples, 0 skipped" in out
    # Exporting a split again needs --overwrite.
    assert cli_main(["data", "shapes-export", str(exported), "--split", "val", "--size",
                     "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_training_evaluation_and_check_print_the_same_totals(exported, tmp_path, capsys):
    root = tmp_path / "dataset"
    shutil.copytree(exported, root)
    val = root / "reason_seg" / "ReasonSeg" / "val"
    sorted(val.glob("*.json"))[0].write_text("{broken")
    expected = "data: reason_seg:val: 5 samples, 1 skipped (1 bad_json)"

    assert cli_main(["data", "check", "--deep", str(root), "--split", "reason_seg:val",
                     "--no-progress"]) == 1
    check = capsys.readouterr().out
    assert expected.removeprefix("data: ") in check

    assert cli_main(["eval", "--dataset", "reason_seg:val", "--dataset-dir", str(root),
                     "--limit", "1", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert expected in capsys.readouterr().out.splitlines()

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny-test.yaml"
    assert cli_main(["train", "--config", str(config), f"train.output_dir={tmp_path / 'run'}",
                     "data.datasets=reason_seg", f"data.dataset_dir={root}",
                     "data.reason_seg_split=val", "data.val_dataset=reason_seg:val",
                     "data.keyword_file=auto", "train.epochs=1", "train.steps_per_epoch=1",
                     "train.validate_every_epoch=false"]) == 0
    train = capsys.readouterr().out.splitlines()
    assert expected in train
