"""Paired bootstrap confidence intervals for the difference of two arms' gIoU / cIoU.

An *arm* is one training recipe scored with several seeds; each seed's run gives one
compact row per test sample (:func:`compact_row`). The difference ``arm a - arm b`` of a
metric is the mean over ``a``'s seeds minus the mean over ``b``'s seeds, each seed's metric
being a ratio of sums over the test samples (gIoU: summed per-mask IoU over masks, exactly
as the evaluation reports it; cIoU: summed intersections over summed unions).

What is resampled: the *test samples*, with replacement, and the same draw for both arms
(and for every seed): the two arms saw the same samples, and an easy sample is easy for
both, so pairing cancels the sample-to-sample spread that does not tell the arms apart and
gives a much tighter interval than two independent ones. The interval is then conditional
on the trained seeds; ``resample_seeds=True`` also draws each arm's seeds with replacement
(independently per arm: seed ``k`` of one recipe is not paired with seed ``k`` of another),
which adds the training spread. The interval is the percentile interval of the replicates;
the point estimate is the difference on the data as observed.

Pure numpy; 10,000 replicates over a few hundred samples take a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: cIoU's guard against an empty union (keyseg.metrics.CIOU_EPS).
CIOU_EPS = 1e-10
METRICS = ("giou", "ciou")


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """What the bootstrap needs of one evaluation row (``EvalResult.per_sample``): the
    sample id, its difficulty, its mean per-mask IoU ``iou`` over its ``masks`` masks, and
    its summed intersection ``I`` and union ``U`` (cIoU)."""
    return {"id": row["id"], "difficulty": row.get("difficulty"), "iou": float(row["iou"]),
            "masks": len(row["I"]), "I": int(sum(row["I"])), "U": int(sum(row["U"]))}


@dataclass(frozen=True)
class Difference:
    """``arm a - arm b``: the observed difference, its percentile interval, the number of
    test samples resampled and of replicates drawn."""

    mean: float
    low: float
    high: float
    samples: int
    replicates: int

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly on one side of 0."""
        return self.low > 0 or self.high < 0


def sample_ids(runs_a: Sequence[Sequence[dict]], runs_b: Sequence[Sequence[dict]],
               difficulty: str | None = None) -> list[str]:
    """The test samples two arms share, sorted (optionally only those of ``difficulty``).

    Raises:
        ValueError: an arm without runs, a run holding a sample id twice, a run whose samples
            are not those of the first run of ``a``, or a sample whose difficulty differs
            between runs (the message names the run and a few ids).
    """
    runs = [("a", k, run) for k, run in enumerate(runs_a)] + [
        ("b", k, run) for k, run in enumerate(runs_b)]
    if not runs_a or not runs_b:
        raise ValueError("paired bootstrap: each arm needs at least one run")
    reference: dict[str, Any] | None = None
    for arm, k, run in runs:
        labels = {row["id"]: row.get("difficulty") for row in run}
        if len(labels) != len(run):
            raise ValueError(f"paired bootstrap: run {k} of arm {arm} holds a sample twice")
        if reference is None:
            reference = labels
            continue
        missing, extra = sorted(set(reference) - set(labels)), sorted(set(labels) - set(reference))
        if missing or extra:
            raise ValueError(
                f"paired bootstrap: run {k} of arm {arm} was not scored on the samples of run 0 "
                f"of arm a: {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} extra "
                f"(e.g. {extra[:3]}); score every run on the same test split and limit")
        changed = sorted(i for i in labels if labels[i] != reference[i])
        if changed:
            raise ValueError(f"paired bootstrap: run {k} of arm {arm} gives other difficulties "
                             f"to {len(changed)} samples (e.g. {changed[:3]})")
    assert reference is not None
    return sorted(i for i, d in reference.items() if difficulty is None or d == difficulty)


