"""Answer generation with masks: HF ``generate`` (KV cache) + the states it already computed.

With the reference ``hidden_state="before"`` choice, the state representing ``[SEG]`` is the
one that *predicted* it, which ``generate`` has already computed; so masks come from the
generation pass itself, with no second forward over the answer. (``"at"`` needs the state of
the ``[SEG]`` token itself; when that is the very last generated token one extra forward is
run.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keyseg import tokens
from keyseg.batch import Batch


@dataclass
class GenerationResult:
    """One generated answer and its masks.

    Attributes:
        answer: decoded answer text, ``[SEG]``/``[KEY]`` kept.
        output_ids: ``(T,)`` generated ids (prompt excluded, cut after end-of-sequence).
        keyword: text following the first ``[KEY]`` (None if the answer has no ``[KEY]``).
        masks: ``(n_seg, H, W)`` mask logits at the original image size (``n_seg`` may be 0).
        scores: ``(n_seg,)`` SAM's predicted IoU per mask.
        key_embeddings: ``(n_key, d)`` projected ``[KEY]`` embeddings (for explanations).
    """

    answer: str
    output_ids: torch.Tensor
    keyword: str | None
    masks: torch.Tensor
    scores: torch.Tensor
    key_embeddings: torch.Tensor


def decode_keyword(processor, ids: torch.Tensor) -> str | None:
    """Text after the first ``[KEY]`` in ``ids: (T,)``, or None without ``[KEY]``."""
    keywords = tokens.keyword_token_ids(ids, processor.ids)
    if not keywords:
        return None
    return processor.tokenizer.decode(keywords[0], skip_special_tokens=True).strip()


@torch.no_grad()
def generate(
    model,
    batch: Batch,
    image_embeddings: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    *,
    answer_only: bool = False,
    **generate_kwargs,
) -> list[GenerationResult]:
    """Generate an answer per row of a prompt batch and decode a mask per ``[SEG]``.

    Args:
        model: a :class:`~keyseg.model.keyseg.KeySegModel`.
        batch: a ``mode="prompt"`` batch (left-padded, ending at ``ASSISTANT:``).
        image_embeddings: ``(N_img, C, h, w)`` precomputed SAM embeddings of
            ``batch.sam_pixel_values`` (reuse across turns/queries); computed if None.
        max_new_tokens: generation budget; other ``generate`` options pass through
            (greedy with KV cache by default; ``use_cache=False`` is the naive path).
        answer_only: take masks/keys only from the ``[SEG]``/``[KEY]`` tokens *generated*
            now, not from those in the prompt (earlier turns of a multi-turn chat, or a
            literal ``[SEG]`` typed into a query).

    Returns:
        One :class:`GenerationResult` per row.
    """
    processor = model.processor
    ids = processor.ids
    if image_embeddings is None:
        image_embeddings = model.encode_images(batch.sam_pixel_values)
    options = {"do_sample": False, "num_beams": 1, "use_cache": True,
               # the image placeholder is not a class of the reference vocabulary
               "suppress_tokens": list(model.non_output_ids), **generate_kwargs}
    out = model.backbone.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        output_hidden_states=True,
        return_dict_in_generate=True,
        **batch.vision_inputs,
        **options,
    )
    # Step 0 holds the prompt's states, each later step one new token's: together the
    # last-layer states of every position but the final generated token. (Without a KV
    # cache each later step re-runs the whole sequence: its newest position is the one to keep.)
    last_hidden = torch.cat(
        [out.hidden_states[0][-1], *(step[-1][:, -1:] for step in out.hidden_states[1:])], dim=1
    )
    prompt_length = batch.input_ids.shape[1]
    results = []
    for row in range(batch.input_ids.shape[0]):
        generated = out.sequences[row, prompt_length:]
        stop = (generated == ids.eos).nonzero()
        if len(stop):
            generated = generated[: int(stop[0]) + 1]
        sequence = out.sequences[row, : prompt_length + generated.shape[0]]
        hidden = last_hidden[row]
        if hidden.shape[0] < sequence.shape[0] and _needs_last_state(model, sequence):
            hidden = _full_forward_hidden(model, batch, row, sequence)
        image = int(batch.image_index[row])
        # "before" reads the state preceding a token, so keep the prompt's last position.
        start = prompt_length - 1 if answer_only else 0
        masks, scores, key = model.masks_from_hidden(
            sequence[start:], hidden[start : sequence.shape[0]], image_embeddings[image],
            batch.resized_sizes[image], batch.original_sizes[image],
            keys=model.config.fusion.generation_keys,
        )
        results.append(
            GenerationResult(
                answer=processor.decode(generated),
                output_ids=generated,
                keyword=decode_keyword(processor, generated),
                masks=masks,
                scores=scores,
                key_embeddings=key,
            )
        )
    return results


def _needs_last_state(model, sequence: torch.Tensor) -> bool:
    """True when ``hidden_state="at"`` and the last token is ``[SEG]``/``[KEY]``."""
    if model.config.backbone.hidden_state != "at":
        return False
    return int(sequence[-1]) in (model.processor.ids.seg, model.processor.ids.key)


def _full_forward_hidden(model, batch: Batch, row: int, sequence: torch.Tensor) -> torch.Tensor:
    vision = model.backbone.row_vision_inputs(batch.vision_inputs, row)
    attention = torch.ones_like(sequence)[None]
    pad = batch.attention_mask[row] == 0
    attention[0, : pad.shape[0]][pad] = 0
    return model.backbone(sequence[None], attention, vision).last_hidden[0]
