"""What the readers accept: totals printed at the start of training and evaluation, and the
deep check behind ``keyseg data check --deep``.

:func:`totals_lines` turns a reader (or a training mixture of readers) into one line per
split, ``"reason_seg:val: 200 samples, 3 skipped (2 bad_json, 1 missing_file)"``, from the
reader's own scan report; ``keyseg train``, ``keyseg eval`` and ``keyseg data check``
print the same lines for the same folder.

:func:`deep_check` reads every annotation and image of the chosen splits through the real
readers (:class:`~keyseg.data.reason_seg.ReasonSegDataset`,
:class:`~keyseg.data.refer.ReferDataset`, :func:`~keyseg.data.keywords.validate_keyword_file`)
plus a full decode of every image (:func:`~keyseg.data.images.load_image`), and collects each
rejected file with the reader's reason. Nothing here re-implements a reader's rules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyseg.errors import KeySegDataError

#: Datasets :func:`deep_check` knows, with their splits (REFER's spelling).
CHECK_SPLITS: dict[str, tuple[str, ...]] = {
    "reason_seg": ("train", "val", "test"),
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
}


# --------------------------------------------------------------------------- totals


def _skip_text(skipped: Counter) -> str:
    total = sum(skipped.values())
    if not total:
        return "0 skipped"
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    return f"{total} skipped ({reasons})"


def totals_lines(records: Any) -> list[str]:
    """One line per split of ``records``: a ReasonSeg or REFER reader, the shapes world, a
    concatenation of readers, or a training mixture (one line per dataset it draws from).

    The numbers come from the reader's scan report, so they are known before any sample
    is loaded; samples that fail later (a truncated image) are counted where they fail.
    """
    from keyseg.data.datasets import ConcatRecords
    from keyseg.data.mixture import MixtureSampler
    from keyseg.data.reason_seg import ReasonSegReport
    from keyseg.data.refer import ReferReport
    from keyseg.data.shapes import ShapesDataset, ShapesQADataset

    if isinstance(records, MixtureSampler):
        return [line for name in records.names for line in totals_lines(records.datasets[name])]
    if isinstance(records, ConcatRecords):
        return [line for part in records.parts for line in totals_lines(part)]
    report = getattr(records, "report", None)
    if isinstance(report, ReasonSegReport):
        return [f"reason_seg:{report.split}: {report.samples} samples, "
                f"{_skip_text(report.skipped)}"]
    if isinstance(report, ReferReport):
        return [f"{report.name}:{report.split}: {report.images} images, {report.refs} refs, "
                f"{report.sentences} sentences, {_skip_text(report.skipped)}"]
    if isinstance(records, ShapesDataset):
        return [f"shapes:{records.split}: {len(records)} records (procedural, no files)"]
    if isinstance(records, ShapesQADataset):
        return [f"shapes_qa:{records.images.split}: {len(records)} records of visual QA "
                f"({', '.join(records.config.qa_types)}; procedural, no files)"]
    return [f"{type(records).__name__}: {len(records)} records"]


# --------------------------------------------------------------------------- deep check


@dataclass
class DeepCheckReport:
    """What :func:`deep_check` found.

    Attributes:
        root: the dataset root.
        totals: the reader totals of each split (:func:`totals_lines`), or why the reader
            could not open it.
        bad: ``(file, reason)`` per rejected file, each once, in the order found.
        warnings: things the readers tolerate but a user may want to know.
        files_read: annotation, refs, instances, keyword and image files read.
        splits: the ``NAME:SPLIT`` checked.
    """

    root: Path
    totals: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files_read: int = 0
    splits: list[str] = field(default_factory=list)
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _images: dict[str, str | None] = field(default_factory=dict, repr=False)
    _pickles: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.bad

    def reject(self, file: str | Path, reason: str) -> None:
        """Record a bad file (once per file and reason)."""
        key = (str(file), reason)
        if key not in self._seen:
            self._seen.add(key)
            self.bad.append(key)

    def check_image(self, path: Path) -> bool:
        """Decode ``path`` fully (once per path across splits); False when it is bad."""
        from keyseg.data.images import load_image

        key = str(path)
        if key not in self._images:
            self.files_read += 1
            try:
                load_image(path).close()
                self._images[key] = None
            except KeySegDataError as error:
                self._images[key] = str(error)
        if self._images[key] is not None:
            self.reject(path, self._images[key])
            return False
        return True

    def lines(self) -> list[str]:
        """The printed report: totals, bad files with reasons, warnings, a summary line."""
        out = [f"deep check of {self.root} ({', '.join(self.splits) or 'no split found'})"]
        out += [f"  {line}" for line in self.totals]
        if self.bad:
            out.append(f"bad files ({len(self.bad)}):")
            out += [f"  {_named(file, reason)}" for file, reason in self.bad]
        if self.warnings:
            out.append(f"warnings ({len(self.warnings)}):")
            out += [f"  {w}" for w in self.warnings]
        out.append(f"totals: {self.files_read} files read, {len(self.bad)} bad"
                   + ("" if self.bad else ": OK"))
        return out


def _file_of(message: str, default: str) -> str:
    """The file a reader's message names (messages start ``"PATH: ..."``)."""
    return message.split(": ", 1)[0] if ": " in message else default


