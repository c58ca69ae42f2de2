"""Pretrain the tiny VLM to see and talk: visual QA on the shapes world (issue #16, stage 2).

In the real recipe the VLM arrives pretrained; here the tiny LLaVA of a local preset
(``keyseg.model.tiny.VLM_PRESETS``, built exactly as ``keyseg.build.build_vlm`` builds it)
learns from questions about the shapes world (``keyseg.data.shapes.qa``: what, where,
colour, size, count, existence, relation, describe), asked in the llava_v1 template with the
system prompt of ``--config``. Every image of a step carries a multi-turn conversation of
``--turns-per-image`` QA pairs (cheap supervision per image); the loss is next-token
cross-entropy on the answers only. Everything trains (vision tower, projector, LM).

    OMP_NUM_THREADS=1 python experiments/pretrain_vlm.py --preset shapes --steps 2000 \\
        --out runs/vlm_pretrain/shapes

``--init DIR`` continues a saved run (its weights and tokenizer; ``--preset`` must name the
preset it was built from) with a fresh warm-up and cosine schedule.

``--warm-start DIR`` builds a fresh ``--preset`` model that differs from DIR's in patch size
(e.g. ``shapes192p32``, 36 image tokens) or LM depth (``shapes192deep``, 6 layers) and fills
it with DIR's weights and tokenizer (``warm_start``: the patch kernel and position grid
adapted, extra LM layers started as identities, the rest copied).

``--tower-steps N`` first trains the vision tower alone, N steps on the auxiliary probes
(``--patch-loss-weight``, ``--existence-loss-weight``) with no LM forward: the lab's stand-in
for the image pretraining a real CLIP arrives with, about a quarter of a QA step's cost. The
QA steps that follow let the projector and LM catch up with the moved tower.

``--image-token-norm R`` scales the projector's output layer before the QA steps so the
projected image tokens have mean norm R (``metrics.json`` ``norms`` records them and the
text embeddings' norm before and after the QA steps): a pre-norm LM's layers add O(1)
updates to each position, so image tokens far above that scale pass through them almost
unchanged.

``--lookup-turn`` appends to every training conversation one more turn, the kind and colour
lookup as text ("star: yes, red: no, blue ring: yes, ...", ``lookup_turn``), supervised on its
verdicts only: the restated existence answers of ``--restate-existence`` ("red star: no")
have the same shape, so the LM head itself learns the verdict where an answer gives it.
``--lookup-asks`` words that turn as an existence question listing its items ("Is there a
star, a red shape or ...?"), so the verdicts are trained in a question's context.

The tokenizer is trained first, on ``keyseg.build.preset_corpus("shapes")`` (the KeySeg
queries and answers the same tokenizer will serve in fine-tuning) plus QA text of train
images; it already holds ``<image>``, ``[SEG]`` and ``[KEY]`` (``build_tiny_tokenizer``
registers them), so KeySeg adds no token later. QA never uses ``[SEG]``/``[KEY]``: their
embedding and output rows are set to the mean of the trained rows before saving, the neutral
start ``keyseg.tokens.resize_embeddings`` gives new tokens.

Prints the loss every ``--log-every`` steps, a val accuracy curve every ``--val-every``
steps, and at the end QA accuracy by question type on ``--eval-images`` test images (greedy
generation, exact match after ``normalise_answer``; also split into seen and held-out
templates, next to the best constant answer per type). Writes ``metrics.json`` (with the
command, timing and machine) and ``save_pretrained`` of the VLM, tokenizer and image
processor into ``--out``, so ``keyseg.build.build_vlm(BackboneConfig(name_or_path=OUT))``
and a KeySeg config with ``model.backbone.name_or_path: OUT`` load it.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_losses import colour_kind_loss
from provenance import provenance

from keyseg import tokens
from keyseg.build import build_vlm, preset_corpus
from keyseg.config import BackboneConfig, load_config
from keyseg.data.shapes import (
    ALL_QUESTION_TYPES,
    COLOURS,
    KINDS,
    OPTIONAL_QUESTION_TYPES,
    QUESTION_TYPES,
    QAPair,
    ShapesDataset,
    cell_labels,
    normalise_answer,
    record_qa,
    scene_from_record,
)
from keyseg.io import atomic_write_json
from keyseg.model import tiny
from keyseg.model.backbone import num_image_tokens

ROOT = Path(__file__).resolve().parents[1]
#: Train records whose QA text joins the tokenizer corpus (three question draws each).
QA_CORPUS_RECORDS = 600


def qa_corpus(records: int = QA_CORPUS_RECORDS) -> list[str]:
    """Questions and answers about the first ``records`` train images (train templates only,
    so held-out wordings stay unseen by the tokenizer too)."""
    dataset, texts = ShapesDataset("train"), []
    for index in range(records):
        for seed in range(3):
            for pair in record_qa(dataset[index], seed=seed):
                texts += [pair.question, pair.answer]
    return texts


def build_tokenizer(system_prompt: str, vocab_size: int, records: int = QA_CORPUS_RECORDS):
    """The tiny BPE tokenizer for the shapes world: KeySeg's corpus plus QA text."""
    corpus = [system_prompt, *(preset_corpus("shapes") or tiny.DEFAULT_CORPUS),
              *qa_corpus(records)]
    return tiny.build_tiny_tokenizer(corpus, vocab_size=vocab_size)


