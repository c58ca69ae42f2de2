"""``run_evaluation``: score a model on a split, streamed, batched, resumable, distributed.

Reads top to bottom: :func:`run_evaluation` checks its arguments, accounts the rows a
previous run left on disk (:func:`_replay`), scores the rest batch by batch
(:func:`_score_shard`), recomputes the masks of overlay candidates read back
(:func:`_complete_pending`) and sums everything over the processes (:func:`_reduce`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from keyseg.config import EvalConfig
from keyseg.data.collate import Collator
from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegConfigError, KeySegDataError
from keyseg.evaluate.batches import (
    MAX_SKIP_MESSAGES,
    EvalItem,
    group_examples,
    iter_batches,
    load_record,
    record_items,
)
from keyseg.evaluate.overlays import BoundedHeaps, OverlayCandidate
from keyseg.evaluate.report import EvalResult
from keyseg.evaluate.rows import DoneMap, RowStore, RowWriter, done_map
from keyseg.evaluate.scoring import infer, score, used_prediction
from keyseg.evaluate.totals import Totals

if TYPE_CHECKING:
    from keyseg.model.keyseg import KeySegModel


def run_evaluation(
    model: KeySegModel,
    records: Sequence[SegRecord],
    config: EvalConfig | None = None,
    *,
    accelerator: Any | None = None,
    jsonl_path: str | os.PathLike | None = None,
    resume: bool = False,
    generate_kwargs: dict[str, Any] | None = None,
    **settings: Any,
) -> EvalResult:
    """Score ``model`` on ``records`` (the package docstring describes the protocols).

    Args:
        model: a :class:`~keyseg.model.keyseg.KeySegModel` (or an Accelerate-wrapped one).
        records: a sequence of records (lazy readers are fine; ``records[i]`` raising
            :class:`KeySegDataError` counts the record as skipped).
        config: mode, limit, batch size, protocol, ... (:class:`keyseg.config.EvalConfig`;
            default: its defaults).
        accelerator: an ``accelerate.Accelerator``: shard by process, reduce exactly.
        jsonl_path: write one JSON line per scored conversation here (streamed: appended to
            a per-process part file, one flushed write per row; merged in record order into
            ``jsonl_path`` at the end).
        resume: continue from the rows already on disk for ``jsonl_path`` (part files and a
            merged file) instead of starting over. The caller makes sure they were written
            with the same model and settings (``keyseg eval`` checks its ``run.json``).
        generate_kwargs: passed to ``generate`` (e.g. a ``logits_processor``).
        settings: :class:`~keyseg.config.EvalConfig` fields replacing ``config``'s, e.g.
            ``run_evaluation(model, records, mode="generate", limit=10)``.

    Returns:
        an :class:`EvalResult`; its ``metrics`` are the sums over all processes.

    Raises:
        KeySegConfigError: a bad setting (:class:`~keyseg.config.EvalConfig`), or
            ``resume`` without ``jsonl_path``.
        TypeError: a keyword that is not an :class:`~keyseg.config.EvalConfig` field.
        KeySegDataError: with ``resume``, a row on disk that is not a complete JSON line of
            this format (other than a torn last line, which is dropped).
    """
    config = config if config is not None else EvalConfig()
    if settings:
        config = dataclasses.replace(config, **settings)
    if resume and jsonl_path is None:
        raise KeySegConfigError("resume needs a jsonl_path (the rows to continue from)")
    start = time.perf_counter()
    rank, world = _process_layout(accelerator)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    total = len(records) if config.limit is None else max(0, min(int(config.limit),
                                                                 len(records)))
    shard = range(rank, total, world)
    run = _Run(model, records, config, generate_kwargs or {})

    store = RowStore(jsonl_path, rank, world, accelerator) if jsonl_path is not None else None
    done: DoneMap = {}
    if store is not None and resume:
        done = _replay(run, store.rows_to_resume(total))
    elif store is not None:
        store.discard()
    writer = store.writer() if store is not None else None

    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    bar = _progress(len(shard), enabled=config.progress and rank == 0,
                    desc=f"eval ({config.mode})")
    try:
        with torch.no_grad(), autocast:
            _score_shard(run, shard, done, writer, bar)
            if config.keep_overlays:
                _complete_pending(run)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        model.train(was_training)

    skipped_messages, overlays = _reduce(run, accelerator, world)
    if store is not None:
        store.merge()
    return EvalResult(metrics=run.totals.summary(), per_sample=run.per_sample,
                      skipped_messages=skipped_messages, overlays=overlays,
                      wall_time=time.perf_counter() - start,
                      resumed_rows=run.totals.counts["resumed_rows"])


@dataclass
class _Run:
    """One call's model, records and settings, and this process's results so far."""

    model: KeySegModel
    records: Sequence[SegRecord]
    config: EvalConfig
    generate_kwargs: dict[str, Any]
    totals: Totals = field(default_factory=Totals)
    skipped_messages: list[str] = field(default_factory=list)
    use_keyword: bool = field(init=False)
    collator: Collator = field(init=False)
    heaps: BoundedHeaps = field(init=False)
    per_sample: list[dict] | None = field(init=False)

    def __post_init__(self) -> None:
        self.use_keyword = bool(self.model.settings.use_keyword)
        self.collator = Collator(self.model.processor,
                                 mode="train" if self.config.mode == "teacher" else "prompt")
        self.heaps = BoundedHeaps(self.config.keep_overlays)
        self.per_sample = [] if self.config.keep_per_sample else None

    def infer(self, items: list[EvalItem]) -> list[tuple[torch.Tensor, str, str | None]]:
        """Collate ``items`` (one image encoding per record) and run the model on them."""
        model = self.model
        batch = self.collator(group_examples(items)).to(model.device, dtype=model.dtype)
        return infer(model, batch, items, self.config.mode, self.config.max_new_tokens,
                     self.generate_kwargs)

    def keep(self, row: dict) -> None:
        """Add a row (just scored or read back) to the per-sample list when kept."""
        if self.per_sample is not None:
            self.per_sample.append(row)


def _replay(run: _Run, rows: list[dict]) -> DoneMap:
    """Account the rows of this shard already on disk first, in record order, exactly as
    if they had just been scored (the accumulation is then the same sequence of operations
    as an uninterrupted run's). A complete record's issues are counted from its first row,
    since it is not loaded again. Returns what is done (:func:`~keyseg.evaluate.rows.done_map`)."""
    done, complete = done_map(rows)
    totals = run.totals
    totals.counts["records"] += complete
    counted: set[int] = set()
    for row in rows:
        index = int(row["index"])
        refs, queries = done[index]
        if len(refs) >= queries and index not in counted:
            counted.add(index)
            totals.add_issues(row.get("record_issues", {}))
        totals.add_row(row, run.config.mode)
        run.heaps.offer(row)
        run.keep(row)
    totals.counts["resumed_rows"] = len(rows)
    return done


def _score_shard(run: _Run, shard: range, done: DoneMap, writer: RowWriter | None,
                 bar: Any) -> None:
    """Score the conversations of ``shard`` not in ``done``, batch by batch; each row is
    added to the totals and written, and each batch closed, as soon as it is scored."""
    config = run.config
    for items in iter_batches(run.records, shard, batch_size=config.batch_size,
                              use_keyword=run.use_keyword, all_texts=config.all_texts,
                              protocol=config.protocol, max_pixels=config.max_pixels,
                              totals=run.totals, skipped_messages=run.skipped_messages,
                              bar=bar, done=done):
        for item, (pred, answer, keyword) in zip(items, run.infer(items), strict=True):
            row, used, target = score(item, pred, answer, keyword)
            run.heaps.offer(row, used, target)
            run.totals.add_row(row, config.mode)
            if writer is not None:
                writer.write(row)
            run.keep(row)
        if writer is not None:
            writer.end_batch()


def _complete_pending(run: _Run) -> None:
    """Recompute the masks of kept candidates that were read back from disk (resume): at
    most ``2 n`` samples per process, one at a time. A record that no longer loads keeps no
    masks (and so no overlay); its row still counts."""
    config = run.config
    for candidate in run.heaps.pending():
        try:
            record, image = load_record(run.records, candidate.record_index, config.max_pixels)
        except KeySegDataError:
            continue
        items = record_items(record, candidate.record_index, image, run.use_keyword,
                             config.all_texts, config.protocol, {})
        item = next(i for i in items if i.ref_index == candidate.ref_index)
        pred = run.infer([item])[0][0]
        target = np.asarray(item.conversation.target_masks)
        candidate.fill(used_prediction(pred, int(target.shape[0])), target)


def _reduce(run: _Run, accelerator: Any | None, world: int
            ) -> tuple[list[str], dict[str, list[OverlayCandidate]]]:
    """Sum the totals over the processes (in place) and gather the skipped messages and
    overlay candidates: every process ends with the same."""
    run.totals.all_reduce(accelerator)
    skipped_messages, overlays = run.skipped_messages, run.heaps.result()
    if world > 1:
        from accelerate.utils import gather_object

        skipped_messages = list(gather_object(skipped_messages))[:MAX_SKIP_MESSAGES]
        if run.config.keep_overlays:
            merged = BoundedHeaps(run.config.keep_overlays)
            for candidate in gather_object(overlays["worst"] + overlays["best"]):
                merged.push(candidate)
            overlays = merged.result()
    return skipped_messages, overlays if run.config.keep_overlays else {}


def _process_layout(accelerator: Any | None) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", dynamic_ncols=True)
