"""Does the VLM's image side know whether a shape is there? (issue #16 diagnosis)

The lab's models answer "There is no such shape" about as often when the shape is there as
when it is not (docs/RESULTS.md, "Negatives are answered by wording"). This asks where the
knowledge stops: in the image tokens the language model reads, or in the language model's
lookup of them. For every test image and every concept of the shapes world (8 kinds, 6
colours, 48 colour+kind pairs) the label is "some visible object has it"; the features are
the image tokens after the projector (what the LM reads), pooled over the image two ways:

- ``max``: each channel's largest value over the image tokens (a detector that fires on one
  patch survives; what one attention head could read);
- ``mean``: each channel's mean.

With ``--qa``, each HF LLaVA directory also answers the existence questions of the stage 2
QA on ``--qa-images`` test images (``pretrain_vlm.eval_items``, greedy, exact match), scored
per wording family: "is there anything {colour}?" (``c``), "is there a {kind}?" (``k``),
"is there a {colour} {kind}?" (``ck``), about half of each answered "yes". It also scores
the verdict teacher-forced after the thing's name (``forced_verdicts``: "red star:" fed, then
" yes" vs " no" compared), for the existence questions and for ``pretrain_vlm``'s lookup turn,
so a VLM that does not repeat the asked thing is still scored on its verdict.

One logistic regression per concept (not one shared classifier fed a concept one-hot,
which would hide whether each concept can be read), fitted on ``--train-images`` train
images and scored on ``--test-images`` test images, gives a balanced accuracy per concept;
the report averages them per family (kind, colour, pair). Chance is 0.5. A model
directory is a KeySeg export (``keyseg export``) or a HF LLaVA directory (the stage 2 VLM).

    OMP_NUM_THREADS=1 python experiments/vlm_existence.py src/keyseg/assets/default_model \\
        src/keyseg/assets/lab/vlm-shapes --out experiments/results/vlm_existence.json
    OMP_NUM_THREADS=1 python experiments/vlm_existence.py runs/vlm_pretrain/shapes192_E0 \\
        runs/vlm_pretrain/shapes192_E1 --qa --out runs/vlm_existence_E.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_vlm as stage2

from keyseg.data.shapes import ShapesDataset
from keyseg.data.shapes.qa import normalise_answer
from keyseg.io import atomic_write_json


def load_vision(path: Path):
    """(llava model, image processor) of a KeySeg export or a HF LLaVA directory."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    if (path / "keyseg_processor.json").is_file():
        from keyseg.model.keyseg import KeySegModel

        model = KeySegModel.from_pretrained(path)
        return model.backbone.base, model.processor.image_processor
    return (LlavaForConditionalGeneration.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path))


@torch.no_grad()
def image_tokens(vlm, image_processor, records) -> torch.Tensor:
    """``(N, T, D)``: the projected image tokens of each record (fp32)."""
    vlm.eval()
    rows = []
    for record in records:
        pixels = image_processor(images=[record.image], return_tensors="pt")["pixel_values"]
        rows.append(stage2.projected_image_tokens(vlm, pixels)[0].float())
    return torch.stack(rows)


def pooled_features(tokens: torch.Tensor) -> np.ndarray:
    """``(N, 2 * D)``: [max, mean] over the image tokens ``(N, T, D)``."""
    return torch.cat([tokens.max(1).values, tokens.mean(1)], dim=-1).numpy()


