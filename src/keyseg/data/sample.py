"""The record every dataset reader yields: one image and the queries asked about it.

Readers (ReasonSeg, REFER, the procedural shapes world) produce :class:`SegRecord`; the
prompt templates and tokenisation happen later (``keyseg.data.collate``), so a reader knows
nothing about the model or the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Referent:
    """One query about an image and what it refers to.

    Attributes:
        text: the raw query: a sentence ("What could you eat soup with?") or a phrase /
            class name ("man in red shirt").
        is_sentence: True for full-sentence (reasoning) queries, False for phrases; chooses
            the question template family (SPEC §1).
        masks: ``(k, H, W)`` uint8 targets, values {0, 1, 255 = ignore}; one mask per
            ``[SEG]`` the answer should contain (``k == 1`` for ReasonSeg/refCOCO, ``k > 1``
            for multi-target queries; an all-zero mask is a valid "nothing matches" target).
        keyword: the query's core concept ("spoon"); ``None`` when unknown (no ``[KEY]``).
        answer: either a full answer holding ``k`` ``[SEG]`` tokens (used verbatim, e.g. the
            procedural world), or an explanation without ``[SEG]`` (ReasonSeg's explanatory
            outputs; collation puts a template ``[SEG]`` answer before it), or ``None`` to let
            the templates choose the whole answer.
        difficulty: free label for breakdowns ("direct", "relational", "indirect", ...).
        text_only: a visual-QA turn, as the reference's VQA data: ``text`` is the question
            and ``answer`` the reply, both used verbatim; no ``[SEG]``, no ``[KEY]``, and
            ``masks`` is ``(0, H, W)``. It trains the language model's cross-entropy only.
    """

    text: str
    is_sentence: bool
    masks: np.ndarray
    keyword: str | None = None
    answer: str | None = None
    difficulty: str | None = None
    text_only: bool = False


@dataclass
class SegRecord:
    """One image and the referents asked about it.

    Exactly one of ``image_path`` / ``image`` is set: readers of files give a path (loaded
    lazily and safely by ``keyseg.data.images.load_image``); procedural data gives a PIL
    image directly.
    """

    sample_id: str
    source: str
    referents: list[Referent]
    image_path: Path | None = None
    image: Image.Image | None = None
    meta: dict = field(default_factory=dict)
