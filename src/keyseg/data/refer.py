"""REFER reader for refCOCO, refCOCO+ and refCOCOg (SPEC §5).

Layout (under the dataset root)::

    refer_seg/<name>/instances.json        COCO images / annotations / categories
    refer_seg/<name>/refs(<splitBy>).json  written once by `keyseg data convert-refer`
    refer_seg/<name>/refs(<splitBy>).p     the released pickle (only read on opt-in)
    refer_seg/images/mscoco/images/train2014/COCO_train2014_*.jpg

``splitBy`` is ``unc`` for refcoco/refcoco+ and ``umd`` for refcocog. A ref is
``{ref_id, ann_id, image_id, split, sentences: [{sent, ...}], category_id}``; its mask is the
segmentation of annotation ``ann_id`` (polygons, uncompressed or compressed RLE), decoded
with pycocotools.

Why JSON by default: a pickle can run arbitrary code when loaded, so the reader never
unpickles unless called with ``allow_pickle=True`` (and even then only plain containers,
strings and numbers are accepted). :func:`convert_refs_pickle_to_json` converts a trusted
pickle once.

One :class:`SegRecord` per image of the split; its referents are all the sentences of all
refs on that image (one mask ``(1, H, W)`` each), so evaluation sees every expression and
training samples up to N of them (:class:`keyseg.data.mixture.MixtureSampler`).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from keyseg.data.sample import Referent, SegRecord
from keyseg.errors import KeySegDataError
from keyseg.io import atomic_write_json

#: dataset name -> its splitBy (the refs file used by LISA and KeySeg).
REFER_DATASETS: dict[str, str] = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
REFER_SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB", "test")
IMAGE_SUBDIR = "refer_seg/images/mscoco/images/train2014"

KeywordMode = Literal["sentence", "head-noun"]
KEYWORD_MODES: tuple[str, ...] = ("sentence", "head-noun")


# --------------------------------------------------------------------------- refs files


def refs_path(dataset_dir: str | Path, split_by: str, suffix: str = ".json") -> Path:
    """``<dataset_dir>/refs(<split_by>)<suffix>`` (``dataset_dir`` = ``refer_seg/<name>``)."""
    return Path(dataset_dir) / f"refs({split_by}){suffix}"


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers/strings/numbers: any class reference is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise KeySegDataError(
            f"refs pickle references {module}.{name}; only plain lists/dicts/strings/numbers "
            "are accepted"
        )


def _load_refs_pickle(path: Path) -> list[dict]:
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except KeySegDataError as error:  # a refused class reference: say which file
        raise KeySegDataError(f"{path}: {error}") from error
    except Exception as error:  # a broken pickle can fail in many ways
        raise KeySegDataError(f"{path}: cannot read refs pickle ({error})") from error
    return _check_refs(data, path)


def _check_refs(data: Any, path: Path) -> list[dict]:
    if not isinstance(data, list):
        raise KeySegDataError(f"{path}: expected a list of refs, got {type(data).__name__}")
    for ref in data[:1]:
        missing = {"ref_id", "ann_id", "image_id", "split", "sentences"} - set(ref)
        if missing:
            raise KeySegDataError(f"{path}: refs lack {sorted(missing)}")
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):  # Python 2 pickles may hold byte strings
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def convert_refs_pickle_to_json(src: str | Path, dst: str | Path | None = None) -> Path:
    """Convert a trusted ``refs(<splitBy>).p`` to ``refs(<splitBy>).json`` (atomic write).

    Only call this on a pickle you trust (the released REFER file). Returns the JSON path
    (default: same folder and name with ``.json``).
    """
    src = Path(src)
    if not src.is_file():
        raise KeySegDataError(f"{src}: refs pickle not found")
    dst = Path(dst) if dst is not None else src.with_suffix(".json")
    atomic_write_json(dst, _jsonable(_load_refs_pickle(src)), indent=None)
    return dst


def load_refs(dataset_dir: str | Path, split_by: str, allow_pickle: bool = False) -> list[dict]:
    """The refs of one REFER dataset folder, from JSON (or the pickle on explicit opt-in).

    Raises:
        KeySegDataError: no refs file; or only the pickle and ``allow_pickle`` is False (the
            message says to run ``keyseg data convert-refer``).
    """
    json_path = refs_path(dataset_dir, split_by)
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise KeySegDataError(f"{json_path}: cannot read refs JSON ({error})") from error
        return _check_refs(data, json_path)
    pickle_path = refs_path(dataset_dir, split_by, ".p")
    if pickle_path.is_file():
        if not allow_pickle:
            raise KeySegDataError(
                f"{json_path}: not found, only the pickle {pickle_path.name} exists; pickles are "
                f"not loaded by default (they can run code). Convert it once with: keyseg data "
                f"convert-refer <dataset-dir> --name {Path(dataset_dir).name}"
            )
        return _load_refs_pickle(pickle_path)
    raise KeySegDataError(f"{json_path}: refs file not found (nor {pickle_path.name})")


# --------------------------------------------------------------------------- masks


def annotation_to_mask(segmentation: Any, height: int, width: int, sum_parts: bool = False,
                       issues: Counter | None = None) -> np.ndarray:
    """Decode a COCO ``segmentation`` with pycocotools.

    Accepted: a list of parts, each a polygon ``[x1, y1, x2, y2, ...]`` or an RLE dict
    (compressed ``counts`` string or uncompressed ``counts`` list), or one RLE dict. The parts
    of a list are united (``sum_parts``: added up, as LISA does, so pixels where two parts
    overlap become 2; ``keyseg eval --protocol lisa-bugs``).

    Degenerate annotations are kept and counted in ``issues``: an empty list is an all-zero
    mask (``empty_segmentations``, as LISA); a polygon of fewer than 3 vertices encloses no
    area and adds nothing (``degenerate_polygons``; pycocotools rasterises such an outline to
    nothing, and LISA cannot read a 4-number polygon at all: pycocotools takes it for a
    box); a list whose parts overlap counts once in ``overlapping_parts``.

    Returns:
        ``(H, W)`` uint8 mask in {0, 1} (with ``sum_parts``: the number of parts covering each
        pixel).

    Raises:
        KeySegDataError: unrecognised or malformed segmentation (no file named: the caller
            adds it).
    """
    issues = issues if issues is not None else Counter()
    if isinstance(segmentation, dict):
        return _decode_parts([_rle_part(segmentation, height, width)], height, width)
    if not isinstance(segmentation, list):
        raise KeySegDataError(f"unrecognised segmentation of type {type(segmentation).__name__}")
    if not segmentation:
        issues["empty_segmentations"] += 1
        return np.zeros((height, width), dtype=np.uint8)
    parts: list[Any] = []
    for part in segmentation:
        if isinstance(part, dict):
            parts.append(_rle_part(part, height, width))
        elif isinstance(part, list):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part):
                raise KeySegDataError("polygon with a non-numeric coordinate")
            if len(part) % 2:
                raise KeySegDataError(f"polygon with an odd number of coordinates ({len(part)})")
            if len(part) < 6:
                issues["degenerate_polygons"] += 1
                continue
            parts.append(("polygon", [float(v) for v in part]))
        else:
            raise KeySegDataError(f"segmentation part of type {type(part).__name__}")
    if not parts:
        return np.zeros((height, width), dtype=np.uint8)
    stack = _decode_stack(parts, height, width)  # (n, H, W) in {0, 1}
    total = stack.sum(axis=0)
    if len(parts) > 1 and total.max() > 1:
        issues["overlapping_parts"] += 1
    return total.astype(np.uint8) if sum_parts else (total > 0).astype(np.uint8)


def _rle_part(rle: dict, height: int, width: int) -> tuple[str, dict]:
    """An RLE dict checked and normalised: ``("rle", {"size", "counts": bytes})`` or
    ``("uncompressed", dict)``."""
    counts, size = rle.get("counts"), rle.get("size", [height, width])
    if counts is None:
        raise KeySegDataError(
            f"unrecognised segmentation: a dict without RLE 'counts' (keys {sorted(rle)})")
    if not (isinstance(size, (list, tuple)) and len(size) == 2):
        raise KeySegDataError(f"RLE size {size!r} is not [height, width]")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise KeySegDataError(f"segmentation size {tuple(size)} != image size {(height, width)}")
    if isinstance(counts, list):
        return ("uncompressed", {"size": [height, width], "counts": counts})
    if isinstance(counts, (str, bytes)):
        return ("rle", {"size": [height, width],
                        "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    raise KeySegDataError(f"unrecognised segmentation: RLE counts of type "
                          f"{type(counts).__name__}")


def _decode_parts(parts: list[tuple[str, Any]], height: int, width: int) -> np.ndarray:
    return (_decode_stack(parts, height, width).max(axis=0) > 0).astype(np.uint8)


def _decode_stack(parts: list[tuple[str, Any]], height: int, width: int) -> np.ndarray:
    """``(n, H, W)`` uint8 {0, 1}: each part decoded by pycocotools."""
    from pycocotools import mask as mask_utils

    rles = []
    try:
        for kind, value in parts:
            if kind == "polygon":
                rles.extend(mask_utils.frPyObjects([value], height, width))
            elif kind == "uncompressed":
                rles.append(mask_utils.frPyObjects(value, height, width))
            else:
                rles.append(value)
        with warnings.catch_warnings():
            # pycocotools' Cython decode trips numpy 2's __array__(copy=...) deprecation.
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rles)  # (H, W, n)
    except Exception as error:  # pycocotools raises bare TypeErrors etc.
        raise KeySegDataError(f"malformed segmentation ({error})") from error
    if decoded.shape[:2] != (height, width):
        raise KeySegDataError(
            f"segmentation size {decoded.shape[:2]} != image size {(height, width)}")
    return (np.moveaxis(decoded, 2, 0) > 0).astype(np.uint8)


def in_refer_split(ref_split: str, split: str) -> bool:
    """Whether a ref whose ``split`` is ``ref_split`` belongs to ``split``, as REFER (and so
    LISA) selects refs: ``testA`` / ``testB`` / ``testC`` take every test split naming that
    letter (a ``testAB`` ref is in testA *and* testB), ``test`` takes every test split, other
    splits are matched exactly."""
    if split in ("testA", "testB", "testC"):
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    if split == "test":
        return ref_split.startswith("test")
    return ref_split == split


# --------------------------------------------------------------------------- keywords

_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their",
                "my", "your", "our", "some", "any", "each", "every", "both", "all"}
_COLOURS = {"red", "blue", "green", "yellow", "white", "black", "brown", "gray", "grey",
            "orange", "pink", "purple", "tan", "beige", "dark", "light", "silver", "gold",
            "golden", "striped", "colored", "coloured"}
_POSITIONS = {"left", "right", "middle", "center", "centre", "front", "back", "top", "bottom",
              "far", "near", "closest", "nearest", "farthest", "furthest", "leftmost",
              "rightmost", "upper", "lower", "first", "second", "third", "last", "other",
              "big", "bigger", "biggest", "small", "smaller", "smallest", "large", "larger",
              "largest", "little", "tall", "taller", "tallest", "short", "shorter", "half",
              "partial", "whole", "full", "empty", "only", "lone", "single", "two", "three",
              "one", "side", "corner", "background", "foreground"}
# Words that end the head noun phrase: prepositions, relative pronouns, participles, "and".
_BREAKERS = {"in", "on", "at", "of", "with", "without", "by", "near", "next", "to", "behind",
             "under", "over", "above", "below", "beside", "between", "from", "for", "into",
             "onto", "against", "along", "across", "around", "inside", "outside", "who",
             "which", "that", "whose", "where", "wearing", "holding", "sitting", "standing",
             "looking", "facing", "and", "or", "but", "is", "are", "has", "having", "closer",
             "furthest", "nearer", "while", "partially", "not", "no"}
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def head_noun(expression: str) -> str:
    """A cheap head-noun guess for a referring expression (no parser, no model).

    The rule: lower-case and split into words; keep the words before the first "breaker"
    (preposition, relative pronoun, participle such as "wearing", or "and"), i.e. the head
    noun phrase; within it, drop determiners, colours and position/size/ordinal words; the
    head is the *last* remaining word (English noun phrases end with their head:
    "tall red shirt man" -> "man"). Examples: "man in red shirt on left" -> "man",
    "left white car" -> "car", "guy wearing a hat" -> "guy". If nothing remains (e.g.
    "left one" after "one" is dropped, or "on the left"), the last non-filler word of the
    whole expression is used, then the expression itself.
    """
    words = _WORD.findall(expression.lower())
    if not words:
        return expression.strip()
    prefix: list[str] = []
    for word in words:
        if word in _BREAKERS and prefix:
            break
        if word not in _BREAKERS:
            prefix.append(word)
    fillers = _DETERMINERS | _COLOURS | _POSITIONS
    content = [w for w in prefix if w not in fillers]
    if content:
        return content[-1]
    rest = [w for w in words if w not in fillers and w not in _BREAKERS]
    return rest[-1] if rest else expression.strip()


def referring_keyword(sentence: str, mode: KeywordMode = "sentence") -> str:
    """The keyword of a referring expression under ``mode`` (see :class:`ReferDataset`)."""
    if mode == "sentence":
        return sentence.strip()
    if mode == "head-noun":
        return head_noun(sentence)
    raise KeySegDataError(f"unknown keyword mode {mode!r}; valid: {', '.join(KEYWORD_MODES)}")


# --------------------------------------------------------------------------- dataset


@dataclass
class ReferReport:
    """What a :class:`ReferDataset` found and skipped."""

    name: str
    split: str
    images: int = 0
    refs: int = 0
    sentences: int = 0
    empty_sentences: int = 0  # blank sentences found (dropped, or kept with lisa_bugs)
    shared_split_refs: int = 0  # refs of a shared test split (testAB) taken into this one
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_examples: list[str] = field(default_factory=list)  # first few messages

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, message: str, count: int = 1) -> None:
        self.skipped[reason] += count
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(message)


class ReferDataset(Sequence[SegRecord]):
    """One split of refCOCO / refCOCO+ / refCOCOg as a sequence of per-image records.

    Args:
        root: dataset root holding ``refer_seg/``.
        name: ``refcoco``, ``refcoco+`` or ``refcocog``.
        split: ``train``, ``val``, ``testA``, ``testB`` or ``test`` (refCOCOg-umd has only
            train/val/test; refCOCO(+) unc have train/val/testA/testB).
        split_by: override the refs file (default from :data:`REFER_DATASETS`).
        keyword_mode: ``"sentence"`` (default) or ``"head-noun"``. The default is the
            reference behaviour (SPEC §1: for referring samples the expression itself is the
            keyword), so a model trained with the reference recipe sees the targets it was
            trained on; ``"head-noun"`` (:func:`head_noun`) gives short keywords closer to
            ReasonSeg's one/two-word ones, at the price of a heuristic that can pick the
            wrong word.
        allow_pickle: read ``refs(<splitBy>).p`` when no JSON exists (trusted files only).
        check_images: skip (and count) refs whose image file is missing.
        lisa_bugs: reproduce LISA's validation bugs (``keyseg eval --protocol lisa-bugs``):
            blank sentences are kept as queries, and the parts of a segmentation are added up
            (overlaps become 2) instead of united.

    Refs are selected as REFER selects them (:func:`in_refer_split`: a ``testAB`` ref is in
    testA and in testB). Sentences are stripped; blank ones are dropped (a ref left with none
    is skipped as ``no_sentence``) and counted. Records are built lazily: masks are decoded in
    ``__getitem__``; each record's ``meta["issues"]`` counts its blank sentences, shared-split
    refs and degenerate annotations (:func:`annotation_to_mask`), each annotation once per
    ref.
    """

    def __init__(
        self,
        root: str | Path,
        name: str = "refcoco",
        split: str = "train",
        split_by: str | None = None,
        keyword_mode: KeywordMode = "sentence",
        allow_pickle: bool = False,
        check_images: bool = True,
        lisa_bugs: bool = False,
    ) -> None:
        if name not in REFER_DATASETS and split_by is None:
            raise KeySegDataError(
                f"unknown REFER dataset {name!r}; known: {', '.join(REFER_DATASETS)} "
                "(or pass split_by)"
            )
        if split not in REFER_SPLITS:
            raise KeySegDataError(
                f"unknown REFER split {split!r}; valid splits: {', '.join(REFER_SPLITS)}"
            )
        if keyword_mode not in KEYWORD_MODES:
            raise KeySegDataError(
                f"unknown keyword mode {keyword_mode!r}; valid: {', '.join(KEYWORD_MODES)}"
            )
        self.root = Path(root)
        self.name = name
        self.split = split
        self.split_by = split_by or REFER_DATASETS[name]
        self.keyword_mode = keyword_mode
        self.lisa_bugs = lisa_bugs
        self.dataset_dir = self.root / "refer_seg" / name
        self.image_dir = self.root / IMAGE_SUBDIR
        self.report = ReferReport(name=name, split=split)

        refs = load_refs(self.dataset_dir, self.split_by, allow_pickle=allow_pickle)
        instances = self._load_instances()
        images = {img["id"]: img for img in instances.get("images", [])}
        anns = {ann["id"]: ann for ann in instances.get("annotations", [])}

        by_image: dict[Any, list[dict]] = defaultdict(list)
        exists: dict[Any, bool] = {}
        for ref in refs:
            if not in_refer_split(str(ref.get("split")), split):
                continue
            image_id = ref["image_id"]
            image = images.get(image_id)
            if image is None:
                self.report.skip("missing_image_entry",
                                 f"ref {ref['ref_id']}: image {image_id} not in instances.json")
                continue
            if ref["ann_id"] not in anns:
                self.report.skip("missing_annotation",
                                 f"ref {ref['ref_id']}: annotation {ref['ann_id']} not found")
                continue
            sentences = [s["sent"].strip() if isinstance(s.get("sent"), str) else ""
                         for s in ref.get("sentences", []) if isinstance(s, dict)]
            blank = sum(1 for s in sentences if not s)
            self.report.empty_sentences += blank
            if not lisa_bugs:
                sentences = [s for s in sentences if s]
            if not sentences:
                self.report.skip("no_sentence", f"ref {ref['ref_id']}: no sentence")
                continue
            if check_images:
                if image_id not in exists:
                    exists[image_id] = (self.image_dir / image["file_name"]).is_file()
                if not exists[image_id]:
                    self.report.skip("missing_image",
                                     f"ref {ref['ref_id']}: {self.image_dir / image['file_name']}"
                                     " not found")
                    continue
            shared = ref["split"] != split
            self.report.shared_split_refs += int(shared)
            by_image[image_id].append({"ref": ref, "sentences": sentences, "blank": blank,
                                       "shared": shared})

        self._images = images
        self._anns = anns
        self._index: list[tuple[Any, list[dict]]] = sorted(by_image.items(),
                                                           key=lambda item: str(item[0]))
        self.report.images = len(self._index)
        self.report.refs = sum(len(v) for _, v in self._index)
        self.report.sentences = sum(len(r["sentences"]) for _, v in self._index for r in v)

    def _load_instances(self) -> dict:
        path = self.dataset_dir / "instances.json"
        if not path.is_file():
            raise KeySegDataError(f"{path}: COCO instances file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise KeySegDataError(f"{path}: cannot read ({error})") from error
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise KeySegDataError(f"{path}: expected a COCO file with 'images' and 'annotations'")
        return data

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> SegRecord:  # type: ignore[override]
        """Record of image ``index``: one referent per sentence, masks ``(1, H, W)`` in {0, 1}
        (with ``lisa_bugs``: per-pixel part counts)."""
        image_id, entries = self._index[index]
        image = self._images[image_id]
        height, width = int(image["height"]), int(image["width"])
        referents: list[Referent] = []
        ref_ids: list[Any] = []
        issues: Counter = Counter()
        for entry in entries:
            ref = entry["ref"]
            ann = self._anns[ref["ann_id"]]
            issues["empty_sentences"] += entry["blank"]
            issues["shared_split_refs"] += int(entry["shared"])
            try:
                mask = annotation_to_mask(ann.get("segmentation"), height, width,
                                          sum_parts=self.lisa_bugs, issues=issues)[None]
            except KeySegDataError as error:
                raise KeySegDataError(
                    f"{self.dataset_dir / 'instances.json'}: annotation {ref['ann_id']} "
                    f"(ref {ref['ref_id']}): {error}"
                ) from error
            for sentence in entry["sentences"]:
                referents.append(Referent(
                    text=sentence, is_sentence=False, masks=mask,
                    keyword=referring_keyword(sentence, self.keyword_mode),
                ))
                ref_ids.append(ref["ref_id"])
        return SegRecord(
            sample_id=f"{self.name}/{image_id}", source=self.name, referents=referents,
            image_path=self.image_dir / image["file_name"],
            meta={"image_id": image_id, "ref_ids": ref_ids, "split": self.split,
                  "issues": {k: int(v) for k, v in issues.items() if v}},
        )

    def __iter__(self) -> Iterator[SegRecord]:
        """Every record; an image whose annotation fails to decode is counted and skipped."""
        for index in range(len(self)):
            try:
                yield self[index]
            except KeySegDataError as error:
                self.report.skip("bad_annotation", str(error))


def refer_status(root: str | Path) -> dict[str, dict[str, bool]]:
    """For ``keyseg data check``: which REFER files exist under ``root``."""
    root = Path(root)
    status: dict[str, dict[str, bool]] = {}
    for name, split_by in REFER_DATASETS.items():
        folder = root / "refer_seg" / name
        status[name] = {
            "instances.json": (folder / "instances.json").is_file(),
            f"refs({split_by}).json": refs_path(folder, split_by).is_file(),
            f"refs({split_by}).p": refs_path(folder, split_by, ".p").is_file(),
        }
    return status


__all__ = [
    "KEYWORD_MODES",
    "REFER_DATASETS",
    "REFER_SPLITS",
    "ReferDataset",
    "ReferReport",
    "annotation_to_mask",
    "convert_refs_pickle_to_json",
    "head_noun",
    "in_refer_split",
    "load_refs",
    "referring_keyword",
    "refs_path",
]
