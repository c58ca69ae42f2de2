"""ReasonSeg reader: ``NAME.jpg`` + ``NAME.json`` pairs, polygons rasterised per SPEC §5.

Layout (under the dataset root, the ``--dataset-dir``)::

    reason_seg/ReasonSeg/{train,val,test}/NAME.jpg, NAME.json
    reason_seg/ReasonSeg/explanatory/train.json      (optional; train split only)
    reason_seg/ReasonSeg/explanatory_key/keyword_outputs.json  (optional; see below)

A sample JSON holds ``shapes`` (``[{"label": str, "points": [[x, y], ...]}, ...]``), ``text``
(a list of paraphrased queries) and ``is_sentence``. Each text becomes one
:class:`~keyseg.data.sample.Referent` with the same ``(1, H, W)`` mask.

Rasterisation (the reference behaviour): every shape except label ``"flag"`` is drawn with a
1-pixel outline plus fill, shapes sorted by drawn area (largest first, so smaller shapes such
as ignore regions inside an object win); a label containing ``"ignore"`` paints 255 (ignored
by the metrics), anything else paints 1. We draw with ``PIL.ImageDraw.polygon(fill=v,
outline=v, width=1)`` (OpenCV is not a dependency); vertices are truncated to integer pixels
like the reference's ``int32`` cast, and parts of a polygon outside the image are simply not
drawn (the canvas clips them), so a polygon's in-image part is exact.

Bad data never kills an iteration: :class:`ReasonSegDataset` counts and skips bad samples in
its :class:`ReasonSegReport`; :func:`load_reason_seg_sample` is the strict single-sample
loader that raises :class:`~keyseg.errors.KeySegDataError` naming the file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from keyseg.data.sample import Referent, SegRecord
from keyseg.errors import KeySegDataError

REASON_SEG_SPLITS: tuple[str, ...] = ("train", "val", "test")
IGNORE_VALUE: int = 255
SOURCE = "reason_seg"

# Where a keyword file is looked for when none is given, relative to the dataset root.
KEYWORD_FILE_CANDIDATES: tuple[str, ...] = (
    "reason_seg/ReasonSeg/explanatory_key/keyword_outputs.json",
    "reason_seg/explanatory_key/keyword_outputs.json",
    "reason_seg_key/keyword_outputs.json",
)
EXPLANATORY_FILE = "reason_seg/ReasonSeg/explanatory/train.json"

#: An example ``explanatory_template`` (the reader's default is ``None``: raw explanation).
EXAMPLE_EXPLANATORY_TEMPLATE = "Sure, it is [SEG]. {explanation}"


# --------------------------------------------------------------------------- JSON + masks


def read_json_text(path: Path) -> Any:
    """Parse a JSON file as UTF-8, falling back to cp1252 (some ReasonSeg files use it).

    Raises:
        KeySegDataError: unreadable file or invalid JSON, naming the file.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise KeySegDataError(f"{path}: cannot read ({error.strerror or error})") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError as error:
            raise KeySegDataError(f"{path}: neither UTF-8 nor cp1252 text") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise KeySegDataError(f"{path}: invalid JSON ({error})") from error


@dataclass
class ParsedSample:
    """A validated ReasonSeg annotation (before rasterisation)."""

    texts: list[str]
    is_sentence: bool
    shapes: list[dict]


def parse_reason_seg_json(path: Path, data: Any | None = None) -> ParsedSample:
    """Read and validate one ReasonSeg JSON (``data`` may be given pre-parsed).

    Raises:
        KeySegDataError: ``shapes`` or ``text`` missing or of the wrong type, no query text.
    """
    if data is None:
        data = read_json_text(path)
    if not isinstance(data, dict):
        raise KeySegDataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if "shapes" not in data:
        raise KeySegDataError(f"{path}: 'shapes' missing (expected a list of polygons)")
    if not isinstance(data["shapes"], list):
        raise KeySegDataError(f"{path}: 'shapes' must be a list of polygons")
    if "text" not in data:
        raise KeySegDataError(f"{path}: 'text' missing (expected a list of query strings)")
    texts = data["text"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise KeySegDataError(f"{path}: 'text' must be a list of strings")
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise KeySegDataError(f"{path}: 'text' holds no non-empty query")
    return ParsedSample(texts=texts, is_sentence=bool(data.get("is_sentence", True)),
                        shapes=data["shapes"])


@dataclass
class RasterStats:
    """What :func:`rasterize_shapes` dropped or clipped."""

    skipped_shapes: int = 0  # < 3 points or malformed points / label
    flag_shapes: int = 0
    points_outside: int = 0  # vertices outside the image (their polygon is clipped)


def _polygon_points(shape: Any) -> list[tuple[int, int]] | None:
    """Integer vertices of a shape, or None when the shape is unusable (< 3 valid points)."""
    points = shape.get("points") if isinstance(shape, dict) else None
    if not isinstance(points, list):
        return None
    vertices: list[tuple[int, int]] = []
    for point in points:
        if not (isinstance(point, (list, tuple)) and len(point) >= 2):
            return None
        x, y = point[0], point[1]
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in (x, y)):
            return None
        vertices.append((int(x), int(y)))  # truncation, as the reference's int32 cast
    return vertices if len(vertices) >= 3 else None


