"""Datasets named in a :class:`~keyseg.config.DataConfig`, built for training and validation.

Training data is a :class:`~keyseg.data.mixture.MixtureSampler` over the datasets in
``DataConfig.datasets`` (a list of names, rates from ``sample_rates``):

===============  =============================================================================
name             what it reads
===============  =============================================================================
``reason_seg``   ReasonSeg ``reason_seg_split`` (+ keyword file, explanations) under
                 ``dataset_dir``
``refer_seg``    the REFER datasets of ``refer_seg_data`` (``[refcoco, refcoco+, refcocog]``),
                 train split, concatenated
``shapes``       the procedural shapes world (``DataConfig.shapes`` options), no files needed
``shapes_qa``    its images with text-only visual-QA turns (``shapes.qa_types``): the lab's
                 share of the reference's VQA data
===============  =============================================================================

Validation is ``DataConfig.val_dataset``: ``"NAME:SPLIT"`` with NAME one of ``reason_seg``,
``shapes``, ``refcoco``, ``refcoco+``, ``refcocog``; ``""`` or ``"none"`` disables it.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from pathlib import Path

from keyseg.config import DATASET_NAMES, VAL_NAMES, DataConfig
from keyseg.data.mixture import MixtureSampler
from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegConfigError


class ConcatRecords(Sequence[SegRecord]):
    """Several record sequences seen as one (index ``i`` walks them in order)."""

    def __init__(self, parts: Sequence[Sequence[SegRecord]]) -> None:
        self.parts = list(parts)
        self._ends: list[int] = []
        total = 0
        for part in self.parts:
            total += len(part)
            self._ends.append(total)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> SegRecord:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range (size {len(self)})")
        part = bisect.bisect_right(self._ends, index)
        start = self._ends[part - 1] if part else 0
        return self.parts[part][index - start]


def shapes_config(cfg: DataConfig):
    """The :class:`keyseg.config.ShapesConfig` of the shapes world (``cfg.shapes``)."""
    return cfg.shapes


def _keyword_file(cfg: DataConfig) -> Path | bool | None:
    """What the ReasonSeg reader gets: ``False`` (no keywords) for ``keyword_file: null``,
    ``None`` (the reader searches its usual places) for ``"auto"`` or a configured file that
    is absent (with a warning), else the configured path (relative to ``dataset_dir``)."""
    if cfg.keyword_file is None:
        return False
    if cfg.keyword_file == "auto":
        return None
    path = Path(cfg.keyword_file)
    if not path.is_absolute():
        path = Path(cfg.dataset_dir) / path
    if path.is_file():
        return path
    warnings.warn(f"data.keyword_file {path} not found; searching the usual places",
                  stacklevel=3)
    return None


def build_dataset(name: str, cfg: DataConfig, split: str = "train",
                  lisa_bugs: bool = False) -> Sequence[SegRecord]:
    """One named dataset (see the module table) as a sequence of records.

    ``lisa_bugs`` makes the ReasonSeg and REFER readers reproduce LISA's validation bugs
    (``keyseg eval --protocol lisa-bugs``, docs/EVALUATION.md); never used for training.
    """
    if name == "shapes":
        from keyseg.data.shapes import ShapesDataset

        return ShapesDataset(split, shapes_config(cfg))
    if name == "shapes_qa":
        from keyseg.data.shapes import ShapesQADataset

        return ShapesQADataset(split, shapes_config(cfg))
    if name == "reason_seg":
        from keyseg.data.reason_seg import ReasonSegDataset

        return ReasonSegDataset(cfg.dataset_dir, split=split, keyword_file=_keyword_file(cfg),
                                lisa_bugs=lisa_bugs)
    if name in ("refer_seg", "refcoco", "refcoco+", "refcocog"):
        from keyseg.data.refer import ReferDataset

        names = cfg.refer_seg_data if name == "refer_seg" else [name]
        parts = [ReferDataset(cfg.dataset_dir, name=n, split=split,
                              keyword_mode=cfg.refer_keyword, lisa_bugs=lisa_bugs)
                 for n in names]
        return parts[0] if len(parts) == 1 else ConcatRecords(parts)
    raise KeySegConfigError(
        f"data.datasets: unknown dataset {name!r} (known: {', '.join(DATASET_NAMES)})"
    )


def build_mixture(cfg: DataConfig, seed: int) -> MixtureSampler:
    """The training mixture of ``cfg.datasets`` with ``cfg.sample_rates``."""
    names = list(cfg.datasets)  # checked by DataConfig: known, unique, one rate each
    datasets = {name: build_dataset(name, cfg, cfg.reason_seg_split if name == "reason_seg"
                                    else "train") for name in names}
    weights = dict(zip(names, cfg.sample_rates, strict=True))
    return MixtureSampler(datasets, weights, seed=seed,
                          max_referents=cfg.max_referents_per_image)


def build_val_records(cfg: DataConfig) -> Sequence[SegRecord] | None:
    """The validation records named by ``cfg.val_dataset`` (``None`` when disabled)."""
    spec = cfg.val_dataset.strip()
    if spec.lower() in ("", "none"):
        return None
    name, _, split = spec.partition(":")
    name, split = name.strip(), (split.strip() or "val")
    if name not in VAL_NAMES:
        raise KeySegConfigError(
            f"data.val_dataset: {spec!r}: unknown dataset {name!r} "
            f"(expected NAME:SPLIT with NAME in {', '.join(VAL_NAMES)})"
        )
    return build_dataset(name, cfg, split)
