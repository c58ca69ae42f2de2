"""ReasonSeg reader: ``NAME.jpg`` + ``NAME.json`` pairs, polygons rasterised per SPEC §5.

Layout (under the dataset root, the ``--dataset-dir``)::

    reason_seg/ReasonSeg/{train,val,test}/NAME.jpg, NAME.json
    reason_seg/ReasonSeg/explanatory/train.json      (optional; train split only)
    reason_seg/ReasonSeg/explanatory_key/keyword_outputs.json  (optional; see below)

A sample JSON holds ``shapes`` (``[{"label": str, "points": [[x, y], ...]}, ...]``), ``text``
(a list of paraphrased queries) and ``is_sentence``. Each text becomes one
:class:`~keyseg.data.sample.Referent` with the same ``(1, H, W)`` mask.

Rasterisation is LISA's (``utils/data_processing.py`` ``get_mask_from_json``), reproduced pixel
for pixel with OpenCV (:func:`rasterize_shapes`): vertices cast to ``int32`` (truncation
towards zero), each shape drawn as a closed 1-pixel outline (``cv2.polylines``, thickness 1)
plus fill (``cv2.fillPoly``); shapes painted largest drawn area first, equal areas the later
shape first; a label containing "ignore" (any case) paints 255 (ignored by the metrics),
anything else 1; a label equal to "flag" up to case is skipped (``" Flag"``, with its space,
is *drawn* as a target, as LISA draws it); shapes of 1 or 2 points are drawn (a dot, a line).
Parts outside the image are clipped by the canvas. What was skipped or degenerate is counted
(:class:`RasterStats`) and attached to each record (``record.meta["issues"]``).

Query texts (:func:`parse_reason_seg_json`): LISA evaluates ``text[0]``. Our convention: the
texts are stripped, blank ones are dropped (counted: ``empty_texts``), a bare string is the
one text (counted: ``bare_string_text``); a sample with no text left is skipped. With
``lisa_bugs=True`` the texts are what LISA indexes: blank texts kept (so ``text[0]`` may be
empty) and a bare string split into characters (so ``text[0]`` is its first letter).

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
from PIL import Image

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
    """A validated ReasonSeg annotation (before rasterisation).

    Attributes:
        texts: the query texts, stripped (see the module docstring for blank / bare texts).
        is_sentence: sentence (True) or phrase query.
        shapes: the raw ``shapes`` list.
        issues: what was odd about the texts (``empty_texts``, ``bare_string_text``).
    """

    texts: list[str]
    is_sentence: bool
    shapes: list[dict]
    issues: Counter = field(default_factory=Counter)


def parse_reason_seg_json(path: Path, data: Any | None = None,
                          lisa_bugs: bool = False) -> ParsedSample:
    """Read and validate one ReasonSeg JSON (``data`` may be given pre-parsed).

    Args:
        path: the ``NAME.json`` (named in errors).
        data: its parsed content, if already read.
        lisa_bugs: keep the texts as LISA indexes them: blank texts kept, a bare string split
            into its characters (LISA's ``text[0]`` is then its first letter).

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
    issues: Counter = Counter()
    texts = data["text"]
    if isinstance(texts, str):
        issues["bare_string_text"] += 1
        texts = list(texts) if lisa_bugs else [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise KeySegDataError(f"{path}: 'text' must be a list of strings")
    stripped = [t.strip() for t in texts]
    blank = sum(1 for t in stripped if not t)
    if blank:
        issues["empty_texts"] += blank
    texts = stripped if lisa_bugs else [t for t in stripped if t]
    if not any(texts):
        raise KeySegDataError(f"{path}: 'text' holds no non-empty query")
    return ParsedSample(texts=texts, is_sentence=bool(data.get("is_sentence", True)),
                        shapes=data["shapes"], issues=issues)


@dataclass
class RasterStats:
    """What :func:`rasterize_shapes` skipped, or drew from degenerate shapes (counts)."""

    skipped_shapes: int = 0
    """Malformed shapes, not drawn: no points, non-numeric / non-finite / huge coordinates,
    points that are not ``[x, y]`` pairs, a label that is not a string (LISA would crash)."""
    flag_shapes: int = 0
    """Label "flag" (any case): not drawn, as LISA."""
    flag_like_drawn: int = 0
    """Labels that read "flag" only once stripped (``" Flag"``): drawn as targets, as LISA."""
    degenerate_shapes: int = 0
    """Shapes of 1 or 2 points: drawn as a dot or a line, as LISA (no area of their own)."""
    equal_area_ties: int = 0
    """Annotations where shapes of different values have the same (non-zero) drawn area:
    where they overlap, the painting order (later shape first) decides the pixels."""
    points_outside: int = 0
    """Vertices outside the image (their polygon is clipped by the canvas)."""

    def add(self, other: RasterStats) -> None:
        """Add ``other``'s counts to these."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def issues(self) -> dict[str, int]:
        """The annotation counts that describe the data (all but ``points_outside``)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__
                if name != "points_outside" and getattr(self, name)}


_INT32_LIMIT = 2**31 - 1


def _shape_vertices(shape: Any) -> np.ndarray | None:
    """``(n, 2)`` int32 vertices of a shape, truncated towards zero as an ``int32`` cast does,
    or ``None`` when the shape is malformed (see :attr:`RasterStats.skipped_shapes`)."""
    points = shape.get("points") if isinstance(shape, dict) else None
    if not isinstance(points, list) or not points:
        return None
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for p in points
               for v in p):
        return None
    coords = np.asarray(points, dtype=np.float64)
    if not np.isfinite(coords).all() or np.abs(coords).max() > _INT32_LIMIT:
        return None
    return np.trunc(coords).astype(np.int32)