class AttentionProbe(torch.nn.Module):
    """What one softmax attention head can read: per concept a learned query attends over the
    layer-normed image tokens (keys and values shared by all concepts, as an LM head's are
    shared by all questions), and a linear read-out of the attended value says present or
    absent. ``(N, T, D)`` tokens -> ``(N, C)`` logits."""

    def __init__(self, dim: int, concepts: int, head_dim: int = 32) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.key = torch.nn.Linear(dim, head_dim)
        self.value = torch.nn.Linear(dim, head_dim)
        self.query = torch.nn.Parameter(torch.randn(concepts, head_dim) * head_dim ** -0.5)
        self.readout = torch.nn.Parameter(torch.zeros(concepts, head_dim))
        self.bias = torch.nn.Parameter(torch.zeros(concepts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        keys, values = self.key(x), self.value(x)  # (N, T, h)
        scores = torch.einsum("ch,nth->nct", self.query, keys) / keys.shape[-1] ** 0.5
        attended = torch.einsum("nct,nth->nch", scores.softmax(-1), values)  # (N, C, h)
        return (attended * self.readout).sum(-1) + self.bias


def fit_attention_probe(tokens: torch.Tensor, labels: torch.Tensor, steps: int = 600,
                        lr: float = 3e-3, seed: int = 0) -> AttentionProbe:
    """Class-balanced BCE per concept, full batch, Adam. ``labels``: ``(N, C)`` in {0, 1}."""
    torch.manual_seed(seed)
    probe = AttentionProbe(tokens.shape[-1], labels.shape[1])
    pos = labels.mean(0).clamp(1e-3, 1 - 1e-3)
    weight = torch.where(labels > 0, 0.5 / pos, 0.5 / (1 - pos))
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(tokens), labels,
                                                                    weight=weight)
        loss.backward()
        optimizer.step()
    return probe


def attention_probe_scores(train_tokens: torch.Tensor, train_y: dict[str, np.ndarray],
                           test_tokens: torch.Tensor, test_y: dict[str, np.ndarray]) -> dict:
    """Balanced accuracy per family of :class:`AttentionProbe` on the test tokens."""
    names = [c for c, y in train_y.items() if y.any() and not y.all()]
    labels = torch.from_numpy(np.stack([train_y[c] for c in names], 1)).float()
    mu, sd = train_tokens.mean((0, 1)), train_tokens.std((0, 1)) + 1e-6
    probe = fit_attention_probe((train_tokens - mu) / sd, labels)
    with torch.no_grad():
        pred = (probe((test_tokens - mu) / sd) > 0).numpy()
    by_family: dict[str, list[float]] = {}
    for i, concept in enumerate(names):
        acc = balanced_accuracy(pred[:, i], test_y[concept])
        if acc is not None:
            by_family.setdefault(concept.split(":")[0], []).append(acc)
    return {family: round(float(np.mean(v)), 4) for family, v in by_family.items()}


def concept_labels(records) -> dict[str, np.ndarray]:
    """``{concept: (N,) bool}``: whether a visible object of the record has the concept."""
    labels = torch.stack([stage2.existence_labels(r) for r in records]).numpy() > 0.5
    names = [f"kind:{k}" if c is None else f"colour:{c}" if k is None else f"pair:{c} {k}"
             for c, k in stage2.EXISTENCE_CONCEPTS]  # the stage 2 probe's concepts
    return {name: labels[:, i] for i, name in enumerate(names)}


def balanced_accuracy(pred: np.ndarray, label: np.ndarray) -> float | None:
    if label.all() or not label.any():
        return None
    return 0.5 * (float((pred[label]).mean()) + float((~pred[~label]).mean()))


def fit_probe(x: np.ndarray, y: np.ndarray, steps: int = 300) -> torch.nn.Linear:
    """Class-balanced logistic regression (L2 1e-3) by full-batch L-BFGS."""
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    probe = torch.nn.Linear(x.shape[1], 1)
    pos = yt.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(yt > 0, 0.5 / pos, 0.5 / (1 - pos))
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = probe(xt).squeeze(-1)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, weight=weight)
                + 1e-3 * probe.weight.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def probe_model(path: Path, train_records, test_records, attention: bool = False) -> dict:
    start = time.perf_counter()
    vlm, image_processor = load_vision(path)
    train_tokens = image_tokens(vlm, image_processor, train_records)
    test_tokens = image_tokens(vlm, image_processor, test_records)
    train_x, test_x = pooled_features(train_tokens), pooled_features(test_tokens)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    half = train_x.shape[1] // 2
    train_y, test_y = concept_labels(train_records), concept_labels(test_records)
    result: dict = {"model": str(path)}
    for pooling, cols in (("max", slice(0, half)), ("mean", slice(half, None))):
        by_family: dict[str, list[float]] = {}
        for concept, y in train_y.items():
            if y.all() or not y.any():
                continue
            probe = fit_probe(train_x[:, cols], y)
            with torch.no_grad():
                pred = probe(torch.from_numpy(test_x[:, cols]).float()).squeeze(-1).numpy() > 0
            acc = balanced_accuracy(pred, test_y[concept])
            if acc is not None:
                by_family.setdefault(concept.split(":")[0], []).append(acc)
        result[pooling] = {family: round(float(np.mean(v)), 4) for family, v in by_family.items()}
        result[pooling]["concepts"] = {f: len(v) for f, v in by_family.items()}
    if attention:
        result["attention"] = attention_probe_scores(train_tokens, train_y, test_tokens, test_y)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def qa_model(path: Path):
    """(llava model, tokenizer, stage 2 QA encoder) of a HF LLaVA directory, prompted with
    the lab's system prompt (``configs/tiny-shapes.yaml``)."""
    from keyseg.build import build_vlm
    from keyseg.config import BackboneConfig, load_config

    system_prompt = load_config(stage2.ROOT / "configs" / "tiny-shapes.yaml").model.backbone \
        .system_prompt
    vlm, image_processor, tokenizer = build_vlm(BackboneConfig(name_or_path=str(path),
                                                               system_prompt=system_prompt))
    return vlm, tokenizer, stage2.QAEncoder(tokenizer, image_processor, vlm.config,
                                            system_prompt)