def _named(file: str, reason: str) -> str:
    """``reason`` prefixed with its file unless the reason already names it."""
    return reason if reason.startswith(file) else f"{file}: {reason}"


def parse_check_splits(values: Sequence[str] | None, root: str | Path) -> list[tuple[str, str]]:
    """``(name, split)`` pairs to check: ``NAME:SPLIT`` or a bare split name (every dataset
    that has it); default every split of every dataset whose folder exists under ``root``.

    Raises:
        KeySegDataError: an unknown dataset or split (the message lists the valid ones).
    """
    root = Path(root)
    present = {
        name: (root / "reason_seg" / "ReasonSeg").is_dir() if name == "reason_seg"
        else (root / "refer_seg" / name).is_dir()
        for name in CHECK_SPLITS
    }
    if not values:
        pairs = []
        for name, splits in CHECK_SPLITS.items():
            if name == "reason_seg":
                pairs += [(name, s) for s in splits
                          if (root / "reason_seg" / "ReasonSeg" / s).is_dir()]
            elif present[name]:
                pairs += [(name, s) for s in splits]
        return pairs
    pairs: list[tuple[str, str]] = []
    for value in values:
        name, sep, split = value.strip().partition(":")
        if sep:
            name = name.strip().lower()
            if name not in CHECK_SPLITS or split not in CHECK_SPLITS[name]:
                valid = "; ".join(f"{n}: {', '.join(s)}" for n, s in CHECK_SPLITS.items())
                raise KeySegDataError(f"--split {value!r}: unknown dataset or split ({valid})")
            pairs.append((name, split))
            continue
        matched = [(n, value) for n, splits in CHECK_SPLITS.items()
                   if value in splits and present[n]]
        if not any(value in splits for splits in CHECK_SPLITS.values()):
            raise KeySegDataError(
                f"--split {value!r}: no dataset has this split (use NAME:SPLIT or one of "
                f"{', '.join(sorted({s for v in CHECK_SPLITS.values() for s in v}))})"
            )
        pairs += matched
    return list(dict.fromkeys(pairs))


def deep_check(root: str | Path, splits: Sequence[tuple[str, str]] | None = None,
               progress: bool = True) -> DeepCheckReport:
    """Read every annotation and image of ``splits`` (default: every split present) and the
    keyword file; collect each file a reader rejects, with its reason.

    The readers are built as training and evaluation build them
    (:func:`keyseg.data.datasets.build_dataset` with the default data config: keyword file
    looked up in its usual places, REFER refs from JSON only), so their totals are the
    lines ``keyseg train`` / ``keyseg eval`` print.
    """
    root = Path(root)
    report = DeepCheckReport(root=root)
    pairs = list(splits) if splits is not None else parse_check_splits(None, root)
    report.splits = [f"{n}:{s}" for n, s in pairs]
    _check_keyword_file(root, report)
    for name, split in pairs:
        if name == "reason_seg":
            _check_reason_seg(root, split, report, progress)
        else:
            _check_refer(root, name, split, report, progress)
    return report


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, leave=False,
                dynamic_ncols=True)


def _open_reader(build: Callable[[], Any], label: str, report: DeepCheckReport) -> Any:
    """``build()``, or None after recording why the reader refused the split."""
    try:
        reader = build()
    except KeySegDataError as error:
        message = str(error)
        file = _file_of(message, label)
        report.totals.append(f"{label}: the reader refuses the split ({file}: see below)")
        report.reject(file, message)
        return None
    return reader