def draw_shape(canvas: np.ndarray, vertices: np.ndarray, value: int) -> np.ndarray:
    """Paint one shape onto ``canvas`` in place, as LISA does: a closed 1-pixel outline
    (``cv2.polylines``, thickness 1, 8-connected) and the fill (``cv2.fillPoly``).

    Args:
        canvas: ``(H, W)`` uint8, modified in place.
        vertices: ``(n, 2)`` int32 ``(x, y)`` pixel coordinates, ``n >= 1``.
        value: the value painted (1 or 255).

    Returns:
        ``canvas``.
    """
    import cv2

    polygon = np.ascontiguousarray(vertices, dtype=np.int32).reshape(1, -1, 2)
    cv2.polylines(canvas, polygon, True, int(value), 1)
    cv2.fillPoly(canvas, polygon, int(value))
    return canvas


def rasterize_shapes(shapes: Sequence[Any], height: int, width: int,
                     stats: RasterStats | None = None) -> np.ndarray:
    """Rasterise ReasonSeg shapes into one mask exactly as LISA's reader does.

    Each drawable shape's area is the pixel count of :func:`draw_shape` on an empty canvas;
    shapes are painted by decreasing area, equal areas the later shape first (the order LISA's
    ``argsort(areas)[::-1]`` gives wherever numpy's sort keeps ties in order: always for up to
    three shapes; with four or more tied shapes numpy's SIMD sort may not, so LISA's own
    order then depends on the numpy build and CPU, and ours is the reproducible one).

    Args:
        shapes: ``[{"label": str, "points": [[x, y], ...]}, ...]``.
        height, width: image size ``(H, W)``.
        stats: if given, receives the counts of :class:`RasterStats` (added to it).

    Returns:
        ``(H, W)`` uint8 mask with values {0, 1, 255}.
    """
    stats = stats if stats is not None else RasterStats()
    drawable: list[tuple[int, int, np.ndarray, int]] = []  # (area, index, vertices, value)
    for index, shape in enumerate(shapes):
        label = shape.get("label", "") if isinstance(shape, dict) else None
        if not isinstance(label, str):
            stats.skipped_shapes += 1
            continue
        if label.lower() == "flag":
            stats.flag_shapes += 1
            continue
        vertices = _shape_vertices(shape)
        if vertices is None:
            stats.skipped_shapes += 1
            continue
        if label.strip().lower() == "flag":
            stats.flag_like_drawn += 1
        if len(vertices) < 3:
            stats.degenerate_shapes += 1
        inside = ((vertices[:, 0] >= 0) & (vertices[:, 0] < width)
                  & (vertices[:, 1] >= 0) & (vertices[:, 1] < height))
        stats.points_outside += int((~inside).sum())
        value = IGNORE_VALUE if "ignore" in label.lower() else 1
        area = int(np.count_nonzero(draw_shape(np.zeros((height, width), np.uint8),
                                               vertices, 1)))
        drawable.append((area, index, vertices, value))
    values_by_area: dict[int, set[int]] = {}
    for area, _, _, value in drawable:
        values_by_area.setdefault(area, set()).add(value)
    if any(area and len(values) > 1 for area, values in values_by_area.items()):
        stats.equal_area_ties += 1
    drawable.sort(key=lambda item: (item[0], item[1]), reverse=True)
    mask = np.zeros((height, width), dtype=np.uint8)
    for _, _, vertices, value in drawable:
        draw_shape(mask, vertices, value)
    return mask


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
    lisa_bugs: bool = False,
) -> SegRecord:
    """Strictly load one ReasonSeg sample; raise on any problem.

    Args:
        json_path: the sample's ``NAME.json``.
        image_path: its image (default ``NAME.jpg`` beside the JSON).
        keyword: keyword for every referent (``None``: no ``[KEY]``).
        answer: an answer holding one ``[SEG]`` for every referent (e.g. explanatory).
        stats: if given, receives the rasteriser's counts.
        lisa_bugs: texts as LISA indexes them (see :func:`parse_reason_seg_json`).

    Returns:
        A :class:`SegRecord` with one referent per query text, each ``masks`` ``(1, H, W)``
        uint8 in {0, 1, 255}; ``image_path`` set (the image is not decoded here);
        ``meta["issues"]``: the sample's text and shape counts (:func:`sample_issues`).

    Raises:
        KeySegDataError: missing JSON/image, bad JSON, missing ``shapes``/``text``.
    """
    json_path = Path(json_path)
    image_path = Path(image_path) if image_path is not None else json_path.with_suffix(".jpg")
    if not json_path.is_file():
        raise KeySegDataError(f"{json_path}: annotation file not found")
    parsed = parse_reason_seg_json(json_path, lisa_bugs=lisa_bugs)
    if not image_path.is_file():
        raise KeySegDataError(f"{image_path}: image file not found (for {json_path.name})")
    height, width = _image_size(image_path)
    raster = RasterStats()
    mask = rasterize_shapes(parsed.shapes, height, width, raster)[None]
    if stats is not None:
        stats.add(raster)
    referents = [
        Referent(text=text, is_sentence=parsed.is_sentence, masks=mask.copy(), keyword=keyword,
                 answer=answer)
        for text in parsed.texts
    ]
    return SegRecord(sample_id=json_path.stem, source=source, referents=referents,
                     image_path=image_path,
                     meta={"json_path": str(json_path), "issues": sample_issues(parsed, raster)})


