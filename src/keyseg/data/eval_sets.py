"""Evaluation split specs (``"reason_seg:val"``, ``"refcoco+:testB"``, ...) to records.

A spec is ``NAME:SPLIT``:

============  =========================  ==================================================
NAME          splits                     reader
============  =========================  ==================================================
reason_seg    train, val, test           :class:`~keyseg.data.reason_seg.ReasonSegDataset`
refcoco       train, val, testA, testB   :class:`~keyseg.data.refer.ReferDataset` (unc)
refcoco+      train, val, testA, testB   :class:`~keyseg.data.refer.ReferDataset` (unc)
refcocog      train, val, test           :class:`~keyseg.data.refer.ReferDataset` (umd)
shapes        train, val, test           :class:`~keyseg.data.shapes.ShapesDataset`
============  =========================  ==================================================

Split names are REFER's own (case-sensitive ``testA``/``testB``). The readers are lazy
sequences, so resolving a spec does not load the split into memory; bad samples found while
scanning are counted in the reader's report (:attr:`EvalSet.reader_report`).

Protocols (:data:`PROTOCOLS`, ``keyseg eval --protocol``): ``lisa`` (default) feeds LISA's
validation inputs with LISA's bugs fixed; ``lisa-bugs`` also reproduces those bugs (blank
queries used, a bare-string ``text`` indexed by character, overlapping polygon parts summed
to 2 and then dropped from the target by LISA's metric). docs/EVALUATION.md lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from keyseg.config import EvalProtocol
from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegConfigError

#: ``keyseg eval --protocol`` values: LISA's validation inputs, without / with LISA's bugs.
PROTOCOLS: tuple[str, ...] = get_args(EvalProtocol)

#: dataset name -> splits it has (REFER's splitBy decides refcocog's).
EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "reason_seg": ("train", "val", "test"),
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
    "shapes": ("train", "val", "test"),
}


@dataclass
class EvalSet:
    """A resolved split.

    Attributes:
        name: dataset name (``reason_seg``, ``refcoco``, ...).
        split: split name as the dataset spells it.
        records: a lazy sequence of records (``records[i]`` may raise
            :class:`~keyseg.errors.KeySegDataError` for a sample gone bad; callers skip it).
        reader_report: the reader's scan report (``None`` for the procedural set).
    """

    name: str
    split: str
    records: Sequence[SegRecord]
    reader_report: Any = None
    protocol: str = "lisa"

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.split}"

    def reader_skipped(self) -> int:
        """Samples the reader left out while scanning (0 when it has no report)."""
        return int(getattr(self.reader_report, "skipped_total", 0) or 0)

    def reader_counts(self) -> dict[str, Any]:
        """What the reader dropped or changed while scanning the whole split: ``skipped``
        (reason -> samples or refs left out) and, for REFER, ``empty_sentences`` (blank
        sentences: dropped, or kept under ``lisa-bugs``) and ``shared_split_refs`` (refs of a
        shared test split such as ``testAB`` taken in, as REFER does)."""
        report = self.reader_report
        if report is None:
            return {}
        counts: dict[str, Any] = {"skipped": {k: int(v) for k, v in
                                              sorted(getattr(report, "skipped", {}).items())}}
        for name in ("empty_sentences", "shared_split_refs"):
            if hasattr(report, name):
                counts[name] = int(getattr(report, name))
        return counts


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`, else a :class:`KeySegConfigError`."""
    if protocol not in PROTOCOLS:
        raise KeySegConfigError(
            f"evaluation protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    return protocol


def parse_spec(spec: str) -> tuple[str, str]:
    """``"refcoco+:testA"`` -> ``("refcoco+", "testA")``, validated against :data:`EVAL_SPLITS`.

    Raises:
        KeySegConfigError: malformed spec, unknown dataset or split (the message lists the
            valid ones).
    """
    name, sep, split = spec.strip().partition(":")
    name = name.strip().lower()
    split = split.strip()
    if not sep or not name or not split:
        raise KeySegConfigError(
            f"dataset spec {spec!r}: expected NAME:SPLIT, e.g. reason_seg:val or refcoco:testA"
        )
    if name not in EVAL_SPLITS:
        raise KeySegConfigError(
            f"dataset spec {spec!r}: unknown dataset {name!r}; known: {', '.join(EVAL_SPLITS)}"
        )
    if split not in EVAL_SPLITS[name]:
        raise KeySegConfigError(
            f"dataset spec {spec!r}: {name} has no split {split!r}; valid: "
            f"{', '.join(EVAL_SPLITS[name])}"
        )
    return name, split


def resolve_eval_set(spec: str, dataset_dir: str | Path | None = None,
                     data_config: Any | None = None, protocol: str = "lisa") -> EvalSet:
    """Resolve ``NAME:SPLIT`` to an :class:`EvalSet`.

    The readers are built by :func:`keyseg.data.datasets.build_dataset` (the training code's
    builder), so evaluation reads a dataset exactly as validation during training does
    (keyword file, REFER keyword mode, shapes world settings from ``data_config``).

    Args:
        spec: e.g. ``"reason_seg:val"``, ``"refcocog:test"``, ``"shapes:test"``.
        dataset_dir: dataset root (the ``--dataset-dir``: holds ``reason_seg/`` and
            ``refer_seg/``); overrides ``data_config.dataset_dir``; not needed for ``shapes``.
        data_config: a :class:`keyseg.config.DataConfig` (default: the reference one).
        protocol: one of :data:`PROTOCOLS`; ``lisa-bugs`` builds readers that reproduce
            LISA's validation bugs (the shapes world is the same under both).

    Raises:
        KeySegConfigError: bad spec.
        KeySegDataError: the reader cannot open the split (folder or files missing).
    """
    from dataclasses import replace

    from keyseg.config import DataConfig
    from keyseg.data.datasets import build_dataset

    name, split = parse_spec(spec)
    check_protocol(protocol)
    cfg = data_config if data_config is not None else DataConfig()
    if dataset_dir is not None:
        cfg = replace(cfg, dataset_dir=str(dataset_dir))
    records = build_dataset(name, cfg, split, lisa_bugs=protocol == "lisa-bugs")
    return EvalSet(name, split, records, getattr(records, "report", None), protocol)


__all__ = ["EVAL_SPLITS", "PROTOCOLS", "EvalSet", "check_protocol", "parse_spec",
           "resolve_eval_set"]
