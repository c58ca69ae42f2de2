"""Weighted, seeded, resumable sampling across datasets (SPEC §4 "data mixture").

The reference mixes ``refer_seg`` and ``reason_seg`` with sample rates 9:3 and takes up to 3
expressions per image per draw. :class:`MixtureSampler` does that over any sequence-like
datasets of :class:`~keyseg.data.sample.SegRecord` (``len`` + ``__getitem__``).

Determinism without hidden state: draw ``step`` uses its own generator seeded by
``(seed, step)``, so the whole sequence is a pure function of the seed. The sampler's state
is therefore just the next step (plus skip counts): ``state_dict()`` goes into a checkpoint,
``load_state_dict()`` continues the exact same sequence, and data-loader workers can compute
any step independently (``sampler[step]``).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegConfigError, KeySegDataError

#: Reference rates: refer_seg (refCOCO/+/g) 9 : reason_seg 3.
DEFAULT_WEIGHTS: dict[str, float] = {"refer": 9.0, "reason": 3.0}
DEFAULT_MAX_REFERENTS = 3


class MixtureSampler:
    """Draw records from several datasets in proportion to their weights.

    Args:
        datasets: name -> sequence of ``SegRecord``.
        weights: name -> non-negative weight (relative sampling rate). ``None`` uses
            :data:`DEFAULT_WEIGHTS` when the names are exactly ``refer``/``reason``, else equal
            weights. Every dataset needs a weight; zero disables it.
        seed: the sequence is a pure function of it.
        max_referents: keep at most this many referents per drawn record (sampled without
            replacement, order preserved); ``None`` keeps all.
        max_retries: a record whose loading raises ``KeySegDataError`` is counted in
            :attr:`skipped` and redrawn, up to this many times per step.

    Each drawn record is a shallow copy with ``meta["dataset"]`` and ``meta["step"]`` set.
    """

    def __init__(
        self,
        datasets: Mapping[str, Sequence[SegRecord]],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        max_referents: int | None = DEFAULT_MAX_REFERENTS,
        max_retries: int = 10,
    ) -> None:
        if not datasets:
            raise KeySegConfigError("MixtureSampler needs at least one dataset")
        self.names = list(datasets)
        if weights is None:
            weights = (DEFAULT_WEIGHTS if set(self.names) == set(DEFAULT_WEIGHTS)
                       else dict.fromkeys(self.names, 1.0))
        unknown = set(weights) - set(self.names)
        missing = [n for n in self.names if n not in weights]
        if unknown or missing:
            raise KeySegConfigError(
                f"mixture weights must name exactly the datasets {self.names}; "
                f"missing {missing}, unknown {sorted(unknown)}"
            )
        values = np.array([float(weights[n]) for n in self.names], dtype=np.float64)
        if (values < 0).any() or not np.isfinite(values).all() or values.sum() <= 0:
            raise KeySegConfigError(f"mixture weights must be >= 0 with a positive sum: {weights}")
        for name, value in zip(self.names, values, strict=True):
            if value > 0 and len(datasets[name]) == 0:
                raise KeySegDataError(f"dataset {name!r} is empty but has weight {value}")
        if max_referents is not None and max_referents < 1:
            raise KeySegConfigError(f"max_referents must be >= 1, got {max_referents}")
        self.datasets = dict(datasets)
        self.probabilities = values / values.sum()
        self.seed = int(seed)
        self.max_referents = max_referents
        self.max_retries = max_retries
        self.step = 0
        self.skipped: Counter = Counter()  # dataset name -> records that failed to load

    # -- drawing ----------------------------------------------------------------------
    def choose(self, step: int, attempt: int = 0) -> tuple[str, int, np.random.Generator]:
        """Which ``(dataset, index)`` draw ``step`` (retry ``attempt``) picks, and its RNG."""
        rng = np.random.default_rng([self.seed, step, attempt])
        name = self.names[int(rng.choice(len(self.names), p=self.probabilities))]
        return name, int(rng.integers(len(self.datasets[name]))), rng

    def __getitem__(self, step: int) -> SegRecord:
        """The record of draw ``step`` (pure: does not move :attr:`step`)."""
        last_error: KeySegDataError | None = None
        for attempt in range(self.max_retries + 1):
            name, index, rng = self.choose(step, attempt)
            try:
                record = self.datasets[name][index]
            except KeySegDataError as error:
                self.skipped[name] += 1
                last_error = error
                continue
            return self._subsample(record, name, step, rng)
        raise KeySegDataError(
            f"mixture step {step}: {self.max_retries + 1} draws in a row failed to load; "
            f"last error: {last_error}"
        )

    def _subsample(self, record: SegRecord, name: str, step: int,
                   rng: np.random.Generator) -> SegRecord:
        referents = record.referents
        if self.max_referents is not None and len(referents) > self.max_referents:
            keep = np.sort(rng.choice(len(referents), size=self.max_referents, replace=False))
            referents = [referents[i] for i in keep]
        out = copy.copy(record)
        out.referents = list(referents)
        out.meta = {**record.meta, "dataset": name, "step": step}
        return out

    def __next__(self) -> SegRecord:
        record = self[self.step]
        self.step += 1
        return record

    def __iter__(self) -> Iterator[SegRecord]:
        return self

    def take(self, n: int) -> list[SegRecord]:
        """The next ``n`` records (advances :attr:`step`)."""
        return [next(self) for _ in range(n)]

    # -- checkpointing ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: ``{"seed", "step", "names", "skipped"}``."""
        return {"seed": self.seed, "step": self.step, "names": list(self.names),
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the datasets must be the same names."""
        if list(state.get("names", self.names)) != self.names:
            raise KeySegConfigError(
                f"mixture state was saved for datasets {state.get('names')}, not {self.names}"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])
        self.skipped = Counter(state.get("skipped", {}))