def sample_issues(parsed: ParsedSample, raster: RasterStats) -> dict[str, int]:
    """The non-zero text and shape counts of one sample (its ``record.meta["issues"]``)."""
    issues = {k: int(v) for k, v in parsed.issues.items() if v}
    issues.update(raster.issues())
    return issues


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
        verify_images: fully decode every image during the scan.
        lisa_bugs: texts as LISA indexes them (``keyseg eval --protocol lisa-bugs``; see
            :func:`parse_reason_seg_json`); masks are the same either way.

    ``report.raster`` adds up the rasteriser's counts of every sample rasterised so far (each
    sample once); each record carries its own in ``record.meta["issues"]``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        keyword_file: str | Path | bool | None = None,
        explanatory_file: str | Path | bool | None = None,
        explanatory_template: str | None = None,
        verify_images: bool = False,
        lisa_bugs: bool = False,
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
        self.lisa_bugs = lisa_bugs
        self._rasterised: set[int] = set()
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
                parsed = parse_reason_seg_json(json_path, lisa_bugs=self.lisa_bugs)
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
        raster = RasterStats()
        mask = rasterize_shapes(parsed.shapes, height, width, raster)[None]
        if index not in self._rasterised:
            self._rasterised.add(index)
            self.report.raster.add(raster)
        keyword = self.keywords.get(image_path.name)
        explanation = self.explanations.get(image_path.name)
        answer = None
        meta: dict[str, Any] = {"json_path": str(json_path), "split": self.split,
                                "issues": sample_issues(parsed, raster)}
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
                        ("no non-empty query", "no_text"),
                        ("not found", "missing_file"), ("invalid JSON", "bad_json"),
                        ("neither UTF-8", "bad_encoding"), ("empty", "empty_file")):
        if key in message:
            return reason
    return "bad_sample"