def verdict(answer: str) -> str:
    """The last word of a normalised answer: "yes" of "Red star: yes." ("" when empty)."""
    words = normalise_answer(answer).split()
    return words[-1] if words else ""


def existence_qa(path: Path, images: int) -> dict:
    """Accuracy of the yes/no on the stage 2 existence questions of ``images`` test images,
    per wording family (``c``, ``k``, ``ck``) and ``all``: the answer's last word, so a
    VLM trained to restate the thing first ("red star: no") is scored on its verdict.

    For such a VLM, ``restated``: the share of answers that name the thing asked about, and
    the verdict's accuracy among those (``right_when_named``) and the others."""
    vlm, _, encoder = qa_model(path)
    # restated gold answers ("red star: no"): the same questions, the asked thing spelled out
    items = [item for item in stage2.eval_items("test", images, restate=True)
             if item[1].qtype == "existence"]
    replies = stage2.answer_all(vlm, encoder, items)
    right: dict[str, list[bool]] = {}
    named: list[tuple[bool, bool]] = []
    for (_, pair), reply in zip(items, replies, strict=True):
        ok = verdict(reply) == verdict(pair.answer)
        right.setdefault(pair.template_id.split(".")[1], []).append(ok)
        right.setdefault("all", []).append(ok)
        if ":" in reply:
            thing = normalise_answer(reply.split(":")[0])
            named.append((thing == normalise_answer(pair.answer.split(":")[0]), ok))
    out = {k: round(sum(v) / len(v), 4) for k, v in sorted(right.items())} | {
        "questions": {k: len(v) for k, v in sorted(right.items())}}
    if named:
        hits = [ok for is_named, ok in named if is_named]
        misses = [ok for is_named, ok in named if not is_named]
        out["restated"] = {
            "answers": len(named), "named_the_asked_thing": round(len(hits) / len(named), 4),
            "right_when_named": round(sum(hits) / len(hits), 4) if hits else None,
            "right_when_not": round(sum(misses) / len(misses), 4) if misses else None}
    return out


def verdict_token_ids(tokenizer) -> tuple[int, int]:
    """The first token of " yes" and of " no", where a restated verdict is decided (a tiny
    BPE may split them: " y"+"es", " "+"no"; the first tokens must differ)."""
    yes, no = (tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in ("yes", "no"))
    if yes == no:
        raise ValueError("' yes' and ' no' start with the same token: no forced verdict")
    return yes, no


def _balanced(pairs: list[tuple[bool, bool]]) -> float | None:
    """Balanced accuracy of (said yes, truth) pairs; None without both classes."""
    said = np.array([s for s, _ in pairs], dtype=bool)
    truth = np.array([t for _, t in pairs], dtype=bool)
    score = balanced_accuracy(said, truth) if pairs else None
    return None if score is None else round(score, 4)