def ratio_parts(runs: Sequence[Sequence[dict]], ids: Sequence[str], metric: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and denominator, ``(seeds, samples)`` each, of ``metric`` per sample in the
    order of ``ids``: gIoU = summed per-mask IoU / masks, cIoU = intersection / union."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    num = np.empty((len(runs), len(ids)))
    den = np.empty((len(runs), len(ids)))
    for s, run in enumerate(runs):
        by_id = {row["id"]: row for row in run}
        rows = [by_id[i] for i in ids]
        if metric == "giou":
            num[s] = [row["iou"] * row["masks"] for row in rows]
            den[s] = [row["masks"] for row in rows]
        else:
            num[s] = [row["I"] for row in rows]
            den[s] = [row["U"] for row in rows]
    return num, den


def _arm_values(counts: np.ndarray, num: np.ndarray, den: np.ndarray, eps: float,
                seed_draw: np.ndarray | None) -> np.ndarray:
    """Per replicate (rows of ``counts``: how often each sample is drawn), the arm's metric:
    each seed's ratio of weighted sums, averaged over the seeds (or over ``seed_draw``)."""
    per_seed = (counts @ num.T) / (counts @ den.T + eps)  # (replicates, seeds)
    if seed_draw is not None:
        per_seed = np.take_along_axis(per_seed, seed_draw, axis=1)
    return per_seed.mean(axis=1)


def paired_bootstrap(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray,
                     den_b: np.ndarray, *, eps: float = 0.0, replicates: int = 10_000,
                     level: float = 0.95, seed: int = 0, resample_seeds: bool = False
                     ) -> Difference:
    """The difference ``a - b`` of two arms' mean-over-seeds ratio metric and its paired
    bootstrap percentile interval at ``level``.

    Args:
        num_a, den_a, num_b, den_b: ``(seeds, samples)`` numerators and denominators; column
            ``i`` is the same test sample in both arms (the seed counts may differ).
        eps: added to each replicate's summed denominator (cIoU's :data:`CIOU_EPS`).
        replicates: bootstrap draws; each resamples the samples with replacement, the same
            draw for both arms and every seed.
        seed: of the random generator (the same seed gives the same interval).
        resample_seeds: also draw each arm's seeds with replacement, independently per arm.
    """
    num_a, den_a, num_b, den_b = (np.atleast_2d(np.asarray(x, dtype=float))
                                  for x in (num_a, den_a, num_b, den_b))
    n = num_a.shape[1]
    if not (den_a.shape == num_a.shape and num_b.shape == den_b.shape
            and num_b.shape[1] == n):
        raise ValueError(f"paired bootstrap: shapes {num_a.shape}, {den_a.shape}, "
                         f"{num_b.shape}, {den_b.shape} do not pair (seeds, samples)")
    if n == 0:
        raise ValueError("paired bootstrap: no samples")
    if not 0 < level < 1:
        raise ValueError(f"paired bootstrap: level must lie in (0, 1), got {level}")
    observed = (_arm_values(np.ones((1, n)), num_a, den_a, eps, None)
                - _arm_values(np.ones((1, n)), num_b, den_b, eps, None))[0]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(replicates, n))
    offsets = (np.arange(replicates) * n)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=replicates * n).reshape(
        replicates, n).astype(float)
    seeds_a = seeds_b = None
    if resample_seeds:
        seeds_a = rng.integers(0, num_a.shape[0], size=(replicates, num_a.shape[0]))
        seeds_b = rng.integers(0, num_b.shape[0], size=(replicates, num_b.shape[0]))
    diffs = (_arm_values(counts, num_a, den_a, eps, seeds_a)
             - _arm_values(counts, num_b, den_b, eps, seeds_b))
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return Difference(mean=float(observed), low=float(low), high=float(high), samples=n,
                      replicates=replicates)


def compare(runs_a: Sequence[Sequence[dict]], runs_b: Sequence[Sequence[dict]], *,
            metric: str = "giou", difficulty: str | None = None, replicates: int = 10_000,
            level: float = 0.95, seed: int = 0, resample_seeds: bool = False) -> Difference:
    """``arm a - arm b`` of ``metric`` from each arm's per-seed lists of compact rows,
    matched by sample id (the order of the rows does not matter), over all samples or those
    of ``difficulty``; see :func:`paired_bootstrap`.

    Raises:
        ValueError: the runs were not scored on the same samples (:func:`sample_ids`), or
            no sample has ``difficulty``.
    """
    ids = sample_ids(runs_a, runs_b, difficulty)
    if not ids:
        raise ValueError(f"paired bootstrap: no sample of difficulty {difficulty!r}")
    num_a, den_a = ratio_parts(runs_a, ids, metric)
    num_b, den_b = ratio_parts(runs_b, ids, metric)
    return paired_bootstrap(num_a, den_a, num_b, den_b,
                            eps=CIOU_EPS if metric == "ciou" else 0.0, replicates=replicates,
                            level=level, seed=seed, resample_seeds=resample_seeds)
