"""Evaluation: gIoU / cIoU of a KeySeg model over a split, streamed, batched, distributed.

Two protocols (``docs/EVALUATION.md`` compares them with LISA / KeySeg / VisionReasoner):

``teacher`` (LISA's protocol)
    The answer is *fed*, nothing is generated: ``"[SEG]."`` (``k`` masks: ``"[SEG], [SEG] and
    [SEG]."``), followed by ``" [KEY] {keyword}"`` when the model uses ``[KEY]`` — and by a
    bare ``" [KEY]"`` when the referent's keyword is unknown (ReasonSeg val/test have no keyword
    file). The attention is causal and the ``[SEG]``/``[KEY]`` states are read at or before
    those tokens, so the keyword text after ``[KEY]`` cannot change any mask: feeding ``[KEY]``
    without its keyword gives exactly the masks of the full answer, and keeps the structure
    the model was trained on (every training answer of a ``use_keyword`` model holds
    ``[KEY]``). Masks come from :meth:`KeySegModel.predict`.
``generate``
    The model answers (:func:`keyseg.generation.generate`, greedy). The ``i``-th ``[SEG]`` of
    the answer is scored against the ``i``-th target; extra ``[SEG]`` are ignored, missing ones
    (including an answer with no ``[SEG]`` at all) score an *empty prediction* against their
    target (``I = 0``, ``U = |T|``; 1.0 when the target is empty too). Such samples are
    counted (``no_seg``, ``fewer_seg``, ``extra_seg``).

Inputs (:func:`eval_question`): ReasonSeg and refCOCO/+/g are fed LISA's validation user
message, ``"<image>\n {sent} Please output segmentation mask."`` (sentences) or ``"<image>\n
What is {phrase} in this image? Please output segmentation mask."`` (phrases; refCOCO
sentences are lower-cased as LISA does, ReasonSeg keeps the case); the procedural world keeps
its training wording. ReasonSeg records use their first text unless ``all_texts``; every
other record (refCOCO/+/g: every sentence of every ref; shapes) uses all referents.

Protocols (``protocol``, :data:`keyseg.data.eval_sets.PROTOCOLS`): ``lisa`` scores the
targets as read; ``lisa-bugs`` (with records read under it) scores them as LISA's metric does,
where only the value 1 is foreground, so the 2 of LISA's summed overlapping polygons is
dropped from the target. The records' ``meta["issues"]`` (dropped or degenerate annotations)
are summed into the result's ``issues``.

Memory does not grow with the split: :class:`~keyseg.metrics.SegMetrics` holds four numbers,
per-sample lines go to a JSONL file as they are produced, overlay candidates live in two
bounded heaps. With an Accelerate ``accelerator``, records are sharded by process index,
counts are summed exactly across processes and the per-process JSONL files are merged by the
main process.

Resume: every row is appended to the process's part file in one write and flushed, and a
line closes each batch, so a kill loses at most the batch in flight (its rows and a torn
last line are dropped on resume). With ``resume=True`` the rows already on disk (part files
of any earlier run, whatever its process count, and a merged file) are accounted first, in
record order, exactly as if they had just been scored; only the missing queries are run,
in the batches an uninterrupted run would form. The totals, and so the report, equal an
uninterrupted run's (same process count: bit for bit; with another process count the
float ``sum_iou`` may differ in its last bits).
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import io
import itertools
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from keyseg import tokens
from keyseg.data.collate import Collator, Conversation, ImageExample
from keyseg.data.eval_sets import check_protocol
from keyseg.data.sample import Referent, SegRecord
from keyseg.errors import KeySegConfigError, KeySegDataError
from keyseg.metrics import SegMetrics, iou_score

Mode = Literal["teacher", "generate"]
MODES: tuple[str, ...] = ("teacher", "generate")

#: LISA's validation question wording (deterministic: no template sampling in evaluation).
SENTENCE_QUESTION = tokens.LONG_QUESTIONS[1]  # "{sent} Please output segmentation mask."
PHRASE_QUESTION = tokens.SHORT_QUESTIONS[3]  # "What is {class_name} in this image? ..."
#: Sources whose referents are paraphrases of one query (only the first is used by default).
PARAPHRASE_SOURCES: frozenset[str] = frozenset({"reason_seg"})
#: LISA's validation sets: fed LISA's validation user message (:func:`eval_question`).
LISA_SOURCES: frozenset[str] = frozenset({"reason_seg", "refcoco", "refcoco+", "refcocog"})
#: Sources whose queries LISA lower-cases (its REFER sentences).
LOWERCASE_SOURCES: frozenset[str] = frozenset({"refcoco", "refcoco+", "refcocog"})
_MAX_SKIP_MESSAGES = 20


# --------------------------------------------------------------------------- prompts


def eval_question(referent: Referent, source: str | None = None) -> str:
    """The deterministic question for a referent of ``source`` (a record's ``source``).

    For LISA's validation sets (:data:`LISA_SOURCES`) it is exactly what LISA's validation
    puts after ``"<image>\n"``: a space, then the sentence or phrase template around the
    stripped text, lower-cased for refCOCO/+/g (:data:`LOWERCASE_SOURCES`), case kept for
    ReasonSeg. The image placeholder and newline come from the chat template. Other sources
    (the procedural world, ``None``) get the templates without the space, phrases
    lower-cased: the wording the embedded model was trained on.
    """
    text = referent.text.strip()
    if source in LISA_SOURCES:
        text = text.lower() if source in LOWERCASE_SOURCES else text
        template = SENTENCE_QUESTION if referent.is_sentence else PHRASE_QUESTION
        return " " + template.format(sent=text, class_name=text)
    if referent.is_sentence:
        return SENTENCE_QUESTION.format(sent=text)
    return PHRASE_QUESTION.format(class_name=text.lower())


def lisa_metric_target(masks: np.ndarray) -> np.ndarray:
    """The target as LISA's metric sees it: value 1 is foreground, 255 is ignored, any other
    value (the 2 where LISA sums overlapping polygons) is background. ``(k, H, W)`` uint8 ->
    same shape; used under ``protocol="lisa-bugs"``."""
    masks = np.asarray(masks)
    return np.where((masks == 1) | (masks == 255), masks, 0).astype(np.uint8)


def teacher_answer(num_masks: int, keyword: str | None = None, use_keyword: bool = True,
                   reference: str | None = None) -> str:
    """The fed answer: ``"[SEG]."`` or ``"[SEG], [SEG] and [SEG]."`` for ``num_masks``
    targets, then ``" [KEY] {keyword}"`` (``" [KEY]"`` when the keyword is unknown) if
    ``use_keyword``.

    ``reference`` is the dataset's own answer: when it holds exactly ``num_masks`` ``[SEG]``
    (the procedural world's answers do) it is fed instead of the template, since that is the
    wording the model was trained on; ReasonSeg/refCOCO have no such answer (LISA's protocol).
    """
    if reference and reference.count(tokens.SEG_TOKEN) == num_masks:
        answer = reference
    elif num_masks <= 1:
        answer = f"{tokens.SEG_TOKEN}."
    else:
        answer = ", ".join([tokens.SEG_TOKEN] * (num_masks - 1)) + f" and {tokens.SEG_TOKEN}."
    if not use_keyword:
        return answer
    if keyword and keyword.strip():
        return tokens.with_keyword(answer, keyword)
    return f"{answer} {tokens.KEY_TOKEN}"


def eval_referents(record: SegRecord, all_texts: bool = False) -> list[tuple[int, Referent]]:
    """``(index, referent)`` pairs scored for ``record``: the first of a ReasonSeg record
    (its texts are paraphrases) unless ``all_texts``; every referent otherwise."""
    pairs = list(enumerate(record.referents))
    if record.source in PARAPHRASE_SOURCES and not all_texts:
        return pairs[:1]
    return pairs


def eval_conversations(record: SegRecord, *, use_keyword: bool, all_texts: bool = False,
                       protocol: str = "lisa") -> list[tuple[Referent, Conversation]]:
    """The conversations scored for ``record``: one per :func:`eval_referents` referent,
    with :func:`eval_question` and the :func:`teacher_answer` (generate mode drops the answer
    when collating); targets as the ``protocol`` scores them (:func:`lisa_metric_target`
    under ``lisa-bugs``). Returns ``(referent, conversation)`` pairs in record order."""
    pairs = []
    for ref_index, ref in eval_referents(record, all_texts):
        answer = teacher_answer(int(ref.masks.shape[0]), ref.keyword, use_keyword,
                                reference=ref.answer)
        target = lisa_metric_target(ref.masks) if protocol == "lisa-bugs" else ref.masks
        pairs.append((ref, Conversation(
            turns=[tokens.Turn(eval_question(ref, record.source), answer)],
            target_masks=target,
            sample_id=f"{record.source}/{record.sample_id}#{ref_index}",
            keyword=ref.keyword,
            difficulty=ref.difficulty,
        )))
    return pairs


# --------------------------------------------------------------------------- results


@dataclass
class OverlayCandidate:
    """A scored sample kept for an overlay: bit-packed masks, re-rendered at the end.

    Attributes:
        score: the sample's mean per-mask IoU score (gIoU contribution).
        sample_id: the conversation id.
        record_index: index of the record in the evaluated sequence (to reload the image).
        query: the referent text.
        answer: the fed or generated answer.
        shape: ``(k, H, W)`` of the masks.
        pred_bits / target_bits: ``np.packbits`` of the ``(k, H, W)`` prediction
            (``logits > 0``) and of the target's foreground; ``ignore_bits`` of its 255 pixels.
            ``None`` (and ``shape`` ``(0, 0, 0)``) for a row read back on resume until its
            masks are recomputed at the end (:func:`_complete_pending`).
        ref_index: index of the referent in the record.
    """

    score: float
    sample_id: str
    record_index: int
    query: str
    answer: str
    shape: tuple[int, int, int]
    pred_bits: np.ndarray | None
    target_bits: np.ndarray | None
    ignore_bits: np.ndarray | None
    ref_index: int = 0

    def masks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unpacked ``(k, H, W)`` bool prediction, target foreground and ignore region."""
        size = int(np.prod(self.shape))

        def unpack(bits: np.ndarray) -> np.ndarray:
            return np.unpackbits(bits, count=size).astype(bool).reshape(self.shape)

        return unpack(self.pred_bits), unpack(self.target_bits), unpack(self.ignore_bits)


@dataclass
class EvalResult:
    """What :func:`run_evaluation` returns (identical on every process after reduction).

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


class _BoundedHeaps:
    """The ``n`` lowest- and ``n`` highest-scoring candidates seen (ties: first seen wins)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.worst: list[tuple[float, int, OverlayCandidate]] = []  # max-heap via -score
        self.best: list[tuple[float, int, OverlayCandidate]] = []  # min-heap on score
        self._count = itertools.count()

    def wants(self, score: float) -> bool:
        if self.n <= 0:
            return False
        return (len(self.worst) < self.n or -self.worst[0][0] > score
                or len(self.best) < self.n or self.best[0][0] < score)

    def push(self, candidate: OverlayCandidate) -> None:
        order = next(self._count)
        s = candidate.score
        if len(self.worst) < self.n:
            heapq.heappush(self.worst, (-s, -order, candidate))
        elif -self.worst[0][0] > s:
            heapq.heapreplace(self.worst, (-s, -order, candidate))
        if len(self.best) < self.n:
            heapq.heappush(self.best, (s, -order, candidate))
        elif self.best[0][0] < s:
            heapq.heapreplace(self.best, (s, -order, candidate))

    def result(self) -> dict[str, list[OverlayCandidate]]:
        """Sorted candidates; any still without masks (unloadable on resume) are left out."""
        return {"worst": sorted((c for _, _, c in self.worst if c.pred_bits is not None),
                                key=lambda c: c.score),
                "best": sorted((c for _, _, c in self.best if c.pred_bits is not None),
                               key=lambda c: -c.score)}


@dataclass
class _Item:
    """One conversation waiting for its batch."""

    record_index: int
    record_id: str
    source: str
    image: Any
    conversation: Conversation
    referent: Referent
    fed_answer: str
    ref_index: int = 0
    queries: int = 1  # queries scored for this record (a resume knows a record is complete)
    issues: dict[str, int] = field(default_factory=dict)  # the record's meta["issues"]


# --------------------------------------------------------------------------- main loop


def run_evaluation(
    model,
    records: Sequence[SegRecord],
    *,
    mode: Mode = "teacher",
    limit: int | None = None,
    batch_size: int = 1,
    accelerator: Any | None = None,
    all_texts: bool = False,
    max_new_tokens: int = 64,
    jsonl_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    keep_per_sample: bool = False,
    keep_overlays: int = 0,
    generate_kwargs: dict[str, Any] | None = None,
    max_pixels: int | None = None,
    protocol: str = "lisa",
) -> EvalResult:
    """Score ``model`` on ``records`` (see the module docstring for the protocols).

    Args:
        model: a :class:`~keyseg.model.keyseg.KeySegModel` (or an Accelerate-wrapped one).
        records: a sequence of records (lazy readers are fine; ``records[i]`` raising
            :class:`KeySegDataError` counts the record as skipped).
        mode: ``"teacher"`` or ``"generate"``.
        limit: evaluate only the first ``limit`` records (before sharding).
        batch_size: conversations per forward (rows about one image share its SAM encoding).
        accelerator: an ``accelerate.Accelerator``: shard by process, reduce exactly.
        all_texts: score every text of a ReasonSeg record, not just the first.
        max_new_tokens: generation budget (``generate`` mode).
        jsonl_path: write one JSON line per scored conversation here (streamed: appended to
            a per-process part file, one flushed write per row; merged in record order into
            ``jsonl_path`` at the end).
        resume: continue from the rows already on disk for ``jsonl_path`` (part files and a
            merged file) instead of starting over. The caller makes sure they were written
            with the same model and arguments (``keyseg eval`` checks its ``run.json``).
        progress: show a progress bar (main process only).
        keep_per_sample: also return the per-sample lines in :attr:`EvalResult.per_sample`.
        keep_overlays: keep the ``n`` worst and ``n`` best samples for overlays.
        generate_kwargs: passed to ``generate`` (e.g. a ``logits_processor``).
        max_pixels: image pixel limit for :func:`keyseg.data.images.load_image`.
        protocol: ``"lisa"`` or ``"lisa-bugs"`` (targets scored as LISA's metric sees them;
            pair it with records read under the same protocol, see
            :func:`keyseg.data.eval_sets.resolve_eval_set`).

    Returns:
        an :class:`EvalResult`; its ``metrics`` are the sums over all processes.

    Raises:
        KeySegDataError: with ``resume``, a row on disk that is not a complete JSON line of
            this format (other than a torn last line, which is dropped).
    """
    if mode not in MODES:
        raise KeySegConfigError(f"evaluation mode {mode!r}: use one of {', '.join(MODES)}")
    if batch_size < 1:
        raise KeySegConfigError(f"batch_size must be >= 1, got {batch_size}")
    check_protocol(protocol)
    if resume and jsonl_path is None:
        raise KeySegConfigError("resume needs a jsonl_path (the rows to continue from)")
    start = time.perf_counter()
    rank, world = _process_layout(accelerator)
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    total = len(records) if limit is None else max(0, min(int(limit), len(records)))
    shard = range(rank, total, world)

    metrics = SegMetrics()
    by_difficulty: dict[str, SegMetrics] = {}
    counts: Counter = Counter()
    skipped_messages: list[str] = []
    heaps = _BoundedHeaps(keep_overlays)
    per_sample: list[dict] | None = [] if keep_per_sample else None
    use_keyword = bool(model.settings.use_keyword)
    collator = Collator(model.processor, mode="train" if mode == "teacher" else "prompt")

    jsonl_final = Path(jsonl_path) if jsonl_path is not None else None
    done: dict[int, tuple[set[int], int]] = {}
    if jsonl_final is not None:
        jsonl_final.parent.mkdir(parents=True, exist_ok=True)
        if resume:
            # The rows of this shard already on disk count first, in record order: the
            # accumulation below is then the same sequence of operations as uninterrupted.
            _trim_to_last_batch(_part_path(jsonl_final, rank))
            if world > 1:
                accelerator.wait_for_everyone()
            rows = _rows_on_disk(jsonl_final, rank, world, total)
            done, complete = _done_map(rows)
            counts["records"] += complete
            counted: set[int] = set()
            for row in rows:
                index = int(row["index"])
                refs, queries = done[index]
                if len(refs) >= queries and index not in counted:  # not loaded again
                    counted.add(index)
                    for name, value in row.get("record_issues", {}).items():
                        counts[f"issue:{name}"] += int(value)
                _account(row, mode, metrics, by_difficulty, counts)
                if heaps.wants(row["iou"]):
                    heaps.push(_pending_candidate(row))
                if per_sample is not None:
                    per_sample.append(row)
            counts["resumed_rows"] = len(rows)
            del rows
        else:
            _discard_previous(jsonl_final, rank, world, accelerator)
    writer = _RowWriter(_part_path(jsonl_final, rank)) if jsonl_final is not None else None

    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    bar = _progress(len(shard), enabled=progress and rank == 0, desc=f"eval ({mode})")
    try:
        with torch.no_grad(), autocast:
            for items in _batches(records, shard, batch_size, mode, use_keyword, all_texts,
                                  counts, skipped_messages, bar, max_pixels, protocol,
                                  done):
                batch = collator(_group_examples(items)).to(model.device, dtype=model.dtype)
                outputs = _infer(model, batch, items, mode, max_new_tokens,
                                 generate_kwargs or {})
                for item, (pred, answer, keyword) in zip(items, outputs, strict=True):
                    line = _score(item, pred, answer, keyword, heaps)
                    _account(line, mode, metrics, by_difficulty, counts)
                    if writer is not None:
                        writer.write(line)
                    if per_sample is not None:
                        per_sample.append(line)
                if writer is not None:
                    writer.end_batch()
            if keep_overlays:
                _complete_pending(heaps, model, collator, records, mode, use_keyword,
                                  all_texts, max_new_tokens, generate_kwargs or {}, max_pixels,
                                  protocol)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        model.train(was_training)

    # --- exact reduction across processes ---------------------------------------------------
    metrics.all_reduce(accelerator)
    issues = _reduce_issues(counts, accelerator, world)
    counts = _reduce_counts(counts, accelerator)
    by_difficulty = _reduce_difficulty(by_difficulty, accelerator, world)
    overlays = heaps.result()
    if world > 1:
        from accelerate.utils import gather_object

        skipped_messages = list(gather_object(skipped_messages))[:_MAX_SKIP_MESSAGES]
        if keep_overlays:
            merged = _BoundedHeaps(keep_overlays)
            for candidate in gather_object(overlays["worst"] + overlays["best"]):
                merged.push(candidate)
            overlays = merged.result()
    if jsonl_final is not None:
        _merge_jsonl(jsonl_final, rank, world, accelerator)

    result = metrics.compute()
    result.update({
        "samples": counts["samples"],
        "records": counts["records"],
        "skipped": counts["skipped"],
        "no_seg": counts["no_seg"],
        "fewer_seg": counts["fewer_seg"],
        "extra_seg": counts["extra_seg"],
        **{k: v for k, v in metrics.state_dict().items() if k != "n"},
        "issues": issues,
    })
    if counts["keyword_scored"]:
        # Generate mode only: how often the decoded [KEY] keyword is the referent's keyword.
        result["keyword_scored"] = counts["keyword_scored"]
        result["keyword_accuracy"] = counts["keyword_correct"] / counts["keyword_scored"]
    if by_difficulty:
        result["by_difficulty"] = {k: by_difficulty[k].compute() for k in sorted(by_difficulty)}
    return EvalResult(metrics=result, per_sample=per_sample, skipped_messages=skipped_messages,
                      overlays=overlays if keep_overlays else {},
                      wall_time=time.perf_counter() - start,
                      resumed_rows=counts["resumed_rows"])


def _process_layout(accelerator: Any | None) -> tuple[int, int]:
    if accelerator is None:
        return 0, 1
    return int(accelerator.process_index), int(accelerator.num_processes)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", dynamic_ncols=True)


def _batches(
    records: Sequence[SegRecord],
    shard: range,
    batch_size: int,
    mode: str,
    use_keyword: bool,
    all_texts: bool,
    counts: Counter,
    skipped_messages: list[str],
    bar,
    max_pixels: int | None,
    protocol: str = "lisa",
    done: dict[int, tuple[set[int], int]] | None = None,
) -> Iterator[list[_Item]]:
    """Load records of the shard lazily and yield lists of ``batch_size`` conversations.

    A record that fails to load (:class:`KeySegDataError`: truncated image, bad annotation)
    is counted in ``counts["skipped"]`` and left out; a loaded record's ``meta["issues"]``
    are added to ``counts`` as ``"issue:NAME"``. ``done`` maps a record index to the
    referent indices already scored and the record's number of queries (resume): those are
    left out, and a record whose every query is done is not even loaded (its issues were
    counted from its rows). They still take their places in the batches, so the batches of
    a resumed run hold exactly the conversations they held in an uninterrupted one (same
    padding, same numbers).
    """
    done = done or {}
    pending: list[_Item] = []
    slots = 0  # conversations of the current batch, the ones done before included
    for index in shard:
        finished, queries = done.get(index, (set(), -1))
        if len(finished) >= queries >= 0:  # complete on disk
            slots += queries
            if slots >= batch_size:  # the current batch ends inside this record
                if pending:
                    yield pending
                pending, slots = [], slots % batch_size
            bar.update(1)
            continue
        try:
            record, image = _load_record(records, index, max_pixels)
        except KeySegDataError as error:
            counts["skipped"] += 1
            if len(skipped_messages) < _MAX_SKIP_MESSAGES:
                skipped_messages.append(str(error))
            bar.update(1)
            continue
        counts["records"] += 1
        issues = {name: int(value) for name, value in record.meta.get("issues", {}).items()}
        for name, value in issues.items():
            counts[f"issue:{name}"] += value
        items = _record_items(record, index, image, use_keyword, all_texts, protocol, issues)
        for item in items:
            slots += 1
            if item.ref_index not in finished:
                pending.append(item)
            if slots >= batch_size:
                if pending:
                    yield pending
                pending, slots = [], 0
        bar.update(1)
    if pending:
        yield pending


def _load_record(records: Sequence[SegRecord], index: int,
                 max_pixels: int | None) -> tuple[SegRecord, Any]:
    """``records[index]`` and its decoded RGB image (:class:`KeySegDataError` if bad)."""
    from keyseg.data.images import DEFAULT_MAX_PIXELS, load_image

    record = records[index]
    image = record.image if record.image is not None else load_image(
        record.image_path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    return record, image.convert("RGB")


def _record_items(record: SegRecord, index: int, image: Any, use_keyword: bool,
                  all_texts: bool, protocol: str, issues: dict[str, int]) -> list[_Item]:
    """The conversations scored for ``record`` (:func:`eval_conversations`), as items."""
    refs = eval_referents(record, all_texts)
    conversations = eval_conversations(record, use_keyword=use_keyword, all_texts=all_texts,
                                       protocol=protocol)
    return [_Item(index, record.sample_id, record.source, image, conv, ref,
                  conv.turns[-1].answer or "", ref_index=ref_index, queries=len(refs),
                  issues=issues)
            for (ref_index, _), (ref, conv) in zip(refs, conversations, strict=True)]


def _group_examples(items: list[_Item]) -> list[ImageExample]:
    """Consecutive conversations about the same image share one :class:`ImageExample`."""
    examples: list[ImageExample] = []
    last_index = None
    for item in items:
        if item.record_index != last_index:
            examples.append(ImageExample(image=item.image))
            last_index = item.record_index
        examples[-1].conversations.append(item.conversation)
    return examples


def _infer(model, batch, items: list[_Item], mode: str, max_new_tokens: int,
           generate_kwargs: dict) -> list[tuple[torch.Tensor, str, str | None]]:
    """Per row: ``(masks (n, H, W) logits, answer, keyword)``."""
    if mode == "teacher":
        masks = model.predict(batch)
        return [(m, item.fed_answer, item.referent.keyword if model.settings.use_keyword else None)
                for m, item in zip(masks, items, strict=True)]
    from keyseg.generation import generate

    results = generate(model, batch, max_new_tokens=max_new_tokens, **generate_kwargs)
    return [(r.masks, r.answer, r.keyword) for r in results]


def _used_prediction(pred: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` predictions scored against ``k`` targets: prediction ``i`` for target ``i``;
    missing predictions are empty (all-negative logits), extra ones dropped."""
    n_pred = int(pred.shape[0])
    if n_pred >= k:
        return pred[:k]
    filler = torch.full((k - n_pred, *pred.shape[1:]), -1.0, dtype=pred.dtype,
                        device=pred.device)
    return torch.cat([pred, filler]) if n_pred else filler


def _score(
    item: _Item,
    pred: torch.Tensor,
    answer: str,
    keyword: str | None,
    heaps: _BoundedHeaps,
) -> dict:
    """Score one conversation; returns its JSONL line (added to the totals by
    :func:`_account`, the one place rows are counted, live or read back on resume).

    ``pred``: ``(n_pred, H, W)`` logits; ``target``: ``(k, H, W)``. Prediction ``i`` is matched
    with target ``i``; missing predictions are empty (all-zero) masks, extra ones ignored.
    """
    target = np.asarray(item.conversation.target_masks)
    k, n_pred = int(target.shape[0]), int(pred.shape[0])
    used = _used_prediction(pred, k)
    if tuple(used.shape[1:]) != tuple(target.shape[1:]):
        raise KeySegDataError(
            f"{item.conversation.sample_id}: predicted masks {tuple(used.shape[1:])} do not "
            f"match the target size {tuple(target.shape[1:])}"
        )
    pairs = SegMetrics().update(used, target)
    score = sum(iou_score(i, u) for i, u in pairs) / len(pairs)
    if heaps.wants(score):
        candidate = _pending_candidate({"iou": score, "id": item.conversation.sample_id,
                                        "index": item.record_index, "ref": item.ref_index,
                                        "query": item.referent.text, "answer": answer})
        _fill_bits(candidate, used, target)
        heaps.push(candidate)
    return {
        "id": item.conversation.sample_id,
        "record": item.record_id,
        "source": item.source,
        "index": item.record_index,
        "ref": item.ref_index,
        "queries": item.queries,
        "record_issues": item.issues,
        "query": item.referent.text,
        "question": item.conversation.turns[-1].question,
        "answer": answer,
        "keyword": keyword,
        "target_keyword": item.referent.keyword,
        "difficulty": item.referent.difficulty,
        "n_target": k,
        "n_pred": n_pred,
        "no_seg": n_pred == 0,
        "I": [i for i, _ in pairs],
        "U": [u for _, u in pairs],
        "iou": score,
    }


def _account(row: dict, mode: str, metrics: SegMetrics, by_difficulty: dict[str, SegMetrics],
             counts: Counter) -> None:
    """Add one JSONL row to the totals (a scored row and a row read back count alike)."""
    metrics.update_counts(row["I"], row["U"])
    difficulty = row.get("difficulty")
    if difficulty is not None:
        by_difficulty.setdefault(difficulty, SegMetrics()).update_counts(row["I"], row["U"])
    counts["samples"] += 1
    if mode == "generate":
        k, n_pred = int(row["n_target"]), int(row["n_pred"])
        if n_pred == 0:
            counts["no_seg"] += 1
        elif n_pred < k:
            counts["fewer_seg"] += 1
        elif n_pred > k:
            counts["extra_seg"] += 1
        target_keyword = row.get("target_keyword")
        if target_keyword and target_keyword.strip():
            counts["keyword_scored"] += 1
            counts["keyword_correct"] += int(same_keyword(row.get("keyword"), target_keyword))


def _pending_candidate(row: dict) -> OverlayCandidate:
    """An overlay candidate for ``row`` without masks (filled by :func:`_fill_bits`)."""
    return OverlayCandidate(score=float(row["iou"]), sample_id=row["id"],
                            record_index=int(row["index"]), query=row["query"],
                            answer=row["answer"], shape=(0, 0, 0), pred_bits=None,
                            target_bits=None, ignore_bits=None, ref_index=int(row["ref"]))


def _fill_bits(candidate: OverlayCandidate, used: torch.Tensor, target: np.ndarray) -> None:
    """Store the bit-packed ``(k, H, W)`` prediction, target and ignore region."""
    candidate.shape = tuple(int(s) for s in target.shape)
    candidate.pred_bits = np.packbits((used > 0).cpu().numpy().reshape(-1))
    candidate.target_bits = np.packbits(((target != 0) & (target != 255)).reshape(-1))
    candidate.ignore_bits = np.packbits((target == 255).reshape(-1))


def _complete_pending(heaps: _BoundedHeaps, model, collator: Collator,
                      records: Sequence[SegRecord], mode: str, use_keyword: bool,
                      all_texts: bool, max_new_tokens: int, generate_kwargs: dict,
                      max_pixels: int | None, protocol: str) -> None:
    """Recompute the masks of kept candidates that were read back from disk (resume): at
    most ``2 n`` samples per process, one at a time. A record that no longer loads keeps no
    masks (and so no overlay); its row still counts."""
    for _, _, candidate in heaps.worst + heaps.best:
        if candidate.pred_bits is not None:
            continue
        try:
            record, image = _load_record(records, candidate.record_index, max_pixels)
        except KeySegDataError:
            continue
        items = _record_items(record, candidate.record_index, image, use_keyword, all_texts,
                              protocol, {})
        item = next(i for i in items if i.ref_index == candidate.ref_index)
        batch = collator(_group_examples([item])).to(model.device, dtype=model.dtype)
        pred = _infer(model, batch, [item], mode, max_new_tokens, generate_kwargs)[0][0]
        target = np.asarray(item.conversation.target_masks)
        _fill_bits(candidate, _used_prediction(pred, int(target.shape[0])), target)


# --------------------------------------------------------------------------- reduction


_COUNT_KEYS = ("samples", "records", "skipped", "no_seg", "fewer_seg", "extra_seg",
               "keyword_scored", "keyword_correct", "resumed_rows")


def same_keyword(decoded: str | None, target: str) -> bool:
    """A generated keyword matches its target up to case and white space."""
    return decoded is not None and " ".join(decoded.lower().split()) == " ".join(
        target.lower().split())


def _reduce_counts(counts: Counter, accelerator: Any | None) -> Counter:
    if accelerator is None or accelerator.num_processes <= 1:
        return Counter({k: int(counts[k]) for k in _COUNT_KEYS})
    local = torch.tensor([counts[k] for k in _COUNT_KEYS], dtype=torch.int64,
                         device=accelerator.device)
    total = accelerator.reduce(local, "sum").cpu().tolist()
    return Counter(dict(zip(_COUNT_KEYS, (int(v) for v in total), strict=True)))


def _reduce_issues(counts: Counter, accelerator: Any | None, world: int) -> dict[str, int]:
    """The ``"issue:NAME"`` counts as ``{NAME: count}``, summed over processes, sorted."""
    local = {k.partition(":")[2]: int(v) for k, v in counts.items() if k.startswith("issue:")}
    if world > 1:
        from accelerate.utils import gather_object

        merged: Counter = Counter()
        for part in gather_object([local]):
            merged.update(part)
        local = dict(merged)
    return {k: local[k] for k in sorted(local) if local[k]}


def _reduce_difficulty(by_difficulty: dict[str, SegMetrics], accelerator: Any | None,
                       world: int) -> dict[str, SegMetrics]:
    """Per-label accumulators summed over processes (labels may differ per process)."""
    if world <= 1:
        return by_difficulty
    from accelerate.utils import gather_object

    merged: dict[str, SegMetrics] = {}
    states = [(k, m.state_dict()) for k, m in by_difficulty.items()]
    for name, state in gather_object(states):
        part = SegMetrics()
        part.load_state_dict(state)
        merged.setdefault(name, SegMetrics()).merge(part)
    return merged


# --------------------------------------------------------------------------- rows on disk


def _part_path(final: Path, rank: int) -> Path:
    return final.with_name(f".{final.name}.part{rank}")


def _part_files(final: Path) -> list[Path]:
    """Every part file of ``final`` on disk (any process count), in rank order."""
    prefix = f".{final.name}.part"
    found = [p for p in final.parent.glob(f"{glob.escape(prefix)}*")
             if p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


#: The line that closes a batch in a part file (never in the merged file).
BATCH_END = b'{"batch_end": true}\n'


class _RowWriter:
    """Appends JSONL rows to a part file: each row one ``write`` of a whole line, flushed;
    :meth:`end_batch` appends :data:`BATCH_END` and fsyncs. Rows after the last
    ``BATCH_END`` (the batch a kill interrupted) are dropped on resume, so a resumed run
    batches exactly the conversations an uninterrupted one does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]

    def write(self, row: dict) -> None:
        self._write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    def end_batch(self) -> None:
        self._write(BATCH_END)
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _trim_to_last_batch(path: Path) -> None:
    """Cut ``path`` after its last :data:`BATCH_END` line: the rows of an interrupted batch
    and a torn last line go."""
    if not path.is_file():
        return
    keep = 0
    with open(path, "rb") as handle:
        offset = 0
        for line in handle:
            offset += len(line)
            if line == BATCH_END:
                keep = offset
    if keep != path.stat().st_size:
        os.truncate(path, keep)


def _iter_rows(path: Path, batched: bool = False) -> Iterator[tuple[int, int, dict, int, int]]:
    """``(index, ref, row, offset, length)`` of every complete row of a JSONL file; a torn
    last line (no newline: a kill mid-write) is skipped. ``batched`` (part files): only rows
    followed by a :data:`BATCH_END` line count.

    Raises:
        KeySegDataError: a complete line that is not a row of this format (names the file
            and line).
    """
    offset = 0
    held: list[tuple[int, int, dict, int, int]] = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                return  # torn last line
            if line == BATCH_END:
                yield from held
                held = []
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (int(row["index"]), int(row["ref"]))
                int(row["queries"])
            except (ValueError, KeyError, TypeError) as error:
                raise KeySegDataError(
                    f"{path}:{number}: not an evaluation row of this keyseg version ({error}); "
                    "start over with --overwrite (or another --out)"
                ) from error
            held.append((key[0], key[1], row, start, len(line)))
            if not batched:
                yield from held
                held = []


def _rows_on_disk(final: Path, rank: int, world: int, total: int) -> list[dict]:
    """The rows of this process's shard (``index % world == rank``, ``index < total``)
    found in the merged file and every part file, each ``(index, ref)`` once, in record
    order."""
    found: dict[tuple[int, int], dict] = {}
    sources = ([final] if final.is_file() else []) + _part_files(final)
    for path in sources:
        for index, ref, row, _, _ in _iter_rows(path, batched=path != final):
            if index < total and index % world == rank:
                found.setdefault((index, ref), row)
    return [found[key] for key in sorted(found)]


def _done_map(rows: list[dict]) -> tuple[dict[int, tuple[set[int], int]], int]:
    """``{record index: (referent indices done, queries of the record)}`` and the number
    of records whose every query is done."""
    done: dict[int, tuple[set[int], int]] = {}
    for row in rows:
        refs, _ = done.setdefault(int(row["index"]), (set(), int(row["queries"])))
        refs.add(int(row["ref"]))
    complete = sum(1 for refs, queries in done.values() if len(refs) >= queries)
    return done, complete


def _discard_previous(final: Path, rank: int, world: int, accelerator: Any | None) -> None:
    """Start over: empty this process's part; the main process also removes the merged
    file and parts of ranks this run does not have."""
    _part_path(final, rank).unlink(missing_ok=True)
    if rank == 0:
        final.unlink(missing_ok=True)
        for path in _part_files(final):
            if int(path.name.rsplit("part", 1)[1]) >= world:
                path.unlink(missing_ok=True)
    if world > 1:
        accelerator.wait_for_everyone()


def _merge_jsonl(final: Path, rank: int, world: int, accelerator: Any | None) -> None:
    """Merge the previous merged file and every part into ``final`` on the main process:
    rows in record order (``index``, ``ref``), each once; then remove the parts.

    Only ``(index, ref)`` keys and file offsets are held in memory, not the rows.
    """
    if world > 1:
        accelerator.wait_for_everyone()
    if rank == 0:
        sources = ([final] if final.is_file() else []) + _part_files(final)
        where: dict[tuple[int, int], tuple[int, int, int]] = {}
        for number, path in enumerate(sources):
            for index, ref, _, offset, length in _iter_rows(path, batched=path != final):
                where.setdefault((index, ref), (number, offset, length))
        tmp = final.with_name(f".{final.name}.tmp")
        handles = [open(path, "rb") for path in sources]  # noqa: SIM115 (closed below)
        try:
            with open(tmp, "wb") as out:
                for key in sorted(where):
                    number, offset, length = where[key]
                    handles[number].seek(offset)
                    out.write(handles[number].read(length))
                out.flush()
                os.fsync(out.fileno())
        finally:
            for handle in handles:
                handle.close()
        os.replace(tmp, final)
        for path in _part_files(final):
            path.unlink(missing_ok=True)
    if world > 1:
        accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- reports


def recompute_from_jsonl(path: str | os.PathLike) -> dict[str, float | int]:
    """gIoU / cIoU recomputed from a per-sample JSONL (checks a report's numbers)."""
    metrics = SegMetrics()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                metrics.update_counts(row["I"], row["U"])
    return metrics.compute()


def save_overlays(
    candidates: dict[str, list[OverlayCandidate]],
    records: Sequence[SegRecord],
    out_dir: str | os.PathLike,
    max_pixels: int | None = None,
) -> list[Path]:
    """Render the kept candidates as PNGs: the image with the prediction in red, the target
    outline in green and ignored pixels darkened; ``index.json`` lists them.

    Returns:
        the written PNG paths.
    """
    from PIL import Image

    from keyseg.data.images import DEFAULT_MAX_PIXELS, load_image
    from keyseg.io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    written: list[Path] = []
    index: list[dict] = []
    for kind, items in candidates.items():
        for rank, cand in enumerate(items):
            record = records[cand.record_index]
            image = record.image if record.image is not None else load_image(
                record.image_path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
            pred, target, ignore = cand.masks()
            canvas = render_overlay(np.asarray(image.convert("RGB")), pred.any(0),
                                    target.any(0), ignore.any(0))
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in cand.sample_id)
            path = out / f"{kind}_{rank:03d}_iou{cand.score:.3f}_{safe[-80:]}.png"
            buffer = io.BytesIO()
            Image.fromarray(canvas).save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())
            written.append(path)
            index.append({"file": path.name, "kind": kind, "rank": rank, "iou": cand.score,
                          "id": cand.sample_id, "query": cand.query, "answer": cand.answer})
    if index:
        atomic_write_json(out / "index.json", index)
    return written


def render_overlay(image: np.ndarray, pred: np.ndarray, target: np.ndarray,
                   ignore: np.ndarray | None = None) -> np.ndarray:
    """``image (H, W, 3)`` uint8 with ``pred (H, W)`` tinted red, the outline of
    ``target (H, W)`` in green and ``ignore (H, W)`` darkened -> ``(H, W, 3)`` uint8."""
    out = image.astype(np.float32)
    if ignore is not None:
        out[ignore] *= 0.4
    red = np.array([255.0, 40.0, 40.0])
    out[pred] = 0.5 * out[pred] + 0.5 * red
    edge = target & ~(_erode(target))
    out[edge] = np.array([40.0, 255.0, 40.0])
    return np.clip(out, 0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outline = mask minus its erosion)."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
            & padded[1:-1, :-2] & padded[1:-1, 2:])


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


__all__ = [
    "MODES",
    "EvalResult",
    "OverlayCandidate",
    "eval_conversations",
    "eval_question",
    "eval_referents",
    "format_issues",
    "format_metrics",
    "lisa_metric_target",
    "recompute_from_jsonl",
    "render_overlay",
    "run_evaluation",
    "save_overlays",
    "teacher_answer",
]
