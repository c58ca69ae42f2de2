"""What an evaluation sums: masks' intersections and unions, counts, keyword accuracy.

:class:`Totals` is the one place rows are counted, whether just scored or read back on
resume, so a resumed run performs the same sequence of additions as an uninterrupted
one. Across processes the counts are summed exactly (integers; the float ``sum_iou`` as
:meth:`keyseg.metrics.SegMetrics.all_reduce` does).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from keyseg.metrics import SegMetrics

#: The integer counts of a run (besides the ``"issue:NAME"`` data counts).
COUNT_KEYS = ("samples", "records", "skipped", "no_seg", "fewer_seg", "extra_seg",
              "keyword_scored", "keyword_correct", "resumed_rows")


def same_keyword(decoded: str | None, target: str) -> bool:
    """A generated keyword matches its target up to case and white space."""
    return decoded is not None and " ".join(decoded.lower().split()) == " ".join(
        target.lower().split())


@dataclass
class Totals:
    """One process's running sums (after :meth:`all_reduce`: every process's).

    Attributes:
        metrics: gIoU / cIoU accumulator over every scored mask.
        by_difficulty: one accumulator per ``Referent.difficulty`` label.
        counts: :data:`COUNT_KEYS` and the records' data issues as ``"issue:NAME"``.
    """

    metrics: SegMetrics = field(default_factory=SegMetrics)
    by_difficulty: dict[str, SegMetrics] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def add_row(self, row: dict, mode: str) -> None:
        """Add one JSONL row (a scored row and a row read back count alike). In
        ``generate`` mode also count answers with no / too few / too many ``[SEG]`` and,
        when the referent has a keyword, whether the decoded ``[KEY]`` keyword is it."""
        self.metrics.update_counts(row["I"], row["U"])
        difficulty = row.get("difficulty")
        if difficulty is not None:
            self.by_difficulty.setdefault(difficulty, SegMetrics()).update_counts(row["I"],
                                                                                  row["U"])
        self.counts["samples"] += 1
        if mode == "generate":
            k, n_pred = int(row["n_target"]), int(row["n_pred"])
            if n_pred == 0:
                self.counts["no_seg"] += 1
            elif n_pred < k:
                self.counts["fewer_seg"] += 1
            elif n_pred > k:
                self.counts["extra_seg"] += 1
            target_keyword = row.get("target_keyword")
            if target_keyword and target_keyword.strip():
                self.counts["keyword_scored"] += 1
                self.counts["keyword_correct"] += int(same_keyword(row.get("keyword"),
                                                                   target_keyword))

    def add_issues(self, issues: dict[str, Any]) -> None:
        """Add a record's ``meta["issues"]`` (``{name: count}``)."""
        for name, value in issues.items():
            self.counts[f"issue:{name}"] += int(value)

    def all_reduce(self, accelerator: Any | None) -> None:
        """Sum over the processes of ``accelerator`` in place; every process ends with the
        totals. Without one (or with one process) only the counts are normalised."""
        world = 1 if accelerator is None else int(accelerator.num_processes)
        self.metrics.all_reduce(accelerator)
        issues = self._reduced_issues(world)
        self.counts = self._reduced_counts(accelerator, world)
        self.counts.update({f"issue:{name}": value for name, value in issues.items()})
        self.by_difficulty = self._reduced_difficulty(world)

    def _reduced_issues(self, world: int) -> dict[str, int]:
        local = {k.partition(":")[2]: int(v) for k, v in self.counts.items()
                 if k.startswith("issue:")}
        if world > 1:
            from accelerate.utils import gather_object

            merged: Counter = Counter()
            for part in gather_object([local]):
                merged.update(part)
            local = dict(merged)
        return local

    def _reduced_counts(self, accelerator: Any | None, world: int) -> Counter:
        if world <= 1:
            return Counter({k: int(self.counts[k]) for k in COUNT_KEYS})
        local = torch.tensor([self.counts[k] for k in COUNT_KEYS], dtype=torch.int64,
                             device=accelerator.device)
        total = accelerator.reduce(local, "sum").cpu().tolist()
        return Counter(dict(zip(COUNT_KEYS, (int(v) for v in total), strict=True)))

    def _reduced_difficulty(self, world: int) -> dict[str, SegMetrics]:
        """Per-label accumulators summed over processes (labels may differ per process)."""
        if world <= 1:
            return self.by_difficulty
        from accelerate.utils import gather_object

        merged: dict[str, SegMetrics] = {}
        states = [(k, m.state_dict()) for k, m in self.by_difficulty.items()]
        for name, state in gather_object(states):
            part = SegMetrics()
            part.load_state_dict(state)
            merged.setdefault(name, SegMetrics()).merge(part)
        return merged

    def issues(self) -> dict[str, int]:
        """The data issues as ``{NAME: count}``, sorted by name, zero counts left out."""
        found = {k.partition(":")[2]: int(v) for k, v in self.counts.items()
                 if k.startswith("issue:")}
        return {k: found[k] for k in sorted(found) if found[k]}

    def summary(self) -> dict[str, Any]:
        """The metrics of :attr:`keyseg.evaluate.EvalResult.metrics` (see there)."""
        counts = self.counts
        result: dict[str, Any] = self.metrics.compute()
        result.update({
            "samples": counts["samples"],
            "records": counts["records"],
            "skipped": counts["skipped"],
            "no_seg": counts["no_seg"],
            "fewer_seg": counts["fewer_seg"],
            "extra_seg": counts["extra_seg"],
            **{k: v for k, v in self.metrics.state_dict().items() if k != "n"},
            "issues": self.issues(),
        })
        if counts["keyword_scored"]:
            # Generate mode only: how often the decoded [KEY] keyword is the referent's.
            result["keyword_scored"] = counts["keyword_scored"]
            result["keyword_accuracy"] = counts["keyword_correct"] / counts["keyword_scored"]
        if self.by_difficulty:
            result["by_difficulty"] = {k: self.by_difficulty[k].compute()
                                       for k in sorted(self.by_difficulty)}
        return result