def _check_keyword_file(root: Path, report: DeepCheckReport) -> None:
    from keyseg.data.keywords import validate_keyword_file
    from keyseg.data.reason_seg import REASON_SEG_SPLITS, find_keyword_file

    path = find_keyword_file(root)
    if path is None:
        return
    report.files_read += 1
    try:
        found = validate_keyword_file(path)
    except KeySegDataError as error:
        report.reject(path, str(error))
        return
    report.totals.append(found.summary_lines()[0])
    for index in found.empty:
        report.reject(path, f"{path}: entry {index} has an empty keyword")
    folders = [root / "reason_seg" / "ReasonSeg" / s for s in REASON_SEG_SPLITS]
    from keyseg.data.keywords import load_keyword_file

    for index, entry in enumerate(load_keyword_file(path)):
        if not any((folder / Path(entry.image).name).is_file() for folder in folders):
            report.reject(path, f"{path}: entry {index}: image {entry.image} is in no "
                                "reason_seg/ReasonSeg/{train,val,test} folder")
    for index, image, keyword in found.not_phrase:
        report.warnings.append(f"{path}: entry {index} ({image}): keyword {keyword!r} is not a "
                               "phrase of its query/outputs")


def _check_reason_seg(root: Path, split: str, report: DeepCheckReport, progress: bool) -> None:
    from keyseg.config import DataConfig
    from keyseg.data.datasets import build_dataset
    from keyseg.data.reason_seg import ReasonSegDataset

    label = f"reason_seg:{split}"
    cfg = DataConfig(dataset_dir=str(root))
    reader = _open_reader(lambda: build_dataset("reason_seg", cfg, split), label, report)
    if reader is None:  # e.g. a broken keyword file: check the split itself without it
        reader = _open_reader(lambda: ReasonSegDataset(root, split, keyword_file=False,
                                                       explanatory_file=False), label, report)
        if reader is None:
            return
        report.totals.append(f"{totals_lines(reader)[0]} (without the keyword/explanatory "
                             "file)")
    else:
        report.totals.extend(totals_lines(reader))
    for file, message in reader.report.skipped_files:
        report.reject(_file_of(message, file), message)  # the file the message names
    report.files_read += len(reader.report.skipped_files)
    bar = _progress(len(reader), label, progress)
    for index in range(len(reader)):
        report.files_read += 1  # the JSON (its image is counted by check_image)
        try:
            record = reader[index]
        except KeySegDataError as error:
            report.reject(_file_of(str(error), label), str(error))
        else:
            report.check_image(Path(record.image_path))
        bar.update(1)
    bar.close()
    raster = reader.report.raster
    if raster.skipped_shapes:
        report.warnings.append(f"{label}: {raster.skipped_shapes} malformed shape(s) not drawn "
                               "(see RasterStats)")


def _check_refer(root: Path, name: str, split: str, report: DeepCheckReport,
                 progress: bool) -> None:
    from keyseg.config import DataConfig
    from keyseg.data.datasets import build_dataset
    from keyseg.data.refer import REFER_DATASETS, ReferDataset, load_refs, refs_path

    label = f"{name}:{split}"
    folder = root / "refer_seg" / name
    split_by = REFER_DATASETS[name]
    cfg = DataConfig(dataset_dir=str(root))
    # What training and evaluation see (JSON refs only, refs with missing images skipped).
    trained = _open_reader(lambda: build_dataset(name, cfg, split), label, report)
    if trained is None:
        pickle_path = refs_path(folder, split_by, ".p")
        if refs_path(folder, split_by).is_file() or not pickle_path.is_file():
            return
        # Only the pickle: read it (once) with the plain-data unpickler to say whether
        # converting it will work, then check the rest as if it were converted.
        if str(pickle_path) not in report._pickles:
            report.files_read += 1
            try:
                load_refs(folder, split_by, allow_pickle=True)
                report._pickles[str(pickle_path)] = None
            except KeySegDataError as error:
                report._pickles[str(pickle_path)] = str(error)
        if report._pickles[str(pickle_path)] is not None:
            report.reject(pickle_path, report._pickles[str(pickle_path)])
            return
    report.files_read += 2  # refs + instances.json
    # Every image, the missing ones included, and every annotation of the split.
    deep = _open_reader(lambda: ReferDataset(root, name=name, split=split,
                                             keyword_mode=cfg.refer_keyword,
                                             allow_pickle=True, check_images=False),
                        label, report)
    if deep is None:
        return
    if trained is not None:
        report.totals.extend(totals_lines(trained))
    for reason, count in sorted(deep.report.skipped.items()):
        report.warnings.append(f"{label}: {count} ref(s) skipped by the reader ({reason})")
    bar = _progress(len(deep), label, progress)
    for index in range(len(deep)):
        try:
            record = deep[index]
        except KeySegDataError as error:
            report.reject(folder / "instances.json", str(error))
            bar.update(1)
            continue
        report.check_image(Path(record.image_path))
        bar.update(1)
    bar.close()


__all__ = [
    "CHECK_SPLITS",
    "DeepCheckReport",
    "deep_check",
    "parse_check_splits",
    "totals_lines",
]