class QAEncoder:
    """Conversations about shapes records -> LLaVA inputs, through ``keyseg.tokens``."""

    def __init__(self, tokenizer, image_processor, vlm_config, system_prompt: str) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.ids = tokens.special_token_ids(tokenizer)
        self.num_image_tokens = num_image_tokens(vlm_config)
        self.system_prompt = system_prompt

    def encode(self, turns: list[tokens.Turn]) -> tokens.EncodedConversation:
        return tokens.encode_conversation(self.tokenizer, turns, self.ids, self.num_image_tokens,
                                          self.system_prompt)

    def pixels(self, images: list) -> torch.Tensor:
        """``(B, 3, s, s)`` pixel values of PIL ``images``."""
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def pad(self, rows: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
        """``(B, L)``: 1-D tensors padded to the longest with ``value``."""
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if left:
                out[i, width - len(r):] = r
            else:
                out[i, : len(r)] = r
        return out

    def train_batch(self, conversations: list[tuple[object, list[QAPair]]],
                    verdicts: Callable[[torch.Tensor, torch.Tensor],
                                       tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
        """One image per row with all its QA turns answered; right-padded, labels ``-100``
        except on answers. ``verdicts`` (:func:`lookup_verdicts`): each conversation's last
        turn is a :func:`lookup_turn`, labelled on its verdicts only."""
        encoded = [self.encode([tokens.Turn(p.question, p.answer) for p in pairs])
                   for _, pairs in conversations]
        marked = [(e.labels, None) if verdicts is None else verdicts(e.labels, e.input_ids)
                  for e in encoded]
        labels = [label for label, _ in marked]
        input_ids = self.pad([e.input_ids for e in encoded], self.ids.pad, left=False)
        # (B, L) bool: the first token of each lookup verdict, where it is decided
        batch = {} if verdicts is None else {
            "verdict_first": self.pad([f for _, f in marked], 0, left=False).bool()}
        return batch | {
            "input_ids": input_ids,
            "attention_mask": self.pad([torch.ones_like(e.input_ids) for e in encoded], 0,
                                       left=False),
            "labels": self.pad(labels, tokens.IGNORE_INDEX, left=False),
            "pixel_values": self.pixels([image for image, _ in conversations]),
        }


def patch_labels(record, grid: int) -> torch.Tensor:
    """``(2, grid * grid)`` long: per vision patch the colour and kind of the object covering
    most of it (:func:`keyseg.data.shapes.cell_labels`)."""
    return torch.from_numpy(cell_labels(scene_from_record(record), grid)).long()


class TowerProbe(torch.nn.Module):
    """An auxiliary head on the vision tower's last hidden states, caught by a forward hook
    (:meth:`capture`). Not saved."""

    features: torch.Tensor | None = None

    def capture(self, module, inputs, output) -> None:
        """Forward hook on the vision tower: keep its last hidden states ``(B, 1 + P, C)``."""
        self.features = output[0]


class PatchProbe(TowerProbe):
    """An auxiliary dense objective for the vision tower (``--patch-loss-weight``): linear
    colour and kind classifiers on every patch feature the LM receives. A tower trained
    from scratch only through the LM's answers learns to see slowly; this gives it a direct
    signal (a stand-in for the pretraining a real CLIP arrives with). Not saved.
    ``kind_on_objects``: the kind loss on object patches only (``probe_losses``)."""

    def __init__(self, width: int, kind_on_objects: bool = False) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(width, len(COLOURS) + 1)
        self.kind = torch.nn.Linear(width, len(KINDS) + 1)
        self.kind_on_objects = kind_on_objects

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE of colour and kind over ``(B, 2, P)`` labels (the CLS token dropped)."""
        patches = self.features[:, 1:].flatten(0, 1)  # (B*P, C)
        return colour_kind_loss(self.colour(patches), self.kind(patches),
                                labels.transpose(0, 1).flatten(1), self.kind_on_objects)


#: The concepts :class:`ExistenceProbe` predicts, in order: kinds, colours, colour + kind.
EXISTENCE_CONCEPTS: tuple[tuple[str | None, str | None], ...] = (
    *((None, k) for k in KINDS), *((c, None) for c in COLOURS),
    *((c, k) for c in COLOURS for k in KINDS))


def existence_labels(record) -> torch.Tensor:
    """``(len(EXISTENCE_CONCEPTS),)`` float: 1 where a visible object of ``record`` has the
    concept (its kind, its colour, or both)."""
    present = {(o["colour"], o["kind"]) for o in record.meta["objects"]}
    return torch.tensor([float(any((c is None or c == pc) and (k is None or k == pk)
                                   for pc, pk in present))
                         for c, k in EXISTENCE_CONCEPTS])


class ExistenceProbe(TowerProbe):
    """An auxiliary image-level objective for the vision tower (``--existence-loss-weight``):
    from each channel's maximum over the patches, a linear multi-label classifier says
    which kinds, colours and colour + kind pairs are in the image. The per-patch probe alone
    left kind out of reach of a pooled read-out (``experiments/vlm_existence.py``: kind
    existence 0.58 balanced accuracy, colour 0.99), and a question "is there a star?" needs
    exactly that read-out; a real CLIP arrives with it from image-text pretraining.
    Measured (docs/RESULTS.md): the LM then answers colour-existence questions, but kinds
    stay unreadable; the tower itself does not see them."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(width, len(EXISTENCE_CONCEPTS))

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """BCE of the ``(B, len(EXISTENCE_CONCEPTS))`` presence labels from the max-pooled
        patch features (the CLS token dropped)."""
        pooled = self.features[:, 1:].amax(dim=1)
        return torch.nn.functional.binary_cross_entropy_with_logits(self.head(pooled), labels)


def single_token(tokenizer, text: str) -> int:
    """The one token id of ``text``; a clear error if the tokenizer splits it."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens in this tokenizer, expected one")
    return ids[0]


def last_token_of(word: list[int], ids: list[int]) -> int:
    """The position in ``ids`` of the last token of ``word``'s last occurrence."""
    for start in range(len(ids) - len(word), -1, -1):
        if ids[start : start + len(word)] == word:
            return start + len(word) - 1
    raise ValueError(f"token sequence {word} not in the prompt")


class KindLookupProbe(torch.nn.Module):
    """An auxiliary objective for the *language model* (``--lm-probe-weight``): after each
    image, one extra prompt lists the 8 kind words in a random order, and a linear head on
    the LM's last hidden state at each kind word says whether that kind is in the image.

    "Is there a star?" needs the LM to look a named kind up among the image tokens, and it
    does not learn to (docs/RESULTS.md: at chance after thousands of such questions, while
    one attention head with a learned query per kind reads 0.8 from the same tokens). A QA
    step asks a few existence questions, each one answer token; this asks all 8 kinds of
    every image, the dense signal that head had. The order is shuffled so that the word, not
    its position, must say which kind is asked; a word of several tokens is read at its last.
    Not saved."""

    def __init__(self, hidden_size: int, encoder: QAEncoder) -> None:
        super().__init__()
        self.head = torch.nn.Linear(hidden_size, 1)
        self.encoder = encoder
        # each kind word's token ids after a space (byte-level BPE splits words before merging,
        # so they are the same inside the prompt)
        self.kind_ids = [encoder.tokenizer(" " + k, add_special_tokens=False).input_ids
                         for k in KINDS]

    def prompts(self, records, rng: np.random.Generator):
        """(prompt ids per record, ``(B, 8)`` kind-word positions, ``(B, 8)`` presence
        labels in prompt order); the kinds in a fresh random order per record."""
        prompts, positions, labels = [], [], []
        for record in records:
            order = rng.permutation(len(KINDS))
            ids = self.encoder.encode(
                [tokens.Turn("kinds: " + " ".join(KINDS[i] for i in order))]).input_ids
            prompts.append(ids)
            positions.append(torch.tensor([last_token_of(self.kind_ids[i], ids.tolist())
                                           for i in order]))
            labels.append(existence_labels(record)[: len(KINDS)][torch.from_numpy(order)])
        return prompts, torch.stack(positions), torch.stack(labels)

    def forward(self, vlm, records, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        """(class-balanced BCE, balanced accuracy) of the kind-presence read-out on
        ``records`` (one prompt each)."""
        prompts, positions, labels = self.prompts(records, rng)
        out = vlm(input_ids=self.encoder.pad(prompts, self.encoder.ids.pad, left=False),
                  attention_mask=self.encoder.pad([torch.ones_like(p) for p in prompts], 0,
                                                  left=False),
                  pixel_values=self.encoder.pixels([r.image for r in records]),
                  output_hidden_states=True)
        hidden = out.hidden_states[-1]  # (B, L, H)
        at_words = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.head(at_words).squeeze(-1)  # (B, 8)
        pos = labels.mean().clamp(0.05, 0.95)
        weight = torch.where(labels > 0, 0.5 / pos, 0.5 / (1 - pos))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weight)
        with torch.no_grad():
            said = logits > 0
            truth = labels > 0
            recall = said[truth].float().mean() if truth.any() else torch.tensor(0.5)
            rejection = (~said[~truth]).float().mean() if (~truth).any() else torch.tensor(0.5)
        return loss, float(0.5 * (recall + rejection))


#: The question of the lookup turn (``--lookup-turn``); one fixed wording, since it is a
#: training device, not a question users ask.
LOOKUP_QUESTION = "Which of these are in the image?"


#: ``--lookup-asks``: the lookup turn worded as an existence question that lists its items.
LOOKUP_ASKS = ("Is there {items}?", "Can you see {items}?", "Does the image contain {items}?",
               "Any of these: {items}?")


def _spoken(concept: tuple[str | None, str | None]) -> str:
    """How existence questions name a concept: "red star", "star", "red shape"."""
    colour, kind = concept
    return f"{colour} {kind}" if colour and kind else kind or f"{colour} shape"


def lookup_turn(record, rng: np.random.Generator, pairs: int = 4,
                asks: bool = False, bare: bool = False) -> QAPair:
    """The kind lookup *as text* (``--lookup-turn``): an answer that names every kind and
    colour, and ``pairs`` colour + kind pairs (half of them present where possible, the
    absent ones sharing a colour or a kind with a present object), each followed by its
    verdict, in a fresh random order: "star: yes, red: no, blue circle: yes, ...".

    The restated existence answer ("red star: no") has the same shape, so the LM head
    learns the verdict at the very position where a question's answer gives it. Trained
    through :func:`verdict_labels_only`: the loss falls on the verdict tokens alone, since
    which name comes next is a coin toss.

    ``asks`` (``--lookup-asks``): the question lists the items as an existence question
    does ("Is there a star, a red shape or a blue ring?") and the answer names them as a
    restated existence answer does ("star: yes, red shape: no, ..."), in the same order, so
    the verdicts are trained in the context where questions need them.

    ``bare`` (``--lookup-bare``): no colon between a name and its verdict ("star yes, red no,
    blue ring yes"), so the verdict is predicted from the state at the name's last word, the
    state where a linear kind-lookup read-out learns the lookup (``KindLookupProbe``), not
    one token later. Trained through :func:`bare_verdict_labels`."""
    present = existence_labels(record)
    presence = dict(zip(EXISTENCE_CONCEPTS, present.tolist(), strict=True))
    singles = [c for c in EXISTENCE_CONCEPTS if c[0] is None or c[1] is None]
    have = [c for c in EXISTENCE_CONCEPTS if None not in c and presence[c]]
    near = [c for c in EXISTENCE_CONCEPTS if None not in c and not presence[c]
            and any(c[0] == h[0] or c[1] == h[1] for h in have)]
    chosen: list = []
    for pool in (have, near):
        for i in rng.permutation(len(pool))[: pairs // 2]:
            chosen.append(pool[int(i)])
    items = singles + chosen
    order = rng.permutation(len(items))
    names = [_spoken(items[i]) if asks else " ".join(w for w in items[i] if w) for i in order]
    between = " " if bare else ": "
    answer = ", ".join(f"{name}{between}{'yes' if presence[items[i]] else 'no'}"
                       for name, i in zip(names, order, strict=True))
    question = LOOKUP_QUESTION
    if asks:
        spoken = [("an " if n[0] in "aeiou" else "a ") + n for n in names]
        listed = ", ".join(spoken[:-1]) + " or " + spoken[-1]
        question = LOOKUP_ASKS[int(rng.integers(len(LOOKUP_ASKS)))].format(items=listed)
    return QAPair(qtype="lookup", template_id="lookup", question=question, answer=answer)


def last_answer(labels: torch.Tensor) -> tuple[int, int] | None:
    """``(start, end)`` of the last run of supervised labels (the last answer), or None."""
    answered = (labels != tokens.IGNORE_INDEX).nonzero().flatten().tolist()
    if not answered:
        return None
    start = answered[-1]
    while start > 0 and labels[start - 1] != tokens.IGNORE_INDEX:
        start -= 1
    return start, answered[-1] + 1


def verdict_labels_only(labels: torch.Tensor, input_ids: torch.Tensor, colon: int,
                        comma: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last answer's (the lookup turn's) labels kept only inside a verdict, the tokens
    between a ``colon`` and the next ``comma`` (a tiny BPE may split " yes" into two tokens;
    the last verdict keeps the end-of-answer token after it); earlier answers untouched.

    Returns ``(L,)`` labels and an ``(L,)`` bool mask of each verdict's first token, where
    the verdict is decided."""
    first = torch.zeros_like(labels, dtype=torch.bool)
    span = last_answer(labels)
    if span is None:
        return labels, first
    start = span[0]
    out, inside = labels.clone(), False
    for i in range(start, len(out)):
        token = int(input_ids[i])
        keep = inside and token != comma
        first[i] = keep and int(input_ids[i - 1]) == colon
        inside = (inside or token == colon) and token != comma
        if not keep:
            out[i] = tokens.IGNORE_INDEX
    return out, first


def bare_verdict_labels(labels: torch.Tensor, input_ids: torch.Tensor, comma: int,
                        words: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`verdict_labels_only` for a ``bare`` lookup turn ("star yes, red no"), which has
    no colon to mark a verdict: in each comma-separated item of the last answer, the trailing
    tokens that spell one of ``words`` (the token ids of " yes" and of " no") are the
    verdict; the last item keeps the end-of-answer token after its verdict. Same returns."""
    first = torch.zeros_like(labels, dtype=torch.bool)
    span = last_answer(labels)
    if span is None:
        return labels, first
    start, end = span
    out = labels.clone()
    out[start:end] = tokens.IGNORE_INDEX
    ids = input_ids.tolist()
    items, item = [], []
    for i in range(start, end):
        if ids[i] == comma:
            items.append(item)
            item = []
        else:
            item.append(i)
    items.append(item)
    for n, item in enumerate(items):
        # the last item may end with the end-of-answer token after its verdict
        tails = [item, item[:-1]] if n == len(items) - 1 else [item]
        for tail in tails:
            word = next((w for w in words if len(tail) >= len(w)
                         and [ids[i] for i in tail[len(tail) - len(w):]] == list(w)), None)
            if word is not None:
                kept = item[len(tail) - len(word):]
                out[kept] = labels[kept]
                first[kept[0]] = True
                break
    return out, first


def lookup_verdicts(tokenizer, bare: bool = False
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(labels, input_ids) -> (labels, verdict_first)`` for :meth:`QAEncoder.train_batch`:
    the lookup turn's verdicts after a colon (:func:`verdict_labels_only`) or, ``bare``,
    right after the name (:func:`bare_verdict_labels`)."""
    comma = single_token(tokenizer, ",")
    if not bare:
        return functools.partial(verdict_labels_only, colon=single_token(tokenizer, ":"),
                                 comma=comma)
    words = [tokenizer(" " + w, add_special_tokens=False).input_ids for w in ("yes", "no")]
    return functools.partial(bare_verdict_labels, comma=comma, words=words)


def warmup_cosine(steps: int, warmup_steps: int):
    """LambdaLR factor: linear warm-up over ``min(warmup_steps, steps // 10)`` steps, then a
    cosine to zero at ``steps``."""
    warmup = max(1, min(warmup_steps, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def pretrain_tower(vision, image_processor, probes: list[tuple[float, TowerProbe]],
                   train: ShapesDataset, rng: np.random.Generator, steps: int, images: int,
                   lr: float, warmup_steps: int, log_every: int,
                   on_log: Callable[[int], None] | None = None) -> list[dict]:
    """``steps`` optimiser steps of the vision tower (a ``CLIPVisionModel``, e.g. a VLM's
    ``model.vision_tower``, whose forward hooks feed ``probes``) and its probes only:
    weighted probe losses on ``images`` random train images a step, nothing else touched.
    Returns the logged history, rows ``{"phase": "tower", "step", "patch_loss",
    "existence_loss", "seconds"}``; ``on_log(step)`` is called after each."""
    params = [*vision.parameters(), *(p for _, probe in probes for p in probe.parameters())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup_steps))
    grid = vision.config.image_size // vision.config.patch_size
    history, sums, count, started = [], defaultdict(float), 0, time.perf_counter()
    vision.train()
    for step in range(1, steps + 1):
        records = [train[int(i)] for i in rng.integers(len(train), size=images)]
        pixels = image_processor(images=[r.image for r in records],
                                 return_tensors="pt")["pixel_values"].to(vision.dtype)
        vision(pixel_values=pixels)  # the probes' hooks catch the hidden states
        loss = 0.0
        for weight, probe in probes:
            if isinstance(probe, PatchProbe):
                part = probe.loss(torch.stack([patch_labels(r, grid) for r in records]))
                sums["patch_loss"] += part.item()
            else:
                part = probe.loss(torch.stack([existence_labels(r) for r in records]))
                sums["existence_loss"] += part.item()
            loss = loss + weight * part
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        count += 1
        if step % log_every == 0 or step == steps:
            seconds = time.perf_counter() - started
            row = {"phase": "tower", "step": step, "patch_loss": 0.0, "existence_loss": 0.0,
                   **{k: round(v / count, 4) for k, v in sums.items()},
                   "seconds": round(seconds, 1)}
            history.append(row)
            print(f"tower step {step}: patch {row['patch_loss']:.3f} existence "
                  f"{row['existence_loss']:.3f} ({seconds / step:.3f} s/step)", flush=True)
            sums, count = defaultdict(float), 0
            if on_log is not None:
                on_log(step)
    return history


def sample_conversations(dataset: ShapesDataset, rng: np.random.Generator, images: int,
                         turns: int, types: Sequence[str] = QUESTION_TYPES,
                         per_type: int = 1,
                         restate: bool = False) -> list[tuple[object, list[QAPair]]]:
    """``images`` random records, each with up to ``turns`` QA pairs (up to ``per_type`` of
    each of ``types``) in a random order (freshly drawn questions on every visit of an
    image)."""
    out = []
    for index in rng.integers(len(dataset), size=images):
        record = dataset[int(index)]
        pairs = record_qa(record, seed=int(rng.integers(2**31)), per_type=per_type,
                          types=types, restate=restate)
        keep = rng.permutation(len(pairs))[:turns]
        out.append((record, [pairs[int(i)] for i in keep]))
    return out


def eval_items(split: str, images: int, seed: int = 0, restate: bool = False,
               types: Sequence[str] = QUESTION_TYPES) -> list[tuple[object, QAPair]]:
    """Every question (one per type of ``types``) about the first ``images`` records of
    ``split``."""
    dataset = ShapesDataset(split)
    return [(dataset[i].image, pair) for i in range(images)
            for pair in record_qa(dataset[i], seed=seed, types=types, restate=restate)]


@torch.no_grad()
def answer_all(vlm, encoder: QAEncoder, items: list[tuple[object, QAPair]],
               batch_size: int = 32, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to single-turn questions (left-padded batches, KV cache)."""
    vlm.eval()
    ids, answers = encoder.ids, []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [encoder.encode([tokens.Turn(p.question)]).input_ids for _, p in chunk]
        out = vlm.generate(
            input_ids=encoder.pad(prompts, ids.pad, left=True),
            attention_mask=encoder.pad([torch.ones_like(p) for p in prompts], 0, left=True),
            pixel_values=encoder.pixels([image for image, _ in chunk]),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=ids.eos, pad_token_id=ids.pad,
            suppress_tokens=[ids.image, ids.seg, ids.key],
        )
        width = max(len(p) for p in prompts)
        for row in out[:, width:]:
            stop = (row == ids.eos).nonzero()
            row = row[: int(stop[0])] if len(stop) else row
            answers.append(encoder.tokenizer.decode(row, skip_special_tokens=True).strip())
    vlm.train()
    return answers


def score(items: list[tuple[object, QAPair]], answers: list[str]) -> dict:
    """Exact-match accuracy (after ``normalise_answer``): overall, by question type, on seen
    and held-out templates, and the best constant answer per type on the same questions."""
    hits: dict[str, list[bool]] = defaultdict(list)
    gold_by_type: dict[str, Counter] = defaultdict(Counter)
    for (_, pair), reply in zip(items, answers, strict=True):
        ok = normalise_answer(reply) == normalise_answer(pair.answer)
        for key in ("all", pair.qtype, "heldout" if pair.heldout else "seen"):
            hits[key].append(ok)
        gold_by_type[pair.qtype][normalise_answer(pair.answer)] += 1
    accuracy = {k: round(float(np.mean(v)), 4) for k, v in hits.items()}
    constant = {t: round(c.most_common(1)[0][1] / sum(c.values()), 4)
                for t, c in gold_by_type.items()}
    return {
        "accuracy": {k: accuracy[k] for k in ("all", *ALL_QUESTION_TYPES, "seen", "heldout")
                     if k in accuracy},
        "questions": {k: len(v) for k, v in hits.items()},
        "constant_baseline": constant,
    }


@torch.no_grad()
def projected_image_tokens(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)``: the projected image tokens of ``pixels`` ``(B, 3, s, s)``, what the LM
    reads at the ``<image>`` positions."""
    out = vlm.get_image_features(pixel_values=pixels.to(vlm.dtype))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, list | tuple):
        feats = torch.stack(list(feats))
    return feats.reshape(pixels.shape[0], -1, feats.shape[-1])


def image_token_norm(vlm, pixels: torch.Tensor) -> float:
    """Mean L2 norm of the projected image tokens of ``pixels`` (eval mode, no grad)."""
    was_training = vlm.training
    vlm.eval()
    norm = projected_image_tokens(vlm, pixels).float().norm(dim=-1).mean().item()
    vlm.train(was_training)
    return norm


def text_embedding_norm(vlm) -> float:
    """Mean L2 norm of the LM's token embeddings (the scale text enters the LM at)."""
    return vlm.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item()


@torch.no_grad()
def rescale_image_tokens(vlm, factor: float) -> None:
    """Scale the projector's last (linear) layer, weight and bias, by ``factor``: every
    projected image token scales by exactly ``factor``. Nothing else in the model changes, so
    the result still loads as a plain LLaVA."""
    last = vlm.model.multi_modal_projector.linear_2
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)


def warm_start(vlm, source) -> list[str]:
    """Copy ``source``'s weights into ``vlm``, a VLM of another patch size or a deeper LM
    (same widths).

    Every tensor of equal shape is copied. The patch embedding (``[width, 3, p, p]`` from
    ``[width, 3, q, q]``, ``p = k q``) becomes ``source``'s kernel repeated k x k times and
    divided by k^2: on an image the new kernel computes what the old one computes on the
    image average-pooled k-fold. The position table's patch rows are average-pooled over
    k x k blocks of the old grid (the class row is copied). LM layers the source lacks keep
    their fresh init except the two projections that write into the residual stream
    (``o_proj``, ``down_proj``), which are zeroed: each new pre-norm block starts as the
    identity, so the warm-started LM computes what the source's does and the new depth is
    learned from there. Returns the names that were adapted rather than copied.
    """
    target = vlm.state_dict()
    adapted = []
    sourced = source.state_dict().keys()
    with torch.no_grad():
        for name in target:
            if name not in sourced and ".layers." in name and name.endswith(
                    ("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias")):
                target[name].zero_()
                adapted.append(name)
        for name, tensor in source.state_dict().items():
            if name not in target:
                raise KeyError(f"--warm-start: {name} has no counterpart in the new preset")
            if target[name].shape == tensor.shape:
                target[name].copy_(tensor)
            elif name.endswith("patch_embedding.weight"):
                k = target[name].shape[-1] // tensor.shape[-1]
                target[name].copy_(tensor.repeat_interleave(k, -1).repeat_interleave(k, -2)
                                   / k**2)
                adapted.append(name)
            elif name.endswith("position_embedding.weight"):
                old_grid = math.isqrt(tensor.shape[0] - 1)
                new_grid = math.isqrt(target[name].shape[0] - 1)
                patches = tensor[1:].T.reshape(1, -1, old_grid, old_grid)
                pooled = torch.nn.functional.adaptive_avg_pool2d(patches, new_grid)
                target[name][0].copy_(tensor[0])
                target[name][1:].copy_(pooled.reshape(-1, new_grid**2).T)
                adapted.append(name)
            elif name.endswith("position_ids"):
                adapted.append(name)  # a buffer: the new preset's own
            else:
                raise ValueError(f"--warm-start: {name} is {tuple(tensor.shape)} in the "
                                 f"source and {tuple(target[name].shape)} in the new preset")
    return adapted


def neutral_special_rows(vlm, tokenizer) -> None:
    """Set the input and output rows of ``[SEG]``/``[KEY]`` (never in QA text) to the mean
    of the other rows, as ``keyseg.tokens.resize_embeddings`` starts new tokens."""
    special = tokenizer.convert_tokens_to_ids([tokens.SEG_TOKEN, tokens.KEY_TOKEN])
    with torch.no_grad():
        for table in (vlm.get_input_embeddings().weight, vlm.get_output_embeddings().weight):
            keep = torch.ones(table.shape[0], dtype=torch.bool)
            keep[special] = False
            table[special] = table[keep].mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes", help="VLM preset (keyseg.model.tiny)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-shapes.yaml",
                        help="KeySeg config whose model.backbone.system_prompt the QA uses")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--images-per-step", type=int, default=16)
    parser.add_argument("--turns-per-image", type=int, default=6,
                        help="QA turns per image conversation (at most one per question type)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--vocab-size", type=int, default=600,
                        help="BPE vocabulary (build_tiny_tokenizer's default: 600)")
    parser.add_argument("--corpus-records", type=int, default=QA_CORPUS_RECORDS,
                        help="train images whose QA text joins the tokenizer corpus")
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=0,
                        help="every this many steps (and before step 1), QA accuracy on "
                             "--val-images val images (0: never)")
    parser.add_argument("--val-images", type=int, default=25)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--patch-loss-weight", type=float, default=0.0,
                        help="weight of the auxiliary per-patch colour/kind loss on the vision "
                             "tower (PatchProbe; 0: off)")
    parser.add_argument("--kind-on-objects", action="store_true",
                        help="the per-patch probe's kind loss on patches an object covers only "
                             "(probe_losses; default: every patch, the background included)")
    parser.add_argument("--existence-loss-weight", type=float, default=0.0,
                        help="weight of the auxiliary image-level kind/colour/pair presence "
                             "loss on the vision tower (ExistenceProbe; 0: off)")
    parser.add_argument("--lm-probe-weight", type=float, default=0.0,
                        help="weight of the auxiliary kind-lookup loss on the language model "
                             "(KindLookupProbe: one extra prompt per image; 0: off)")
    parser.add_argument("--lookup-turn", action="store_true",
                        help="append to every training conversation the kind/colour lookup as "
                             "text (lookup_turn: \"star: yes, red: no, ...\"), its verdicts "
                             "trained by the ordinary next-token loss")
    parser.add_argument("--lookup-asks", action="store_true",
                        help="with --lookup-turn: word the lookup as an existence question that "
                             "lists its items (\"Is there a star, a red shape or ...?\") and "
                             "name them as restated existence answers do")
    parser.add_argument("--lookup-bare", action="store_true",
                        help="with --lookup-turn: no colon between a name and its verdict "
                             "(\"star yes, red no\"), so the verdict is decided at the name")
    parser.add_argument("--tower-steps", type=int, default=0,
                        help="steps training only the vision tower on the probe losses, "
                             "before the QA steps (needs a probe weight; 0: none)")
    parser.add_argument("--tower-lr", type=float, default=None,
                        help="learning rate of the tower steps (default: --lr)")
    parser.add_argument("--qa-types", nargs="+", choices=ALL_QUESTION_TYPES,
                        default=list(QUESTION_TYPES),
                        help="question types of the training turns (default: all but the "
                             "optional 'list'; validation and test ask the default types, "
                             "and an optional type trained is scored on its own)")
    parser.add_argument("--per-type", type=int, default=1,
                        help="training questions of each --qa-types type per image, at most")
    parser.add_argument("--restate-existence", action="store_true",
                        help="existence answers name the thing before yes/no (\"red star: "
                             "no\"), in training and in the validation/test answers")
    parser.add_argument("--image-token-norm", type=float, default=None,
                        help="before the QA steps, scale the projector's output layer so the "
                        "projected image tokens have this mean L2 norm (on 16 train images); "
                        "default: leave them as they are")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this saved VLM directory (its tokenizer too) "
                             "instead of a fresh --preset model")
    parser.add_argument("--warm-start", type=Path, default=None,
                        help="a fresh --preset model (e.g. another patch size) holding this "
                             "saved VLM's weights and tokenizer: equal-shape tensors copied, "
                             "patch kernel and position grid adapted (see warm_start)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.turns_per_image < 1:
        parser.error("--turns-per-image must be at least 1")
    if args.per_type < 1:
        parser.error("--per-type must be at least 1")
    if args.image_token_norm is not None and args.image_token_norm <= 0:
        parser.error("--image-token-norm must be positive")
    if args.tower_steps < 0:
        parser.error("--tower-steps must not be negative")
    if (args.lookup_asks or args.lookup_bare) and not args.lookup_turn:
        parser.error("--lookup-asks and --lookup-bare word the lookup turn: give "
                     "--lookup-turn too")
    if args.init is not None and args.warm_start is not None:
        parser.error("give --init (continue a run) or --warm-start (a new preset), not both")
    if args.tower_steps and not (args.patch_loss_weight or args.existence_loss_weight):
        parser.error("--tower-steps trains the tower on the probe losses: give "
                     "--patch-loss-weight and/or --existence-loss-weight")

    system_prompt = load_config(args.config).model.backbone.system_prompt
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.init is not None:  # a continuation: the saved model with its own tokenizer
        backbone = BackboneConfig(name_or_path=str(args.init), system_prompt=system_prompt)
        vlm, image_processor, tokenizer = build_vlm(backbone)
    elif args.warm_start is not None:
        source, _, tokenizer = build_vlm(
            BackboneConfig(name_or_path=str(args.warm_start), system_prompt=system_prompt))
        backbone = BackboneConfig(preset=args.preset, system_prompt=system_prompt)
        vlm, image_processor, tokenizer = build_vlm(backbone, tokenizer)
        adapted = warm_start(vlm, source)
        print(f"warm start from {args.warm_start}: adapted {', '.join(adapted) or 'nothing'}; "
              "the rest copied", flush=True)
        del source
    else:
        tokenizer = build_tokenizer(system_prompt, args.vocab_size, args.corpus_records)
        backbone = BackboneConfig(preset=args.preset, system_prompt=system_prompt)
        vlm, image_processor, tokenizer = build_vlm(backbone, tokenizer)
    encoder = QAEncoder(tokenizer, image_processor, vlm.config, system_prompt)
    setup_seconds = time.perf_counter() - started
    print(f"VLM preset {args.preset}: {sum(p.numel() for p in vlm.parameters()):,} parameters "
          f"(all trained), {encoder.num_image_tokens} image tokens, vocabulary "
          f"{len(tokenizer)}; tokenizer + model in {setup_seconds:.0f} s", flush=True)

    rng = np.random.default_rng(args.seed)
    train = ShapesDataset("train")
    validation = (eval_items("val", args.val_images, restate=args.restate_existence)
                  if args.val_every else [])
    probe = None
    params = list(vlm.parameters())
    if args.patch_loss_weight:
        vision = vlm.model.vision_tower
        probe = PatchProbe(vision.config.hidden_size, kind_on_objects=args.kind_on_objects)
        vision.register_forward_hook(probe.capture)
        params += list(probe.parameters())
        grid = vision.config.image_size // vision.config.patch_size
    existence = None
    if args.existence_loss_weight:
        vision = vlm.model.vision_tower
        existence = ExistenceProbe(vision.config.hidden_size)
        vision.register_forward_hook(existence.capture)
        params += list(existence.parameters())
    lookup = None
    if args.lm_probe_weight:
        lookup = KindLookupProbe(vlm.config.text_config.hidden_size, encoder)
        params += list(lookup.parameters())
        lookup_rng = np.random.default_rng(args.seed + 1)  # the QA data stays the control's
    verdicts = None
    if args.lookup_turn:
        verdicts = lookup_verdicts(tokenizer, bare=args.lookup_bare)
        turn_rng = np.random.default_rng(args.seed + 2)  # the QA data stays the control's
    curve, history = [], []
    tower_seconds = 0.0
    if args.tower_steps:
        tick = time.perf_counter()
        probes = [(w, p) for w, p in ((args.patch_loss_weight, probe),
                                      (args.existence_loss_weight, existence)) if p is not None]
        history += pretrain_tower(vlm.model.vision_tower, image_processor, probes, train, rng,
                                  args.tower_steps, args.images_per_step, args.tower_lr or args.lr,
                                  args.warmup_steps, args.log_every)
        tower_seconds = time.perf_counter() - tick
    # The image tokens' scale against the text's: a pre-norm LM adds O(1) updates to each
    # position's residual stream, so tokens far larger than that pass its layers almost
    # unchanged (measured on the same 16 train images before the QA steps, and after them).
    norm_pixels = encoder.pixels([train[i].image for i in range(16)])
    start = image_token_norm(vlm, norm_pixels)
    norms = {"text_embedding": round(text_embedding_norm(vlm), 4),
             "image_tokens_start": round(start, 4)}
    if args.image_token_norm is not None:
        rescale_image_tokens(vlm, args.image_token_norm / start)
        norms["image_tokens_rescaled"] = round(image_token_norm(vlm, norm_pixels), 4)
    print("mean norms: " + ", ".join(f"{k} {v}" for k, v in norms.items()), flush=True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.steps, args.warmup_steps))

    def validate(step: int) -> None:
        result = score(validation, answer_all(vlm, encoder, validation))
        curve.append({"step": step, **result["accuracy"]})
        shown = " ".join(f"{k} {v:.2f}" for k, v in result["accuracy"].items())
        print(f"step {step}: val {shown}", flush=True)

    if args.val_every:
        validate(0)
    vlm.train()
    started = time.perf_counter()
    data_seconds, loss_sum, loss_count, patch_sum, exist_sum = 0.0, 0.0, 0, 0.0, 0.0
    lookup_sum, lookup_acc, turn_acc = 0.0, 0.0, 0.0
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        conversations = sample_conversations(train, rng, args.images_per_step,
                                             args.turns_per_image, args.qa_types,
                                             args.per_type, args.restate_existence)
        if verdicts is not None:
            conversations = [(record, [*pairs, lookup_turn(record, turn_rng,
                                                            asks=args.lookup_asks,
                                                            bare=args.lookup_bare)])
                             for record, pairs in conversations]
        batch = encoder.train_batch([(record.image, pairs) for record, pairs in conversations],
                                    verdicts)
        if probe is not None:
            labels = torch.stack([patch_labels(record, grid) for record, _ in conversations])
        if existence is not None:
            present = torch.stack([existence_labels(record) for record, _ in conversations])
        data_seconds += time.perf_counter() - tick
        verdict_first = batch.pop("verdict_first", None)
        out = vlm(**batch)
        lm_loss = out.loss
        if verdict_first is not None:  # balanced accuracy of the lookup turn's verdicts
            with torch.no_grad():
                said = out.logits[:, :-1].argmax(-1)[verdict_first[:, 1:]]
                truth = batch["labels"][:, 1:][verdict_first[:, 1:]]
                right = said == truth
                classes = [right[truth == t].float().mean() for t in truth.unique()]
                turn_acc += float(torch.stack(classes).mean())
        loss = lm_loss
        if probe is not None:
            patch_loss = probe.loss(labels)
            patch_sum += patch_loss.item()
            loss = loss + args.patch_loss_weight * patch_loss
        if existence is not None:
            exist_loss = existence.loss(present)
            exist_sum += exist_loss.item()
            loss = loss + args.existence_loss_weight * exist_loss
        if lookup is not None:
            lookup_loss, accuracy = lookup(vlm, [record for record, _ in conversations],
                                           lookup_rng)
            lookup_sum, lookup_acc = lookup_sum + lookup_loss.item(), lookup_acc + accuracy
            loss = loss + args.lm_probe_weight * lookup_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        loss_sum, loss_count = loss_sum + lm_loss.item(), loss_count + 1
        if step % args.log_every == 0 or step == args.steps:
            seconds = time.perf_counter() - started
            history.append({"phase": "qa", "step": step, "loss": round(loss_sum / loss_count, 4),
                            "patch_loss": round(patch_sum / loss_count, 4),
                            "existence_loss": round(exist_sum / loss_count, 4),
                            "lookup_loss": round(lookup_sum / loss_count, 4),
                            "lookup_balanced_accuracy": round(lookup_acc / loss_count, 4),
                            "lookup_turn_balanced_accuracy": round(turn_acc / loss_count, 4),
                            "lr": schedule.get_last_lr()[0], "seconds": round(seconds, 1)})
            print(f"step {step}: loss {loss_sum / loss_count:.4f} "
                  f"patch {patch_sum / loss_count:.3f} existence {exist_sum / loss_count:.3f} "
                  + (f"lookup {lookup_sum / loss_count:.3f} (balanced accuracy "
                     f"{lookup_acc / loss_count:.3f}) " if lookup is not None else "")
                  + (f"lookup turn verdicts {turn_acc / loss_count:.3f} (balanced accuracy) "
                     if verdicts is not None else "")
                  + f"({seconds / step:.3f} s/step, data {data_seconds / step:.3f})", flush=True)
            loss_sum, loss_count, patch_sum, exist_sum = 0.0, 0, 0.0, 0.0
            lookup_sum, lookup_acc, turn_acc = 0.0, 0.0, 0.0
        if args.val_every and step % args.val_every == 0:
            validate(step)
    train_seconds = time.perf_counter() - started
    norms["image_tokens_end"] = round(image_token_norm(vlm, norm_pixels), 4)
    norms["text_embedding_end"] = round(text_embedding_norm(vlm), 4)
    print(f"mean norms after the QA steps: image tokens {norms['image_tokens_end']}, "
          f"text embeddings {norms['text_embedding_end']}", flush=True)

    tick = time.perf_counter()
    test_items = eval_items("test", args.eval_images, restate=args.restate_existence)
    replies = answer_all(vlm, encoder, test_items)
    test = score(test_items, replies)
    # optional types trained are scored apart, so "all" stays comparable across recipes
    optional = [t for t in args.qa_types if t in OPTIONAL_QUESTION_TYPES]
    if optional:
        extra_items = eval_items("test", args.eval_images, types=optional)
        extra = score(extra_items, answer_all(vlm, encoder, extra_items))
        for t in optional:
            test["accuracy"][t] = extra["accuracy"].get(t)
            test["questions"][t] = extra["questions"].get(t, 0)
            test["constant_baseline"][t] = extra["constant_baseline"].get(t)
    eval_seconds = time.perf_counter() - tick
    print("test accuracy: " + " ".join(f"{k} {v:.3f}" for k, v in test["accuracy"].items()))
    print("constant baseline: " + " ".join(f"{k} {v:.3f}"
                                           for k, v in test["constant_baseline"].items()))
    lookup_test = None
    if lookup is not None:  # the LM's own kind read-out on test images (mean over batches of 25)
        vlm.eval()
        test_records = [ShapesDataset("test")[i] for i in range(args.eval_images)]
        with torch.no_grad():
            lookup_test = round(np.mean([lookup(vlm, test_records[i: i + 25], lookup_rng)[1]
                                         for i in range(0, len(test_records), 25)]), 4)
        print(f"kind lookup probe on {len(test_records)} test images: balanced accuracy "
              f"{lookup_test}", flush=True)
    examples = [{"type": p.qtype, "question": p.question, "answer": p.answer, "reply": r}
                for (_, p), r in zip(test_items[:40], replies[:40], strict=True)]

    neutral_special_rows(vlm, tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    vlm.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    image_processor.save_pretrained(args.out)
    atomic_write_json(args.out / "metrics.json", {
        "test": test, "val_curve": curve, "history": history, "examples": examples,
        "preset": tiny.VLM_PRESETS[args.preset], "init": str(args.init) if args.init else None,
        "warm_start": str(args.warm_start) if args.warm_start else None,
        "system_prompt": system_prompt,
        "parameters": sum(p.numel() for p in vlm.parameters()),
        "image_tokens": encoder.num_image_tokens, "vocab_size": len(tokenizer),
        "norms": norms, "lookup_probe_test_balanced_accuracy": lookup_test,
        "setup_seconds": round(setup_seconds, 1), "tower_seconds": round(tower_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "s_per_step": round(train_seconds / args.steps, 3),
        "data_s_per_step": round(data_seconds / args.steps, 3),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **provenance(),
    })
    print(f"wrote {args.out / 'metrics.json'} and the VLM, tokenizer and image processor "
          f"to {args.out}")


if __name__ == "__main__":
    main()
