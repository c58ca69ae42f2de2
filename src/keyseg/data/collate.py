"""From reader records to the model's :class:`keyseg.batch.Batch`.

Two steps: :func:`record_to_example` turns a :class:`SegRecord` into conversations (question
and answer templates, ``[KEY] keyword``, explanatory answers), and :class:`Collator` tokenises,
pads and stacks them. Training batches are teacher-forced (labels on assistant tokens);
``mode="prompt"`` batches end at ``ASSISTANT:`` for generation while keeping the targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from keyseg import tokens
from keyseg.batch import Batch
from keyseg.data.images import load_image
from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegInputError
from keyseg.processor import KeySegProcessor


@dataclass
class Conversation:
    """One conversation row: its turns, the masks of its ``[SEG]`` tokens, an id."""

    turns: list[tokens.Turn]
    target_masks: np.ndarray | None  # (n_seg, H, W) uint8 {0, 1, 255}
    sample_id: str
    keyword: str | None = None
    difficulty: str | None = None
    text_only: bool = False  # a visual-QA turn: no [SEG], no masks (Referent.text_only)


@dataclass
class ImageExample:
    """An image and the conversations about it (they share one SAM embedding)."""

    image: Image.Image
    conversations: list[Conversation] = field(default_factory=list)


def record_to_example(
    record: SegRecord,
    rng: random.Random,
    *,
    use_keyword: bool = True,
    explanatory: float = 0.0,
    max_referents: int | None = None,
    max_pixels: int | None = None,
) -> ImageExample:
    """Build conversations for (up to ``max_referents`` randomly chosen) referents.

    A text-only referent (visual QA) keeps its question and answer verbatim; a referent with
    an ``answer`` holding ``[SEG]`` tokens uses it verbatim (procedural data); an explanatory
    answer without ``[SEG]`` is used with probability ``explanatory`` behind a
    template answer (SPEC §4); otherwise a template answer with one ``[SEG]`` per mask.
    """
    image = record.image if record.image is not None else load_image(record.image_path,
                                                                      max_pixels=max_pixels)
    referents = list(enumerate(record.referents))
    if max_referents is not None and len(referents) > max_referents:
        referents = sorted(rng.sample(referents, max_referents))
    conversations = []
    for index, ref in referents:
        num_masks = int(ref.masks.shape[0])
        # drawn for every referent (a text-only one discards it), so that the templates of
        # the other rows do not depend on where text-only rows sit
        question = tokens.format_question(ref.text, ref.is_sentence, rng)
        if ref.text_only:
            question, answer = ref.text, ref.answer or ""
        elif ref.answer and tokens.SEG_TOKEN in ref.answer:
            answer = ref.answer
        elif ref.answer and rng.random() < explanatory:
            question = f"{question} {rng.choice(tokens.EXPLANATORY_QUESTIONS)}"
            answer = f"{tokens.format_answer(num_masks, rng)} {ref.answer.strip()}"
        else:
            answer = tokens.format_answer(num_masks, rng)
        if use_keyword and not ref.text_only:
            answer = tokens.with_keyword(answer, ref.keyword)
        conversations.append(
            Conversation(
                turns=[tokens.Turn(question, answer)],
                target_masks=ref.masks,
                sample_id=f"{record.source}/{record.sample_id}#{index}",
                keyword=ref.keyword,
                difficulty=ref.difficulty,
                text_only=ref.text_only,
            )
        )
    return ImageExample(image=image, conversations=conversations)


class Collator:
    """Tokenise, pad and stack :class:`ImageExample` s into a :class:`Batch`.

    Args:
        processor: the model's processor (tokenizer, image processors, format).
        mode: ``"train"`` (teacher-forced, labels set, every row must hold as many ``[SEG]``
            as it has target masks, none in a text-only row) or ``"prompt"`` (the last
            answer is removed: the row ends at ``ASSISTANT:`` for generation; targets are
            kept for scoring).
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
    """

    def __init__(
        self,
        processor: KeySegProcessor,
        mode: Literal["train", "prompt"] = "train",
        padding_side: Literal["left", "right"] | None = None,
    ) -> None:
        self.processor = processor
        self.mode = mode
        self.padding_side = padding_side or ("right" if mode == "train" else "left")

    def __call__(self, examples: list[ImageExample]) -> Batch:
        ids = self.processor.ids
        rows_ids, rows_labels, row_vision, image_index = [], [], [], []
        masks, sample_ids, sam_pixels, resized, original = [], [], [], [], []
        for image_number, example in enumerate(examples):
            prepared = self.processor.prepare_image(example.image)
            sam_pixels.append(prepared.sam.pixel_values)
            resized.append(prepared.sam.resized_size)
            original.append(prepared.sam.original_size)
            for conv in example.conversations:
                turns = list(conv.turns)
                if self.mode == "prompt":
                    turns[-1] = tokens.Turn(turns[-1].question, None)
                encoded = self.processor.encode(turns, prepared.num_image_tokens)
                if self.mode == "train":
                    self._check_targets(encoded.input_ids, conv, ids.seg)
                rows_ids.append(encoded.input_ids)
                rows_labels.append(encoded.labels)
                row_vision.append(prepared.vision_inputs)
                image_index.append(image_number)
                sample_ids.append(conv.sample_id)
                if conv.target_masks is not None:
                    masks.append(torch.from_numpy(np.ascontiguousarray(conv.target_masks)))
        if not rows_ids:
            raise KeySegInputError("cannot collate a batch without conversations")
        input_ids, attention_mask = self._pad(rows_ids, ids.pad)
        labels, _ = self._pad(rows_labels, tokens.IGNORE_INDEX)
        vision_inputs = {
            key: torch.cat([v[key] for v in row_vision], dim=0) for key in row_vision[0]
        }
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels if self.mode == "train" else None,
            vision_inputs=vision_inputs,
            sam_pixel_values=torch.stack(sam_pixels),
            image_index=torch.tensor(image_index, dtype=torch.long),
            resized_sizes=resized,
            original_sizes=original,
            target_masks=masks if len(masks) == len(rows_ids) else None,
            sample_ids=sample_ids,
        )

    @staticmethod
    def _check_targets(input_ids: torch.Tensor, conv: Conversation, seg_id: int) -> None:
        num_seg = int((input_ids == seg_id).sum())
        if conv.text_only:
            if num_seg or (conv.target_masks is not None and conv.target_masks.shape[0]):
                raise KeySegInputError(
                    f"{conv.sample_id}: a text-only (visual QA) row has no {tokens.SEG_TOKEN} "
                    f"and no target masks; got {num_seg} {tokens.SEG_TOKEN} "
                    f"(answer: {conv.turns[-1].answer!r})"
                )
            return
        if num_seg == 0:
            raise KeySegInputError(
                f"{conv.sample_id}: training answer has no {tokens.SEG_TOKEN} token "
                f"(answer: {conv.turns[-1].answer!r})"
            )
        num_masks = 0 if conv.target_masks is None else int(conv.target_masks.shape[0])
        if num_seg != num_masks:
            raise KeySegInputError(
                f"{conv.sample_id}: answer has {num_seg} {tokens.SEG_TOKEN} but "
                f"{num_masks} target masks"
            )

    def _pad(self, rows: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad 1-D rows to ``(B, L_max)``; returns (padded, attention_mask)."""
        length = max(row.shape[0] for row in rows)
        padded = torch.full((len(rows), length), value, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = row.shape[0]
            if self.padding_side == "right":
                padded[i, :n], attention[i, :n] = row, 1
            else:
                padded[i, length - n :], attention[i, length - n :] = row, 1
        return padded, attention
