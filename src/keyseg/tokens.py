"""Special tokens, the LLaVA-v1 conversation format and the question/answer templates.

A conversation is rendered to one string, tokenised once with character offsets, and the
labels are derived from the character spans of the assistant turns — so label masking does
not depend on how a tokenizer treats piece boundaries. The single image placeholder token is
then expanded to the backbone's image-token count, which is why ``[SEG]``/``[KEY]`` positions
are always read from the final ids (never from a fixed offset such as LISA's 255).

Format (SPEC §1, llava_v1)::

    {system} USER: <image>\\n{question} ASSISTANT: {answer} [KEY] {keyword}</s>
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from keyseg.errors import KeySegInputError

SEG_TOKEN = "[SEG]"
KEY_TOKEN = "[KEY]"
IGNORE_INDEX = -100
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"

# --- templates (SPEC §1) ----------------------------------------------------------------
SHORT_QUESTIONS = (
    "Can you segment the {class_name} in this image?",
    "Please segment the {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",
)
LONG_QUESTIONS = (
    "{sent} Please respond with segmentation mask.",
    "{sent} Please output segmentation mask.",
)
EXPLANATORY_QUESTIONS = (
    "Please output segmentation mask and explain why.",
    "Please output segmentation mask and explain the reason.",
    "Please generate a segmentation mask and explain why.",
)
ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
MULTI_ANSWERS = (
    "They are {segs}.",
    "Sure, {segs}.",
    "Sure, they are {segs}.",
    "Sure, the segmentation results are {segs}.",
)


def format_question(text: str, is_sentence: bool, rng: random.Random) -> str:
    """Wrap a raw query in a question template (sentence or class-name family)."""
    if is_sentence:
        return rng.choice(LONG_QUESTIONS).format(sent=text.strip())
    return rng.choice(SHORT_QUESTIONS).format(class_name=text.strip().lower())


def format_answer(num_masks: int, rng: random.Random) -> str:
    """A template answer with ``num_masks`` ``[SEG]`` tokens (``num_masks >= 1``)."""
    if num_masks <= 1:
        return rng.choice(ANSWERS)
    segs = ", ".join([SEG_TOKEN] * (num_masks - 1)) + f" and {SEG_TOKEN}"
    return rng.choice(MULTI_ANSWERS).format(segs=segs)


def with_keyword(answer: str, keyword: str | None) -> str:
    """Append `` [KEY] {keyword}`` at the end of the assistant turn (SPEC §1)."""
    if not keyword:
        return answer
    return f"{answer.rstrip()} {KEY_TOKEN} {keyword.strip()}"


def tidy_spacing(text: str) -> str:
    """Readable spacing around ``[SEG]``/``[KEY]`` in decoded text: one space before and
    after each, none before punctuation. Under the ``"lisa"`` convention the tokens absorb
    the whitespace around them, so a byte-level tokenizer decodes "is[SEG].[KEY]apple";
    this gives "is [SEG]. [KEY] apple". Re-encoding the result gives the same ids."""
    text = re.sub(r"\s*(\[SEG\]|\[KEY\])\s*", r" \1 ", text)
    text = re.sub(r" +([.,;:!?])", r"\1", text)
    return re.sub(r" {2,}", " ", text).strip()


# --- special tokens ---------------------------------------------------------------------
@dataclass(frozen=True)
class SpecialTokenIds:
    seg: int
    key: int
    image: int
    eos: int
    pad: int
    im_start: int | None = None
    im_end: int | None = None


def add_special_tokens(tokenizer, image_token: str = "<image>",
                       use_im_start_end: bool = False, strip_spaces: bool = True) -> list[str]:
    """Register ``[SEG]``, ``[KEY]`` and the image placeholder(s) with ``tokenizer``.

    ``strip_spaces`` (``BackboneConfig.convention == "lisa"``): ``[SEG]``, ``[KEY]``,
    ``<im_start>`` and ``<im_end>`` absorb the whitespace on both sides, as the added tokens
    of the slow LLaMA tokenizer LISA trained with did, so no lone space piece ever stands
    next to them. The image placeholder itself never strips: LISA cuts the prompt at
    ``<image>`` and tokenises each part on its own, which keeps the whitespace around it.
    Without ``strip_spaces`` (convention ``"v0"``) the tokens are plain added tokens.

    Tokens the tokenizer already has keep their ids (a LISA tokenizer's ``[SEG]``); their
    whitespace handling is set as above, except for the tokenizer's own special tokens (such
    as Qwen's ``<|image_pad|>``), which are left as they are. Returns the tokens that were
    new; the caller resizes the embeddings (:func:`resize_embeddings`).
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    wanted = [SEG_TOKEN, KEY_TOKEN, image_token]
    if use_im_start_end:
        wanted += [IM_START_TOKEN, IM_END_TOKEN]
    own_special = {str(t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    new = [t for t in wanted if t not in vocab]
    register = [
        # Added (not "special") so that decode() keeps [SEG]/[KEY] in the answer text;
        # "v0" tokens were registered normalised, as plain strings are.
        AddedToken(t, lstrip=strip, rstrip=strip, normalized=not strip_spaces, special=False)
        for t in wanted
        if t not in own_special
        for strip in [strip_spaces and t != image_token]
    ]
    if register:
        tokenizer.add_tokens(register)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return new


def special_token_ids(tokenizer, image_token: str = "<image>",
                      use_im_start_end: bool = False) -> SpecialTokenIds:
    vocab = tokenizer.get_vocab()
    missing = [t for t in (SEG_TOKEN, KEY_TOKEN, image_token) if t not in vocab]
    if missing:
        raise KeySegInputError(
            f"tokenizer lacks {', '.join(missing)}; call keyseg.tokens.add_special_tokens first"
        )
    return SpecialTokenIds(
        seg=vocab[SEG_TOKEN],
        key=vocab[KEY_TOKEN],
        image=vocab[image_token],
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        im_start=vocab.get(IM_START_TOKEN) if use_im_start_end else None,
        im_end=vocab.get(IM_END_TOKEN) if use_im_start_end else None,
    )


def resize_embeddings(model: torch.nn.Module, tokenizer, init_from_mean: bool = True,
                      new_token_ids: Sequence[int] = ()) -> None:
    """Resize the LM's input and output embeddings to ``len(tokenizer)``.

    Rows added here, and the rows of ``new_token_ids`` (tokens just added to the tokenizer
    whose ids fall into spare rows the checkpoint already had, as Qwen's tables carry), are
    set to the mean of the trained rows (those below the first new id): a neutral start that
    keeps logits sane, instead of a spare row nobody trained. Embeddings never shrink below
    their current size (LISA checkpoints carry spare rows).
    """
    old = model.get_input_embeddings().weight.shape[0]
    new = max(len(tokenizer), old)
    if new > old:
        model.resize_token_embeddings(new, mean_resizing=False)
    spare = sorted(i for i in new_token_ids if i < old)
    if not init_from_mean or (new == old and not spare):
        return
    trained = min([old, *spare])
    with torch.no_grad():
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            if emb.shape[0] != new:
                continue
            mean = emb[:trained].mean(0, keepdim=True)
            emb[old:] = mean
            if spare:
                emb[spare] = mean


# --- conversations ----------------------------------------------------------------------
@dataclass
class Turn:
    """One user question and (for training / history) the assistant's answer."""

    question: str
    answer: str | None = None


@dataclass
class EncodedConversation:
    """Token ids of one conversation, image placeholder already expanded.

    Attributes:
        input_ids: ``(L,)`` long.
        labels: ``(L,)`` long; ``-100`` everywhere except assistant answer tokens.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor


def render_conversation(
    turns: Sequence[Turn],
    system_prompt: str,
    image_token: str = "<image>",
    eos_token: str = "</s>",
) -> tuple[str, list[tuple[int, int]]]:
    """Render turns in the llava_v1 format.

    The image placeholder goes before the first question. A final turn without an answer
    ends with ``"ASSISTANT:"`` (a generation prompt).

    Returns:
        ``(text, spans)``: the string and the ``[start, end)`` character spans of every
        assistant answer including its end-of-sequence token (the supervised text).
    """
    return _render_turns(
        system_prompt + " ", turns, eos_token,
        first_question=lambda q: f"{image_token}\n{q}",
        user=lambda q: f"USER: {q} ASSISTANT:",
        before_answer=" ",
    )


def render_chatml_conversation(
    turns: Sequence[Turn],
    system_prompt: str,
    image_token: str = "<|image_pad|>",
    eos_token: str = "<|im_end|>",
) -> tuple[str, list[tuple[int, int]]]:
    """Render turns in Qwen's ChatML format (same contract as :func:`render_conversation`)::

        <|im_start|>system\n{system}<|im_end|>\n
        <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n
        <|im_start|>assistant\n{answer}<|im_end|>\n

    A final turn without an answer ends with ``<|im_start|>assistant\n`` (generation
    prompt). The supervised span of an answer includes its ``eos_token`` (``<|im_end|>``).
    An empty ``system_prompt`` leaves the system block out (Qwen3-VL's template adds none;
    Qwen2-VL's and Qwen2.5-VL's add "You are a helpful assistant.").
    """
    header = f"<|im_start|>system\n{system_prompt}{eos_token}\n" if system_prompt else ""
    return _render_turns(
        header, turns, eos_token,
        first_question=lambda q: f"<|vision_start|>{image_token}<|vision_end|>{q}",
        user=lambda q: f"<|im_start|>user\n{q}{eos_token}\n<|im_start|>assistant\n",
        after_answer="\n",
    )


def _render_turns(
    text: str,
    turns: Sequence[Turn],
    eos_token: str,
    first_question: Callable[[str], str],
    user: Callable[[str], str],
    before_answer: str = "",
    after_answer: str = "",
) -> tuple[str, list[tuple[int, int]]]:
    """Append ``turns`` to the header ``text`` (the loop both templates share).

    ``first_question`` adds the image placeholder to the first question, ``user`` renders a
    question up to the generation prompt; the supervised span of an answer is
    ``before_answer`` + answer + ``eos_token``, then ``after_answer``. Returns ``(text, spans)``.
    """
    spans: list[tuple[int, int]] = []
    for index, turn in enumerate(turns):
        text += user(first_question(turn.question) if index == 0 else turn.question)
        if turn.answer is None:
            if index != len(turns) - 1:
                raise KeySegInputError("only the last turn of a conversation may lack an answer")
            break
        # The separator before the answer is supervised too: after the generation prompt
        # the model must produce it (a byte-level BPE may emit it as a token of its own).
        start = len(text)
        text += before_answer + turn.answer + eos_token
        spans.append((start, len(text)))
        text += after_answer
    return text, spans


# Conversation renderers by name (BackboneConfig.family picks one, see KeySegProcessor).
TEMPLATES = {"llava_v1": render_conversation, "chatml": render_chatml_conversation}


def encode_conversation(
    tokenizer,
    turns: Sequence[Turn],
    ids: SpecialTokenIds,
    num_image_tokens: int,
    system_prompt: str,
    image_token: str = "<image>",
    template: str = "llava_v1",
    convention: str = "lisa",
) -> EncodedConversation:
    """Tokenise a conversation, mask non-assistant labels and expand the image placeholder.

    ``num_image_tokens`` is what the backbone produces for this image (e.g. 256 for CLIP
    ViT-L/14 at 224 px, 576 at 336 px, any count for dynamic-resolution models).
    ``template`` is a key of :data:`TEMPLATES`; ``convention`` is
    ``BackboneConfig.convention``: under ``"lisa"`` the ``<im_start>``/``<im_end>`` markers
    (when ``ids`` has them) are written around the placeholder in the text, as LISA's prompt
    has them, so they strip the whitespace next to them; under ``"v0"`` their ids are
    inserted after tokenisation.
    """
    render = TEMPLATES[template]
    markers = ids.im_start is not None and ids.im_end is not None
    inline_markers = markers and convention == "lisa"
    image_text = f"{IM_START_TOKEN}{image_token}{IM_END_TOKEN}" if inline_markers else image_token
    text, spans = render(turns, system_prompt, image_text, tokenizer.eos_token)
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    token_ids: list[int] = encoded["input_ids"]
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    labels = [IGNORE_INDEX] * len(token_ids)
    for i, (start, end) in enumerate(offsets):
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[i] = token_ids[i]
        elif end > start and any(s < end and start < e for s, e in spans):
            # a token straddling the answer boundary (e.g. " Sure" with its leading space)
            labels[i] = token_ids[i]
    if token_ids.count(ids.image) != 1:
        raise KeySegInputError(
            f"expected exactly one {image_token} in the prompt, found {token_ids.count(ids.image)}"
        )
    where = token_ids.index(ids.image)
    image_ids = [ids.image] * num_image_tokens
    if markers and not inline_markers:
        image_ids = [ids.im_start, *image_ids, ids.im_end]
    token_ids = token_ids[:where] + image_ids + token_ids[where + 1 :]
    labels = labels[:where] + [IGNORE_INDEX] * len(image_ids) + labels[where + 1 :]
    return EncodedConversation(
        input_ids=torch.tensor(token_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
    )


def special_positions(
    input_ids: torch.Tensor, token_id: int, choice: str = "before"
) -> torch.Tensor:
    """Positions whose hidden state represents each occurrence of ``token_id``.

    Args:
        input_ids: ``(L,)`` ids as the LM sees them (image tokens expanded).
        choice: ``"before"`` -> the position preceding the token (reference);
            ``"at"`` -> the token's own position.

    Returns:
        ``(n,)`` long positions, in order of occurrence.
    """
    positions = (input_ids == token_id).nonzero(as_tuple=True)[0]
    if choice == "before":
        positions = positions - 1
        if (positions < 0).any():
            raise KeySegInputError("a special token cannot be the first token of a sequence")
    return positions


def keyword_token_ids(input_ids: torch.Tensor, ids: SpecialTokenIds) -> list[torch.Tensor]:
    """For each ``[KEY]`` in ``input_ids: (L,)``, the ids of the keyword that follows it
    (up to the next ``[SEG]``/``[KEY]``/end-of-sequence/padding)."""
    stops = {ids.seg, ids.key, ids.eos, ids.pad}
    result = []
    seq = input_ids.tolist()
    for pos in (input_ids == ids.key).nonzero(as_tuple=True)[0].tolist():
        out = []
        for token in seq[pos + 1 :]:
            if token in stops:
                break
            out.append(token)
        result.append(torch.tensor(out, dtype=torch.long))
    return result