@torch.no_grad()
def forced_verdicts(path: Path, images: int, batch_size: int = 16,
                    bare: bool = False) -> dict:
    """The verdict with the thing's name given, teacher-forced: the yes/no the LM head
    prefers right after "{thing}:" (the first tokens of " yes" and " no" compared), as
    balanced accuracy.

    - ``existence``: the restated answer of each existence question ("red star: no") fed
      after the question; scored at its colon, per wording family (``c``, ``k``, ``ck``);
    - ``lookup``: the lookup turn (``pretrain_vlm.lookup_turn``) of each test image fed
      whole; scored at every verdict, per family (``kind``, ``colour``, ``pair``).

    This separates the verdict from naming the thing (``restated`` in :func:`existence_qa`).
    ``bare``: the lookup turn as ``pretrain_vlm.py --lookup-bare`` words it ("star yes"),
    scored right after each name."""
    from keyseg.data.shapes import COLOURS, KINDS

    vlm, tokenizer, encoder = qa_model(path)
    vlm.eval()
    yes_no = list(verdict_token_ids(tokenizer))
    colon = stage2.single_token(tokenizer, ":")

    def prefers_yes(batch: dict, positions: list[list[int]]) -> list[list[bool]]:
        logits = vlm(**{k: v for k, v in batch.items() if k in (
            "input_ids", "attention_mask", "pixel_values")}).logits
        return [[bool(logits[row, p - 1, yes_no].argmax() == 0) for p in where]
                for row, where in enumerate(positions)]

    items = [item for item in stage2.eval_items("test", images, restate=True)
             if item[1].qtype == "existence"]
    existence: dict[str, list[tuple[bool, bool]]] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        batch = encoder.train_batch([(image, [pair]) for image, pair in chunk])
        ids = batch["input_ids"]
        # the verdict token follows the last colon of the answer
        positions = [[int((row == colon).nonzero().flatten()[-1]) + 1] for row in ids]
        for (_, pair), said in zip(chunk, prefers_yes(batch, positions), strict=True):
            truth = verdict(pair.answer) == "yes"
            for key in (pair.template_id.split(".")[1], "all"):
                existence.setdefault(key, []).append((said[0], truth))
    dataset, rng = ShapesDataset("test"), np.random.default_rng(0)
    lookup: dict[str, list[tuple[bool, bool]]] = {}
    for start in range(0, images, batch_size):
        records = [dataset[i] for i in range(start, min(images, start + batch_size))]
        turns = [stage2.lookup_turn(r, rng, bare=bare) for r in records]
        batch = encoder.train_batch([(r.image, [t]) for r, t in zip(records, turns,
                                                                    strict=True)],
                                    stage2.lookup_verdicts(tokenizer, bare=bare))
        positions = [row.nonzero().flatten().tolist() for row in batch["verdict_first"]]
        for turn, said in zip(turns, prefers_yes(batch, positions), strict=True):
            items_said = [item.rsplit(" " if bare else ": ", 1)
                          for item in turn.answer.split(", ")]
            for (name, gold), guess in zip(items_said, said, strict=True):
                family = ("kind" if name in KINDS else "colour" if name in COLOURS
                          else "pair")
                for key in (family, "all"):
                    lookup.setdefault(key, []).append((guess, gold == "yes"))
    return {"existence": {k: _balanced(v) for k, v in sorted(existence.items())},
            "lookup": {k: _balanced(v) for k, v in sorted(lookup.items())},
            "questions": {k: len(v) for k, v in sorted(existence.items())}}


