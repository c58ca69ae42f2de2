"""Evaluation: gIoU / cIoU of a KeySeg model over a split, streamed, batched, distributed.

Two modes (``docs/EVALUATION.md`` compares them with LISA / KeySeg / VisionReasoner):

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

Inputs (:mod:`keyseg.evaluate.inputs`, :func:`eval_question`): LISA's validation user
message for ReasonSeg and refCOCO/+/g, the training wording for the procedural world.
Protocols (``EvalConfig.protocol``, :data:`keyseg.data.eval_sets.PROTOCOLS`): ``lisa`` scores
the targets as read; ``lisa-bugs`` (with records read under it) scores them as LISA's metric
does. The records' ``meta["issues"]`` (dropped or degenerate annotations) are summed into the
result's ``issues``.

Memory does not grow with the split: the totals are a few numbers
(:mod:`keyseg.evaluate.totals`), per-sample rows go to a JSONL file as they are produced
(:mod:`keyseg.evaluate.rows`), overlay candidates live in two bounded heaps
(:mod:`keyseg.evaluate.overlays`). With an Accelerate ``accelerator``, records are sharded by
process index, counts are summed exactly across processes and the per-process JSONL files
are merged by the main process.

Resume: a kill loses at most the batch in flight. With ``resume=True`` the rows already on
disk (part files of any earlier run, whatever its process count, and a merged file) are
accounted first, in record order, exactly as if they had just been scored; only the missing
queries are run, in the batches an uninterrupted run would form
(:mod:`keyseg.evaluate.batches`). The totals, and so the report, equal an uninterrupted
run's (same process count: bit for bit; with another process count the float ``sum_iou``
may differ in its last bits).

Modules, in the order data flows through them: ``inputs`` (what is fed), ``batches``
(records -> batches), ``scoring`` (a batch through the model, a row per conversation),
``totals`` (sums, keyword accuracy, reduction), ``rows`` (the rows on disk), ``overlays``,
``report`` (the result and its one-line summaries), ``loop`` (:func:`run_evaluation`).
"""

from __future__ import annotations

from typing import get_args

from keyseg.config import EvalConfig, EvalMode
from keyseg.evaluate.inputs import (
    LISA_SOURCES,
    LOWERCASE_SOURCES,
    PARAPHRASE_SOURCES,
    PHRASE_QUESTION,
    SENTENCE_QUESTION,
    eval_conversations,
    eval_question,
    eval_referents,
    lisa_metric_target,
    teacher_answer,
)
from keyseg.evaluate.loop import run_evaluation
from keyseg.evaluate.overlays import OverlayCandidate, save_overlays
from keyseg.evaluate.report import EvalResult, format_issues, format_metrics, recompute_from_jsonl
from keyseg.evaluate.rows import BATCH_END
from keyseg.evaluate.rows import RowWriter as _RowWriter  # noqa: F401 (patched by kill tests)
from keyseg.evaluate.totals import same_keyword
from keyseg.visualize import render_overlay

Mode = EvalMode
MODES: tuple[str, ...] = get_args(EvalMode)

__all__ = [
    "BATCH_END",
    "LISA_SOURCES",
    "LOWERCASE_SOURCES",
    "MODES",
    "PARAPHRASE_SOURCES",
    "PHRASE_QUESTION",
    "SENTENCE_QUESTION",
    "EvalConfig",
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
    "same_keyword",
    "save_overlays",
    "teacher_answer",
]
