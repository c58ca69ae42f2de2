"""How much one recipe's lab numbers move with the training seed, from `lab_report.py` records.

    python experiments/seed_spread.py s0=experiments/results/lab_report_a.json \\
        s1=runs/lab_report_s1.json s2=runs/lab_report_s2.json [--out spread.json]

Each argument is ``LABEL=PATH`` of one seed's ``lab_report.py --out`` record. Prints one
markdown row per seed (per-sample gIoU overall and per difficulty, negatives answered,
positives denied, the share of multi-target answers whose masks are distinct, the
ReasonSeg-format export gap) and then the mean, the sample standard deviation and the range
over the seeds. The spread is what a single-seed comparison of two recipes has to beat
before it says anything about the recipes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from keyseg.io import atomic_write_json

DIFFICULTIES = ("direct", "attribute", "relational", "indirect", "multi", "negative")
COLUMNS = ("giou", *DIFFICULTIES, "negatives_answered", "positives_denied",
           "multi_share_distinct", "export_gap")


def seed_metrics(record: dict) -> dict[str, float | None]:
    """The columns of one seed's lab report record (``None`` where the record lacks one)."""
    native = record["native"]
    by_difficulty = native.get("by_difficulty", {})
    metrics: dict[str, float | None] = {"giou": native["giou"]}
    for difficulty in DIFFICULTIES:
        metrics[difficulty] = by_difficulty.get(difficulty, {}).get("giou")
    for key in ("negatives_answered", "positives_denied", "multi_share_distinct"):
        metrics[key] = native.get(key)
    export = record.get("export")
    metrics["export_gap"] = None if not export else abs(export["giou"] - native["giou"])
    return metrics


def spread(per_seed: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation (0 for one seed) and range of each column over the
    seeds that have it; columns no seed has are left out."""
    summary = {}
    for column in COLUMNS:
        values = [m[column] for m in per_seed.values() if m.get(column) is not None]
        if not values:
            continue
        summary[column] = {"mean": statistics.fmean(values),
                           "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "min": min(values), "max": max(values), "n": len(values)}
    return summary


def markdown(per_seed: dict[str, dict[str, float | None]],
             summary: dict[str, dict[str, float]]) -> str:
    """The table: one row per seed, then mean, sd and max - min."""
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| seed | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for label, metrics in per_seed.items():
        lines.append(f"| {label} | " + " | ".join(cell(metrics[c]) for c in COLUMNS) + " |")
    for name, of in (("mean", lambda s: s["mean"]), ("sd", lambda s: s["sd"]),
                     ("max - min", lambda s: s["max"] - s["min"])):
        lines.append(f"| {name} | " + " | ".join(
            cell(of(summary[c])) if c in summary else "–" for c in COLUMNS) + " |")
    return "\n".join(lines)


def parse_labelled(argument: str) -> tuple[str, Path]:
    """``LABEL=PATH`` -> (label, path), with one clear error for anything else."""
    label, sep, path = argument.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{argument!r}: expected LABEL=PATH")
    return label, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", type=parse_labelled,
                        help="LABEL=PATH of a lab_report.py --out record, one per seed")
    parser.add_argument("--out", type=Path, default=None, help="write the spread JSON here")
    args = parser.parse_args()
    per_seed = {}
    for label, path in args.records:
        try:
            per_seed[label] = seed_metrics(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, KeyError) as error:
            raise SystemExit(f"{path}: not a lab_report.py record ({error})") from None
    summary = spread(per_seed)
    print(markdown(per_seed, summary))
    if args.out is not None:
        atomic_write_json(args.out, {"seeds": per_seed, "spread": summary})


if __name__ == "__main__":
    main()
