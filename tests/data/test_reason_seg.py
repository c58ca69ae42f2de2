"""ReasonSeg reader: LISA's rasterisation, query texts, keyword/explanation matching, skips."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keyseg.data.reason_seg import (
    RasterStats,
    ReasonSegDataset,
    load_reason_seg_sample,
    rasterize_shapes,
)
from keyseg.errors import KeySegDataError

H, W = 20, 30


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


SHAPES = [
    {"label": "target", "points": rect(2, 2, 12, 10)},
    {"label": "Ignore_big", "points": rect(0, 0, 20, 14)},  # larger: drawn first
    {"label": "ignore", "points": rect(4, 4, 6, 6)},  # smaller, inside the target: drawn last
    {"label": "flag", "points": rect(0, 0, 29, 19)},  # never drawn
    {"label": "target", "points": [[1, 1], [5, 5]]},  # 2 points: a line, drawn last
    {"label": "target", "points": rect(25, 15, 40, 25)},  # 3 vertices outside the image
]


def expected_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[0:15, 0:21] = 255
    mask[2:11, 2:13] = 1
    mask[4:7, 4:7] = 255
    mask[15:20, 25:30] = 1
    for i in range(1, 6):  # the 2-point line (smallest area), over the small ignore square
        mask[i, i] = 1
    return mask


def write_sample(folder: Path, name: str, data: dict | bytes | None, image: bool | bytes = True,
                 size: tuple[int, int] = (H, W)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if data is not None:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode("utf-8")
        (folder / f"{name}.json").write_bytes(raw)
    if image is True:
        Image.new("RGB", (size[1], size[0]), (10, 20, 30)).save(folder / f"{name}.jpg")
    elif isinstance(image, bytes):
        (folder / f"{name}.jpg").write_bytes(image)


def sample(texts: list[str], shapes: list | None = None) -> dict:
    return {"shapes": SHAPES if shapes is None else shapes, "text": texts, "is_sentence": True}


def test_rasterize_sorts_by_area_handles_ignore_flag_and_clips():
    stats = RasterStats()
    mask = rasterize_shapes(SHAPES, H, W, stats)
    np.testing.assert_array_equal(mask, expected_mask())
    assert (stats.skipped_shapes, stats.flag_shapes, stats.degenerate_shapes,
            stats.points_outside) == (0, 1, 1, 3)


def test_rasterize_draws_one_pixel_outline_of_a_thin_polygon():
    # A degenerate (zero-area) triangle along a row still paints its outline.
    mask = rasterize_shapes([{"label": "x", "points": [[1, 2], [6, 2], [3, 2]]}], 5, 8)
    assert mask[2, 1:7].tolist() == [1] * 6 and mask.sum() == 6


def test_rasterize_truncates_float_vertices():
    mask = rasterize_shapes([{"label": "x", "points": [[1.9, 1.9], [3.7, 1.2], [3.2, 3.99],
                                                         [1.1, 3.5]]}], 6, 6)
    expected = np.zeros((6, 6), dtype=np.uint8)
    expected[1:4, 1:4] = 1
    np.testing.assert_array_equal(mask, expected)


def test_rasterize_paints_equal_areas_later_shape_first():
    # Target and ignore of the same area: LISA's argsort(areas)[::-1] paints the later shape
    # first, so the earlier one ends on top (the lisa_eval_protocol fixture shows this too).
    square = rect(1, 1, 4, 4)
    target_first = [{"label": "target", "points": square}, {"label": "ignore", "points": square}]
    ignore_first = target_first[::-1]
    stats = RasterStats()
    assert set(np.unique(rasterize_shapes(target_first, 6, 6, stats))) == {0, 1}
    assert set(np.unique(rasterize_shapes(ignore_first, 6, 6, stats))) == {0, 255}
    assert stats.equal_area_ties == 2


def test_rasterize_skips_only_exact_flag_labels_and_malformed_shapes():
    shapes = [
        {"label": "FLAG", "points": rect(0, 0, 2, 2)},  # "flag" up to case: skipped
        {"label": " Flag", "points": rect(4, 0, 5, 1)},  # not "flag" as LISA compares: drawn
        {"label": "IGNORE me", "points": rect(0, 4, 1, 5)},  # "ignore" in any case: 255
        {"label": "target", "points": [[1, "x"], [2, 2], [3, 3]]},  # malformed: skipped
        {"label": "target", "points": []},  # no points: skipped
        {"label": 7, "points": rect(0, 0, 5, 5)},  # label not a string: skipped
        {"label": "target", "points": [[3.9, 3.9]]},  # one point: a dot at (3, 3)
    ]
    stats = RasterStats()
    mask = rasterize_shapes(shapes, 6, 6, stats)
    expected = np.zeros((6, 6), np.uint8)
    expected[0:2, 4:6] = 1
    expected[4:6, 0:2] = 255
    expected[3, 3] = 1
    np.testing.assert_array_equal(mask, expected)
    assert (stats.flag_shapes, stats.flag_like_drawn, stats.skipped_shapes,
            stats.degenerate_shapes) == (1, 1, 3, 1)


def test_texts_are_stripped_blank_ones_dropped_and_counted_or_kept_as_lisa_indexes_them(
        tmp_path):
    write_sample(tmp_path, "e", sample(["  ", " What holds soup? "]))
    write_sample(tmp_path, "s", sample("lamp"))  # type: ignore[arg-type]
    ours = load_reason_seg_sample(tmp_path / "e.json")
    assert [r.text for r in ours.referents] == ["What holds soup?"]
    assert ours.meta["issues"]["empty_texts"] == 1
    bugs = load_reason_seg_sample(tmp_path / "e.json", lisa_bugs=True)
    assert [r.text for r in bugs.referents] == ["", "What holds soup?"]
    assert [r.text for r in load_reason_seg_sample(tmp_path / "s.json").referents] == ["lamp"]
    chars = load_reason_seg_sample(tmp_path / "s.json", lisa_bugs=True)
    assert [r.text for r in chars.referents] == ["l", "a", "m", "p"]  # LISA's text[0] = "l"
    assert chars.meta["issues"]["bare_string_text"] == 1


def test_load_sample_gives_one_referent_per_text(tmp_path):
    write_sample(tmp_path, "a", sample(["What holds soup?", "Where is the spoon?"]))
    record = load_reason_seg_sample(tmp_path / "a.json", keyword="spoon")
    assert [r.text for r in record.referents] == ["What holds soup?", "Where is the spoon?"]
    for referent in record.referents:
        assert referent.masks.shape == (1, H, W) and referent.masks.dtype == np.uint8
        np.testing.assert_array_equal(referent.masks[0], expected_mask())
        assert referent.keyword == "spoon" and referent.is_sentence
    assert record.image_path == tmp_path / "a.jpg" and record.sample_id == "a"


def test_mask_size_follows_exif_orientation(tmp_path):
    image = Image.new("RGB", (W, H))
    exif = image.getexif()
    exif[0x0112] = 8  # displayed rotated by 90 degrees
    write_sample(tmp_path, "r", sample(["q"], [{"label": "t", "points": rect(0, 0, 2, 2)}]),
                 image=False)
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    record = load_reason_seg_sample(tmp_path / "r.json")
    assert record.referents[0].masks.shape == (1, W, H)


def test_non_utf8_json_is_read_as_cp1252(tmp_path):
    text = "Which item in the café’s window?"
    raw = json.dumps(sample([text]), ensure_ascii=False).encode("cp1252")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    write_sample(tmp_path, "c", raw)
    assert load_reason_seg_sample(tmp_path / "c.json").referents[0].text == text


@pytest.mark.parametrize(("data", "pattern"), [
    ({"text": ["q"]}, "'shapes' missing"),
    ({"shapes": []}, "'text' missing"),
    ({"shapes": [], "text": []}, "no non-empty query"),
    ({"shapes": [], "text": [" ", ""]}, "no non-empty query"),
    (b"{not json", "invalid JSON"),
])
def test_strict_loader_names_file_and_problem(tmp_path, data, pattern):
    write_sample(tmp_path, "bad", data)
    with pytest.raises(KeySegDataError, match=rf"bad\.json.*{pattern}"):
        load_reason_seg_sample(tmp_path / "bad.json")


def test_strict_loader_reports_missing_image(tmp_path):
    write_sample(tmp_path, "noimg", sample(["q"]), image=False)
    with pytest.raises(KeySegDataError, match=r"noimg\.jpg.*not found"):
        load_reason_seg_sample(tmp_path / "noimg.json")


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()[:-200]


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    base = tmp_path / "reason_seg" / "ReasonSeg"
    train = base / "train"
    write_sample(train, "good1", sample(["What do you eat soup with?", "Soup tool?"]))
    write_sample(train, "good2", sample(["Which animal barks?"]))
    write_sample(train, "nokw", sample(["Who is driving?"]))
    write_sample(train, "noshapes", {"text": ["q"]})
    write_sample(train, "notext", {"shapes": []})
    write_sample(train, "noimage", sample(["q"]), image=False)
    write_sample(train, "nojson", None)
    write_sample(train, "empty", sample(["q"]), image=b"")
    write_sample(train, "cut", sample(["Truncated?"]), image=_truncated_jpeg())
    write_sample(base / "val", "v1", sample(["Val query?"]))
    keywords = [
        {"query": "What do you eat soup with?", "outputs": "A spoon.", "image": "good1.jpg",
         "json": "good1.json", "keyword": "spoon"},
        {"query": "A different query", "outputs": "A dog.", "image": "good2.jpg",
         "json": "good2.json", "keyword": "dog"},
        {"query": "q", "outputs": "o", "image": "good2.jpg", "json": "good2.json",
         "keyword": "duplicate"},
        {"query": "q", "outputs": "o", "image": "elsewhere.jpg", "json": "elsewhere.json",
         "keyword": "cat"},
        {"query": "q", "outputs": "o", "image": "cut.jpg", "json": "cut.json", "keyword": " "},
    ]
    (base / "explanatory_key").mkdir()
    (base / "explanatory_key" / "keyword_outputs.json").write_text(json.dumps(keywords))
    explanatory = [{"query": "What do you eat soup with?", "image": "good1.jpg",
                    "json": "good1.json", "outputs": "A spoon, because it scoops."}]
    (base / "explanatory").mkdir()
    (base / "explanatory" / "train.json").write_text(json.dumps(explanatory))
    return tmp_path


def test_dataset_counts_and_skips_bad_samples(dataset_root):
    data = ReasonSegDataset(dataset_root, "train")
    ids = sorted(record.sample_id for record in data)
    assert ids == ["cut", "good1", "good2", "nokw"]
    assert len(data) == 4
    report = data.report
    assert report.skipped == {"missing_shapes": 1, "missing_text": 1, "missing_file": 1,
                              "missing_json": 1, "empty_file": 1}
    assert any("noshapes.json" in file for file, _ in report.skipped_files)


def test_dataset_verify_images_skips_truncated_jpeg(dataset_root):
    data = ReasonSegDataset(dataset_root, "train", verify_images=True)
    assert "cut" not in [record.sample_id for record in data]
    assert any("cut.jpg" in message for _, message in data.report.skipped_files)


def test_dataset_matches_keywords_by_image_name_and_reports_mismatches(dataset_root):
    data = ReasonSegDataset(dataset_root, "train")
    by_id = {record.sample_id: record for record in data}
    assert {r.keyword for r in by_id["good1"].referents} == {"spoon"}
    assert by_id["good2"].referents[0].keyword == "dog"  # first of the duplicates wins
    assert by_id["nokw"].referents[0].keyword is None
    assert by_id["cut"].referents[0].keyword is None  # blank keyword = none
    kw = data.report.keywords
    assert kw is not None
    assert (kw.entries, kw.matched, kw.samples_without, kw.unused_entries, kw.duplicates,
            kw.query_mismatch) == (5, 2, 2, 1, 1, 1)


def test_dataset_attaches_explanatory_answers(dataset_root):
    data = ReasonSegDataset(dataset_root, "train")
    by_id = {record.sample_id: record for record in data}
    good1 = by_id["good1"]
    assert good1.meta["explanation"] == "A spoon, because it scoops."
    # Raw by default: the collator adds the [SEG] template answer (with some probability).
    assert all(r.answer == "A spoon, because it scoops." for r in good1.referents)
    assert by_id["good2"].referents[0].answer is None
    fixed = ReasonSegDataset(dataset_root, "train", explanatory_template="[SEG]! {explanation}")
    assert fixed[fixed_index(fixed, "good1")].referents[0].answer == (
        "[SEG]! A spoon, because it scoops.")
    with pytest.raises(KeySegDataError, match=r"\[SEG\]"):
        ReasonSegDataset(dataset_root, "train", explanatory_template="{explanation}")
    none = ReasonSegDataset(dataset_root, "train", explanatory_file=False)
    assert all(r.answer is None for rec in none for r in rec.referents)


def fixed_index(data: ReasonSegDataset, sample_id: str) -> int:
    return next(i for i, record in enumerate(data) if record.sample_id == sample_id)


def test_dataset_splits_are_separate_and_unknown_split_lists_valid_ones(dataset_root):
    val = ReasonSegDataset(dataset_root, "val")
    assert [record.sample_id for record in val] == ["v1"]
    assert val.explanations == {}  # explanatory answers belong to train only
    with pytest.raises(KeySegDataError, match=r"'dev'.*train, val, test"):
        ReasonSegDataset(dataset_root, "dev")
    with pytest.raises(KeySegDataError, match=r"test.*not found"):
        ReasonSegDataset(dataset_root, "test")


def test_dataset_iteration_counts_images_deleted_after_scan(dataset_root):
    data = ReasonSegDataset(dataset_root, "train")
    (dataset_root / "reason_seg/ReasonSeg/train/good2.jpg").unlink()
    ids = [record.sample_id for record in data]
    assert "good2" not in ids and len(ids) == 3
    assert data.report.skipped["missing_file"] == 2
