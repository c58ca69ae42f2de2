"""Records -> conversations -> batches: lazy loading, skipped records, resume-aware slots.

A batch holds ``batch_size`` conversations of consecutive records of this process's shard.
On resume, the conversations already on disk keep their places in the batches (they are
just not run), so a resumed run forms exactly the batches of an uninterrupted one: same
padding, same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from keyseg.data.collate import Conversation, ImageExample
from keyseg.data.sample import Referent, SegRecord
from keyseg.errors import KeySegDataError
from keyseg.evaluate.inputs import eval_conversations, eval_referents
from keyseg.evaluate.rows import DoneMap
from keyseg.evaluate.totals import Totals

#: Error messages of skipped records kept (per process, and after gathering).
MAX_SKIP_MESSAGES = 20


@dataclass
class EvalItem:
    """One conversation waiting for its batch.

    Attributes:
        record_index: index of the record in the evaluated sequence.
        record_id / source: the record's ``sample_id`` and ``source``.
        image: the decoded RGB image.
        conversation: question, fed answer and target ``(k, H, W)``.
        referent: the referent asked about; ``ref_index`` its index in the record.
        fed_answer: the teacher answer (``teacher`` mode).
        queries: conversations scored for this record (a resume knows a record is complete).
        issues: the record's ``meta["issues"]``.
    """

    record_index: int
    record_id: str
    source: str
    image: Any
    conversation: Conversation
    referent: Referent
    fed_answer: str
    ref_index: int = 0
    queries: int = 1
    issues: dict[str, int] = field(default_factory=dict)


def load_record(records: Sequence[SegRecord], index: int,
                max_pixels: int | None) -> tuple[SegRecord, Any]:
    """``records[index]`` and its decoded RGB image (:class:`KeySegDataError` if bad)."""
    from keyseg.data.images import DEFAULT_MAX_PIXELS, load_image

    record = records[index]
    image = record.image if record.image is not None else load_image(
        record.image_path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    return record, image.convert("RGB")


def record_items(record: SegRecord, index: int, image: Any, use_keyword: bool,
                 all_texts: bool, protocol: str, issues: dict[str, int]) -> list[EvalItem]:
    """The conversations scored for ``record`` (:func:`eval_conversations`), as items."""
    refs = eval_referents(record, all_texts)
    conversations = eval_conversations(record, use_keyword=use_keyword, all_texts=all_texts,
                                       protocol=protocol)
    return [EvalItem(index, record.sample_id, record.source, image, conv, ref,
                     conv.turns[-1].answer or "", ref_index=ref_index, queries=len(refs),
                     issues=issues)
            for (ref_index, _), (ref, conv) in zip(refs, conversations, strict=True)]


def iter_batches(
    records: Sequence[SegRecord],
    shard: range,
    *,
    batch_size: int,
    use_keyword: bool,
    all_texts: bool,
    protocol: str,
    max_pixels: int | None,
    totals: Totals,
    skipped_messages: list[str],
    bar: Any,
    done: DoneMap | None = None,
) -> Iterator[list[EvalItem]]:
    """Load records of the shard lazily and yield lists of ``batch_size`` conversations.

    A record that fails to load (:class:`KeySegDataError`: truncated image, bad annotation)
    is counted as ``skipped`` in ``totals`` and left out (its first messages go to
    ``skipped_messages``); a loaded record is counted in ``records`` and its
    ``meta["issues"]`` added (:meth:`Totals.add_issues`). ``done``
    maps a record index to the referent indices already scored and the record's number of
    queries (resume): those are left out, and a record whose every query is done is not
    even loaded (its issues were counted from its rows). They still take their places in
    the batches. ``bar`` (a progress bar) advances by one per record.
    """
    done = done or {}
    pending: list[EvalItem] = []
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
            record, image = load_record(records, index, max_pixels)
        except KeySegDataError as error:
            totals.counts["skipped"] += 1
            if len(skipped_messages) < MAX_SKIP_MESSAGES:
                skipped_messages.append(str(error))
            bar.update(1)
            continue
        totals.counts["records"] += 1
        issues = {name: int(value) for name, value in record.meta.get("issues", {}).items()}
        totals.add_issues(issues)
        for item in record_items(record, index, image, use_keyword, all_texts, protocol,
                                 issues):
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


def group_examples(items: list[EvalItem]) -> list[ImageExample]:
    """Consecutive conversations about the same image share one :class:`ImageExample`."""
    examples: list[ImageExample] = []
    last_index = None
    for item in items:
        if item.record_index != last_index:
            examples.append(ImageExample(image=item.image))
            last_index = item.record_index
        examples[-1].conversations.append(item.conversation)
    return examples