@torch.no_grad()
def question_states(path: Path, records, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The LM's hidden states for "Is there a {kind}?" about each record, half of them about
    a kind that is there: ``(N, layers + 1, 2, H)`` at the kind's word and at the answer
    position (the prompt's last token), and the ``(N,)`` labels."""
    from keyseg import tokens
    from keyseg.data.shapes import KINDS

    vlm, tokenizer, encoder = qa_model(path)
    vlm.eval()
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for record in records:
        present = sorted({o["kind"] for o in record.meta["objects"]})
        absent = [k for k in KINDS if k not in present]
        ask_present = bool(rng.random() < 0.5 and present) or not absent
        kind = str(rng.choice(present if ask_present else absent))
        article = "an" if kind[0] in "aeiou" else "a"
        ids = encoder.encode([tokens.Turn(f"Is there {article} {kind}?")]).input_ids
        word = stage2.last_token_of(tokenizer(" " + kind, add_special_tokens=False).input_ids,
                                    ids.tolist())
        out = vlm(input_ids=ids[None], pixel_values=encoder.pixels([record.image]),
                  output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)[:, 0]  # (layers + 1, L, H)
        rows.append(hidden[:, [word, len(ids) - 1]].float())
        labels.append(ask_present)
    return torch.stack(rows), np.array(labels)


def question_state_probes(path: Path, train_records, test_records) -> dict:
    """Balanced accuracy of a logistic probe for "the asked kind is there", per LM layer,
    on the states at the kind's word and at the answer position of "Is there a {kind}?"."""
    train_x, train_y = question_states(path, train_records, seed=0)
    test_x, test_y = question_states(path, test_records, seed=1)
    result: dict = {}
    for where, column in (("word", 0), ("answer", 1)):
        scores = []
        for layer in range(train_x.shape[1]):
            x, t = train_x[:, layer, column].numpy(), test_x[:, layer, column].numpy()
            mu, sd = x.mean(0), x.std(0) + 1e-6
            probe = fit_probe((x - mu) / sd, train_y)
            with torch.no_grad():
                pred = probe(torch.from_numpy((t - mu) / sd).float()).squeeze(-1).numpy() > 0
            scores.append(round(balanced_accuracy(pred, test_y) or 0.5, 4))
        result[where] = scores  # index 0: the embeddings, i: after layer i
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+",
                        help="KeySeg export(s) or HF LLaVA director(y/ies)")
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--qa", action="store_true",
                        help="also score the existence questions (HF LLaVA directories)")
    parser.add_argument("--qa-images", type=int, default=200)
    parser.add_argument("--lookup-bare", action="store_true",
                        help="with --qa: score the lookup turn worded as pretrain_vlm.py "
                             "--lookup-bare trains it (\"star yes\", no colon)")
    parser.add_argument("--question-states", action="store_true",
                        help="also probe the LM's states at the kind's word and at the answer "
                             "position of 'Is there a {kind}?', per layer (HF LLaVA directories)")
    parser.add_argument("--attention-probe", action="store_true",
                        help="also fit AttentionProbe: what one softmax attention head with a "
                             "learned query per concept reads from the tokens")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.lookup_bare and not args.qa:
        parser.error("--lookup-bare words the lookup turn that --qa scores: give --qa too")
    for path in args.models:
        if not path.is_dir():
            raise SystemExit(f"{path}: not a directory")
    train = ShapesDataset("train")
    test = ShapesDataset("test")
    train_records = [train[i] for i in range(args.train_images)]
    test_records = [test[i] for i in range(args.test_images)]
    results = []
    for path in args.models:
        result = probe_model(path, train_records, test_records, args.attention_probe)
        if args.qa and not (path / "keyseg_processor.json").is_file():
            result["existence_qa"] = existence_qa(path, args.qa_images)
            print(f"{path}: existence questions, accuracy {result['existence_qa']}")
            result["forced_verdicts"] = forced_verdicts(path, args.qa_images,
                                                        bare=args.lookup_bare)
            print(f"{path}: verdicts after the name, teacher-forced (balanced accuracy): "
                  f"{result['forced_verdicts']}")
        if args.question_states and not (path / "keyseg_processor.json").is_file():
            result["question_states"] = question_state_probes(path, train_records, test_records)
            print(f"{path}: 'is there a {{kind}}?' read from the LM's states, by layer: "
                  f"{result['question_states']}")
        results.append(result)
        for pooling in ("max", "mean", "attention"):
            if pooling not in result:
                continue
            scores = ", ".join(f"{k} {v:.3f}" for k, v in result[pooling].items()
                               if k != "concepts")
            print(f"{path}: {pooling}-pooled image tokens, balanced accuracy: {scores}")
    if args.out:
        atomic_write_json(args.out, {"device": f"cpu ({platform.processor() or 'unknown'})",
                                     "train_images": args.train_images,
                                     "test_images": args.test_images, "results": results})


if __name__ == "__main__":
    main()
