"""What an evaluation returns, and how it is reported: one line of metrics, one of data."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from keyseg.evaluate.overlays import OverlayCandidate
from keyseg.metrics import SegMetrics


@dataclass
class EvalResult:
    """What :func:`~keyseg.evaluate.run_evaluation` returns (identical on every process
    after reduction).

    Attributes:
        metrics: ``giou``, ``ciou``, ``n`` (masks scored) and the counts ``samples``
            (conversations scored), ``records`` (records evaluated), ``skipped`` (records that
            failed to load: their queries are not scored), ``no_seg`` / ``fewer_seg`` /
            ``extra_seg`` (generated answers with no / too few / too many ``[SEG]``),
            ``intersection`` / ``union`` / ``sum_iou`` (the exact totals), and
            ``by_difficulty`` ``{label: {giou, ciou, n}}`` when records carry
            ``Referent.difficulty``; in ``generate`` mode, when referents have keywords,
            ``keyword_accuracy`` (decoded ``[KEY]`` keyword equals the referent's, up to case
            and white space) over ``keyword_scored`` conversations; ``issues``: the evaluated
            records' ``meta["issues"]`` summed (dropped or degenerate annotations, by name).
        per_sample: the JSONL lines as dicts when ``keep_per_sample`` (this process only).
        skipped_messages: the first error messages of skipped records.
        overlays: ``worst`` and ``best`` :class:`OverlayCandidate` lists (``keep_overlays``).
        wall_time: seconds.
        resumed_rows: rows read back from disk instead of scored (``resume``; all processes).
    """

    metrics: dict[str, Any]
    per_sample: list[dict] | None = None
    skipped_messages: list[str] = field(default_factory=list)
    overlays: dict[str, list[OverlayCandidate]] = field(default_factory=dict)
    wall_time: float = 0.0
    resumed_rows: int = 0


def recompute_from_jsonl(path: str | os.PathLike) -> dict[str, float | int]:
    """gIoU / cIoU recomputed from a per-sample JSONL (checks a report's numbers)."""
    metrics = SegMetrics()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                metrics.update_counts(row["I"], row["U"])
    return metrics.compute()


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line: ``gIoU 0.4123  cIoU 0.3981  (n=200 masks, 200 samples, 0 skipped, 3 no [SEG])``,
    plus ``keyword acc 0.812`` when the metrics have it (generate mode)."""
    giou, ciou = metrics.get("giou", math.nan), metrics.get("ciou", math.nan)
    line = (f"gIoU {giou:.4f}  cIoU {ciou:.4f}  (n={metrics.get('n', 0)} masks, "
            f"{metrics.get('samples', 0)} samples, {metrics.get('skipped', 0)} skipped, "
            f"{metrics.get('no_seg', 0)} no [SEG])")
    if "keyword_accuracy" in metrics:
        line += f"  keyword acc {metrics['keyword_accuracy']:.3f}"
    return line


def format_issues(issues: dict[str, int], reader: dict[str, Any] | None = None) -> str:
    """One line of data counts, e.g. ``data: 1 empty_sentences, 1 degenerate_polygons;
    reader skipped 2 (no_sentence 2)``; ``""`` when there is nothing to report."""
    parts = [", ".join(f"{v} {k}" for k, v in issues.items() if v)]
    skipped = (reader or {}).get("skipped", {})
    if skipped:
        parts.append(f"reader skipped {sum(skipped.values())} ("
                     + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")")
    parts = [p for p in parts if p]
    return "data: " + "; ".join(parts) if parts else ""
