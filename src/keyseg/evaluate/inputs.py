"""What an evaluation feeds the model: LISA's questions, the fed answer, the scored targets.

ReasonSeg and refCOCO/+/g are fed LISA's validation user message, ``"<image>\\n {sent}
Please output segmentation mask."`` (sentences) or ``"<image>\\n What is {phrase} in this
image? Please output segmentation mask."`` (phrases; refCOCO sentences are lower-cased as
LISA does, ReasonSeg keeps the case); the procedural world keeps its training wording.
ReasonSeg records use their first text unless ``all_texts``; every other record (refCOCO/+/g:
every sentence of every ref; shapes) uses all referents.

Under ``protocol="lisa-bugs"`` the targets are scored as LISA's metric sees them: only the
value 1 is foreground, so the 2 of LISA's summed overlapping polygons is dropped.
"""

from __future__ import annotations

import numpy as np

from keyseg import tokens
from keyseg.data.collate import Conversation
from keyseg.data.sample import Referent, SegRecord

#: LISA's validation question wording (deterministic: no template sampling in evaluation).
SENTENCE_QUESTION = tokens.LONG_QUESTIONS[1]  # "{sent} Please output segmentation mask."
PHRASE_QUESTION = tokens.SHORT_QUESTIONS[3]  # "What is {class_name} in this image? ..."
#: Sources whose referents are paraphrases of one query (only the first is used by default).
PARAPHRASE_SOURCES: frozenset[str] = frozenset({"reason_seg"})
#: LISA's validation sets: fed LISA's validation user message (:func:`eval_question`).
LISA_SOURCES: frozenset[str] = frozenset({"reason_seg", "refcoco", "refcoco+", "refcocog"})
#: Sources whose queries LISA lower-cases (its REFER sentences).
LOWERCASE_SOURCES: frozenset[str] = frozenset({"refcoco", "refcoco+", "refcocog"})


def eval_question(referent: Referent, source: str | None = None) -> str:
    """The deterministic question for a referent of ``source`` (a record's ``source``).

    For LISA's validation sets (:data:`LISA_SOURCES`) it is exactly what LISA's validation
    puts after ``"<image>\\n"``: a space, then the sentence or phrase template around the
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


__all__ = [
    "LISA_SOURCES",
    "LOWERCASE_SOURCES",
    "PARAPHRASE_SOURCES",
    "PHRASE_QUESTION",
    "SENTENCE_QUESTION",
    "eval_conversations",
    "eval_question",
    "eval_referents",
    "lisa_metric_target",
    "teacher_answer",
]