def _draw(vertices: list[tuple[int, int]], height: int, width: int, value: int,
          canvas: Image.Image | None = None) -> Image.Image:
    canvas = canvas if canvas is not None else Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(vertices, fill=value, outline=value, width=1)
    return canvas


def rasterize_shapes(shapes: Sequence[Any], height: int, width: int,
                     stats: RasterStats | None = None) -> np.ndarray:
    """Rasterise ReasonSeg shapes into one mask.

    Args:
        shapes: ``[{"label": str, "points": [[x, y], ...]}, ...]``.
        height, width: image size ``(H, W)``.
        stats: if given, receives counts of skipped/flag shapes and out-of-image vertices.

    Returns:
        ``(H, W)`` uint8 mask with values {0, 1, 255}.
    """
    stats = stats if stats is not None else RasterStats()
    drawable: list[tuple[int, int, list[tuple[int, int]], int]] = []
    for index, shape in enumerate(shapes):
        label = shape.get("label", "") if isinstance(shape, dict) else None
        if not isinstance(label, str):
            stats.skipped_shapes += 1
            continue
        if label.strip().lower() == "flag":
            stats.flag_shapes += 1
            continue
        vertices = _polygon_points(shape)
        if vertices is None:
            stats.skipped_shapes += 1
            continue
        stats.points_outside += sum(
            1 for x, y in vertices if not (0 <= x < width and 0 <= y < height)
        )
        value = IGNORE_VALUE if "ignore" in label.lower() else 1
        area = int(np.count_nonzero(np.asarray(_draw(vertices, height, width, 1))))
        drawable.append((area, index, vertices, value))
    # Largest first; ties keep file order (the sort is stable on -area).
    drawable.sort(key=lambda item: -item[0])
    canvas = Image.new("L", (width, height), 0)
    for _, _, vertices, value in drawable:
        _draw(vertices, height, width, value, canvas)
    return np.array(canvas, dtype=np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` as displayed (EXIF orientation applied) from the header, without decoding."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except FileNotFoundError as error:
        raise KeySegDataError(f"{path}: image file not found") from error
    except Exception as error:  # any header failure is a data error here
        raise KeySegDataError(f"{path}: not a readable image ({error})") from error
    # Orientations 5-8 swap the axes (transpose/rotate 90/270).
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


# --------------------------------------------------------------------------- keywords etc.


@dataclass
class KeywordMatchReport:
    """How a keyword (or explanatory) file matched the samples of one split."""

    entries: int = 0
    matched: int = 0  # samples that got a keyword
    samples_without: int = 0  # samples of the split with no entry
    unused_entries: int = 0  # entries whose image is not in this split
    query_mismatch: int = 0  # entry's query is none of the sample's texts
    json_mismatch: int = 0  # entry's 'json' is not the image's stem + .json
    duplicates: int = 0  # more entries for an image already seen (first one wins)
    bad_entries: int = 0  # entries without a usable image/keyword field


def _index_by_image(entries: list[Any], value_key: str, report: KeywordMatchReport,
                    path: Path) -> dict[str, dict]:
    if not isinstance(entries, list):
        raise KeySegDataError(f"{path}: expected a JSON list of entries")
    index: dict[str, dict] = {}
    report.entries = len(entries)
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                and isinstance(entry.get(value_key), str)):
            report.bad_entries += 1
            continue
        name = Path(entry["image"]).name
        if name in index:
            report.duplicates += 1
            continue
        index[name] = entry
    return index


@dataclass
class ReasonSegReport:
    """What a :class:`ReasonSegDataset` found: counts, and why samples were skipped."""

    split: str
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    raster: RasterStats = field(default_factory=RasterStats)
    keywords: KeywordMatchReport | None = None
    explanations: KeywordMatchReport | None = None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skip(self, file: Path | str, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.skipped_files.append((str(file), message))


# --------------------------------------------------------------------------- readers


def load_reason_seg_sample(
    json_path: str | Path,
    image_path: str | Path | None = None,
    keyword: str | None = None,
    answer: str | None = None,
    source: str = SOURCE,
    stats: RasterStats | None = None,
) -> SegRecord:
    """Strictly load one ReasonSeg sample; raise on any problem.

    Args:
        json_path: the sample's ``NAME.json``.
        image_path: its image (default ``NAME.jpg`` beside the JSON).
        keyword: keyword for every referent (``None``: no ``[KEY]``).
        answer: an answer holding one ``[SEG]`` for every referent (e.g. explanatory).

    Returns:
        A :class:`SegRecord` with one referent per query text, each ``masks`` ``(1, H, W)``
        uint8 in {0, 1, 255}; ``image_path`` set (the image is not decoded here).

    Raises:
        KeySegDataError: missing JSON/image, bad JSON, missing ``shapes``/``text``.
    """
    json_path = Path(json_path)
    image_path = Path(image_path) if image_path is not None else json_path.with_suffix(".jpg")
    if not json_path.is_file():
        raise KeySegDataError(f"{json_path}: annotation file not found")
    parsed = parse_reason_seg_json(json_path)
    if not image_path.is_file():
        raise KeySegDataError(f"{image_path}: image file not found (for {json_path.name})")
    height, width = _image_size(image_path)
    mask = rasterize_shapes(parsed.shapes, height, width, stats)[None]
    referents = [
        Referent(text=text, is_sentence=parsed.is_sentence, masks=mask.copy(), keyword=keyword,
                 answer=answer)
        for text in parsed.texts
    ]
    return SegRecord(sample_id=json_path.stem, source=source, referents=referents,
                     image_path=image_path, meta={"json_path": str(json_path)})


def find_keyword_file(root: str | Path) -> Path | None:
    """The first existing keyword file among :data:`KEYWORD_FILE_CANDIDATES` under ``root``."""
    for relative in KEYWORD_FILE_CANDIDATES:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


class ReasonSegDataset(Sequence[SegRecord]):
    """One ReasonSeg split as a sequence of :class:`SegRecord` (len + getitem).

    At construction the split is scanned: every ``NAME.json`` is parsed and validated and its
    image located; bad samples (no image, bad JSON, no shapes/text) are counted in
    :attr:`report` and left out, so indexing never meets them. Masks are rasterised on
    ``__getitem__`` (the image header is read for its size; pixels are decoded later by
    :func:`keyseg.data.images.load_image`). Pass ``verify_images=True`` to fully decode each
    image during the scan and skip truncated/corrupt ones too.

    Args:
        root: dataset root holding ``reason_seg/ReasonSeg/<split>/``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        keyword_file: ``keyword_outputs.json``; ``None`` looks in the usual places
            (:data:`KEYWORD_FILE_CANDIDATES`), ``False`` uses none.
        explanatory_file: ``explanatory/train.json``; ``None`` uses it when present (train
            split only), ``False`` uses none.
        explanatory_template: how an explanation becomes ``Referent.answer``. ``None``
            (default): the raw explanation text, without ``[SEG]``; the collator then uses it
            with probability ``explanatory`` behind a random template answer and adds the
            explanatory question suffix (SPEC §4). A template (``{explanation}`` replaced,
            must contain ``[SEG]``, e.g. :data:`EXAMPLE_EXPLANATORY_TEMPLATE`) gives a fixed
            answer used verbatim. The explanation is also in ``record.meta["explanation"]``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        keyword_file: str | Path | bool | None = None,
        explanatory_file: str | Path | bool | None = None,
        explanatory_template: str | None = None,
        verify_images: bool = False,
    ) -> None:
        if split not in REASON_SEG_SPLITS:
            raise KeySegDataError(
                f"unknown ReasonSeg split {split!r}; valid splits: {', '.join(REASON_SEG_SPLITS)}"
            )
        if explanatory_template is not None and "[SEG]" not in explanatory_template:
            raise KeySegDataError("explanatory_template must contain [SEG]")
        self.root = Path(root)
        self.split = split
        self.split_dir = self.root / "reason_seg" / "ReasonSeg" / split
        if not self.split_dir.is_dir():
            raise KeySegDataError(
                f"{self.split_dir}: ReasonSeg split folder not found (expected "
                f"<dataset-dir>/reason_seg/ReasonSeg/{split}/ with NAME.jpg + NAME.json)"
            )
        self.explanatory_template = explanatory_template
        self.report = ReasonSegReport(split=split)
        self._items: list[tuple[Path, Path, ParsedSample]] = []
        self._scan(verify_images)

        self.keywords: dict[str, str] = {}
        kw_path = find_keyword_file(self.root) if keyword_file is None else keyword_file
        if kw_path:
            self._match_keywords(Path(kw_path))

        self.explanations: dict[str, dict] = {}
        if explanatory_file is None and split == "train":
            default = self.root / EXPLANATORY_FILE
            explanatory_file = default if default.is_file() else False
        if explanatory_file:
            self._match_explanations(Path(explanatory_file))

    # -- scanning ---------------------------------------------------------------------
    def _scan(self, verify_images: bool) -> None:
        from keyseg.data.images import load_image

        json_stems = {p.stem for p in self.split_dir.glob("*.json")}
        for image_path in sorted(self.split_dir.glob("*.jpg")):
            if image_path.stem not in json_stems:
                self.report.skip(image_path, "missing_json",
                                 f"{image_path}: no {image_path.stem}.json")
        for json_path in sorted(self.split_dir.glob("*.json")):
            image_path = json_path.with_suffix(".jpg")
            try:
                parsed = parse_reason_seg_json(json_path)
                if not image_path.is_file():
                    raise KeySegDataError(f"{image_path}: image file not found")
                if image_path.stat().st_size == 0:
                    raise KeySegDataError(f"{image_path}: image file is empty (0 bytes)")
                if verify_images:
                    load_image(image_path)
            except KeySegDataError as error:
                self.report.skip(json_path, _reason(str(error)), str(error))
                continue
            self._items.append((json_path, image_path, parsed))
        self.report.samples = len(self._items)

    def _match_keywords(self, path: Path) -> None:
        report = KeywordMatchReport()
        index = _index_by_image(read_json_text(path), "keyword", report, path)
        self._match(index, report, value_key="keyword", store=self.keywords)
        self.report.keywords = report

    def _match_explanations(self, path: Path) -> None:
        report = KeywordMatchReport()
        index = _index_by_image(read_json_text(path), "outputs", report, path)
        self._match(index, report, value_key=None, store=self.explanations)
        self.report.explanations = report

    def _match(self, index: dict[str, dict], report: KeywordMatchReport, value_key: str | None,
               store: dict) -> None:
        names = set()
        for json_path, image_path, parsed in self._items:
            names.add(image_path.name)
            entry = index.get(image_path.name)
            if entry is None:
                report.samples_without += 1
                continue
            value = entry[value_key].strip() if value_key else entry
            if value_key and not value:
                report.samples_without += 1
                continue
            report.matched += 1
            store[image_path.name] = value
            query = entry.get("query")
            if isinstance(query, str) and query.strip() not in parsed.texts:
                report.query_mismatch += 1
            if entry.get("json") not in (None, json_path.name):
                report.json_mismatch += 1
        report.unused_entries = sum(1 for name in index if name not in names)

    # -- sequence protocol ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> SegRecord:  # type: ignore[override]
        """The record at ``index``; ``KeySegDataError`` if its image became unreadable."""
        json_path, image_path, parsed = self._items[index]
        height, width = _image_size(image_path)
        mask = rasterize_shapes(parsed.shapes, height, width, self.report.raster)[None]
        keyword = self.keywords.get(image_path.name)
        explanation = self.explanations.get(image_path.name)
        answer = None
        meta: dict[str, Any] = {"json_path": str(json_path), "split": self.split}
        if explanation is not None:
            meta["explanation"] = explanation["outputs"]
            meta["explanation_query"] = explanation.get("query")
            text = explanation["outputs"].strip()
            answer = (text if self.explanatory_template is None
                      else self.explanatory_template.replace("{explanation}", text)) or None
        referents = [
            Referent(text=text, is_sentence=parsed.is_sentence, masks=mask.copy(),
                     keyword=keyword, answer=answer)
            for text in parsed.texts
        ]
        return SegRecord(sample_id=json_path.stem, source=SOURCE, referents=referents,
                         image_path=image_path, meta=meta)

    def __iter__(self) -> Iterator[SegRecord]:
        """Every record in order; a sample that fails at load time is counted and skipped."""
        for index in range(len(self)):
            try:
                yield self[index]
            except KeySegDataError as error:
                self.report.skip(self._items[index][0], _reason(str(error)), str(error))


def _reason(message: str) -> str:
    """A short counter key for an error message (for the skip report)."""
    for key, reason in (("'shapes' missing", "missing_shapes"), ("'text' missing", "missing_text"),
                        ("not found", "missing_file"), ("invalid JSON", "bad_json"),
                        ("neither UTF-8", "bad_encoding"), ("empty", "empty_file")):
        if key in message:
            return reason
    return "bad_sample"
