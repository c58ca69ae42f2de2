"""What a pretrained SAM's frozen image embedding knows about objects (issue #16 diagnosis).

KeySeg fine-tuning freezes SAM's image encoder and asks the mask decoder to find an object
from a concept-like ``[SEG]`` prompt. That only works if the frozen embedding says *what*
is where. Two measurements on a SAM directory (``experiments/pretrain_sam.py`` output):

1. **Linear probes**: per-cell colour and kind classifiers fitted on frozen embeddings of
   ``--train-images`` train images, accuracy on the foreground cells of ``--val-images``
   val images (chance: 1/6 colour, 1/8 kind).
2. **Concept lookup with the encoder frozen**: the mask decoder plus a learned colour/kind
   prompt table (``pretrain_sam.ConceptPrompts``, fed as KeySeg feeds ``[SEG]``) trained for
   ``--steps`` steps; val mIoU of the colour + kind concepts, next to two baselines that use
   no concept at all or the colour only: every object's mask, and the mask of every object
   of the named colour. The val mIoU is also given by form (``val_miou_by_form``: colour +
   kind, colour alone, kind alone), with the every-object baseline of each form: can the
   decoder find "the circles" without a colour to go by?

    OMP_NUM_THREADS=1 python experiments/sam_semantics.py src/keyseg/assets/lab/sam-shapes192 \\
        --out runs/sam_semantics/shipped.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_sam as stage1
from provenance import provenance

from keyseg.convert.sam import load_sam
from keyseg.data.shapes import ShapesDataset
from keyseg.io import atomic_write_json
from keyseg.model.sam import sam_config


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of two bool masks (1.0 when both are empty)."""
    union = (pred | target).sum()
    return float((pred & target).sum() / union) if union else 1.0


def with_oracle_features(embedding: torch.Tensor, cells: torch.Tensor,
                         scale: float = 3.0) -> torch.Tensor:
    """``(1, C, h, w)`` embedding whose first ``7 + 9`` channels are replaced by the one-hot
    colour and kind (background included) of each cell (``cells``: ``(2, h*w)``)."""
    from keyseg.data.shapes import COLOURS, KINDS

    out = embedding.clone()
    _, _, height, width = out.shape
    colour = torch.nn.functional.one_hot(cells[0], len(COLOURS) + 1).T  # (7, h*w)
    kind = torch.nn.functional.one_hot(cells[1], len(KINDS) + 1).T  # (9, h*w)
    truth = torch.cat([colour, kind]).float().reshape(1, -1, height, width) * scale
    out[:, :truth.shape[1]] = truth
    return out


def probe_accuracy(train: list[dict], val: list[dict], steps: int = 300) -> dict[str, float]:
    """Linear colour/kind probes on frozen embeddings: accuracy on val foreground cells."""
    probe = stage1.EmbeddingProbe(train[0]["embedding"].shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    embeddings = torch.cat([s["embedding"] for s in train])
    labels = torch.stack([s["cells"] for s in train])
    for _ in range(steps):
        loss = probe(embeddings, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        cells = torch.cat([s["embedding"] for s in val]).flatten(2).transpose(1, 2).flatten(0, 1)
        truth = torch.stack([s["cells"] for s in val])  # (N, 2, h*w)
        colour_true, kind_true = truth[:, 0].flatten(), truth[:, 1].flatten()
        foreground = colour_true > 0
        colour = probe.colour(cells).argmax(1)[foreground] == colour_true[foreground]
        kind = probe.kind(cells).argmax(1)[foreground] == kind_true[foreground]
    return {"colour_accuracy": float(colour.float().mean()),
            "kind_accuracy": float(kind.float().mean()),
            "foreground_cells": int(foreground.sum()), "train_loss": float(loss.detach())}


#: How an evaluation concept names its objects: by colour and kind, by colour alone ("the
#: red ones") or by kind alone ("the circles"): stage 3's kind-only queries need the last.
CONCEPT_FORMS = ("colour kind", "colour", "kind")


def concept_forms(sample: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each form's concepts about ``sample``, every distinct one once: ``(k, 2)`` long
    (colour, kind) pairs ("any" where the form leaves one out) and their ``(k, low, low)``
    targets (the union of the objects named)."""
    present = list(dict.fromkeys(sample["concepts"]))
    pairs = {
        "colour kind": present,
        "colour": [(c, stage1.ANY_KIND) for c in dict.fromkeys(c for c, _ in present)],
        "kind": [(stage1.ANY_COLOUR, k) for k in dict.fromkeys(k for _, k in present)],
    }
    return {form: (torch.tensor(named, dtype=torch.long), stage1.concept_targets(sample, named))
            for form, named in pairs.items()}


def concept_baselines(val: list[dict]) -> dict[str, float]:
    """mIoU of the exact concepts if one predicted every object, or every object of the
    named colour (what a decoder that ignores the kind could reach at best)."""
    every, same_colour = [], []
    for sample in val:
        pairs, targets = stage1.concept_queries(sample, np.random.default_rng(0), 0, exact=True)
        objects = sample["target"] > 0.5
        for (colour, _), target in zip(pairs.tolist(), targets > 0.5, strict=True):
            every.append(iou(objects.any(0), target))
            rows = [i for i, (c, _) in enumerate(sample["concepts"]) if c == colour]
            same_colour.append(iou(objects[rows].any(0), target))
    every_by_form: dict[str, list[float]] = {form: [] for form in CONCEPT_FORMS}
    for sample in val:
        objects = (sample["target"] > 0.5).any(0)
        for form, (_, targets) in concept_forms(sample).items():
            every_by_form[form] += [iou(objects, target) for target in targets > 0.5]
    return {"every_object": float(np.mean(every)), "same_colour": float(np.mean(same_colour)),
            "every_object_by_form": {form: float(np.mean(values))
                                     for form, values in every_by_form.items()}}


def concept_lookup(sam, train: list[dict], val: list[dict], steps: int, lr: float,
                   rng: np.random.Generator, images_per_step: int = 8) -> list[dict]:
    """Train the decoder + a concept table on frozen embeddings; the val mIoU curve."""
    concepts = stage1.ConceptPrompts(train[0]["embedding"].shape[1])
    params = [*sam.sam.mask_decoder.parameters(), *concepts.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def score() -> dict[str, float]:
        ious: dict[str, list[float]] = {form: [] for form in CONCEPT_FORMS}
        with torch.no_grad():
            for sample in val:
                for form, (pairs, targets) in concept_forms(sample).items():
                    logits, _ = sam.decode_many(sample["embedding"],
                                                torch.zeros(len(pairs), dtype=torch.long),
                                                concepts(pairs))
                    ious[form] += [iou(p, t)
                                   for p, t in zip(logits > 0, targets > 0.5, strict=True)]
        return {form: float(np.mean(values)) for form, values in ious.items()}

    curve = []
    for step in range(1, steps + 1):
        loss = torch.zeros(())
        for index in rng.integers(len(train), size=images_per_step):
            sample = train[int(index)]
            pairs, targets = stage1.concept_queries(sample, rng, 4)
            logits, iou_pred = sam.decode_many(sample["embedding"],
                                               torch.zeros(len(pairs), dtype=torch.long),
                                               concepts(pairs))
            _, dice, iou_mse, bce = stage1.losses(logits, targets, iou_pred)
            loss = loss + (dice + bce + iou_mse) / images_per_step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 6) == 0 or step == steps:
            by_form = score()
            curve.append({"step": step, "loss": round(float(loss.detach()), 4),
                          "val_miou": by_form["colour kind"], "val_miou_by_form": by_form})
            print(f"concept lookup step {step}: val mIoU " + ", ".join(
                f"{form} {value:.3f}" for form, value in by_form.items()), flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sam", type=Path, help="a SAM directory (save_pretrained)")
    parser.add_argument("--preset", default="shapes192")
    parser.add_argument("--prompt-dim", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=30)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--oracle-features", action="store_true",
                        help="overwrite the first channels of every embedding cell with its "
                             "true colour and kind (one-hot): can the decoder look concepts "
                             "up when the features are perfect?")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    sam = load_sam(args.sam, expected=sam_config(args.preset, prompt_dim=args.prompt_dim))
    low_res = 4 * sam.embedding_size
    train_split, val_split = ShapesDataset("train"), ShapesDataset("val")
    train = [stage1.prepare(train_split[i], sam, low_res) for i in range(args.train_images)]
    val = [stage1.prepare(val_split[i], sam, low_res) for i in range(args.val_images)]
    sam.eval()
    with torch.no_grad():
        for sample in train + val:  # frozen: encode once
            sample["embedding"] = sam.encode_images(sample["pixels"][None])
            if args.oracle_features:
                sample["embedding"] = with_oracle_features(sample["embedding"],
                                                           sample["cells"])
    probes = probe_accuracy(train[:200], val)
    print(f"linear probes on val foreground cells: colour {probes['colour_accuracy']:.3f} "
          f"(chance 0.167), kind {probes['kind_accuracy']:.3f} (chance 0.125)")
    baselines = concept_baselines(val)
    print(f"concept baselines: every object {baselines['every_object']:.3f}, "
          f"same colour {baselines['same_colour']:.3f}")
    curve = concept_lookup(sam, train, val, args.steps, args.lr, rng)
    atomic_write_json(args.out, {
        "sam": str(args.sam), "oracle_features": args.oracle_features, "probes": probes,
        "concept_baselines": baselines,
        "concept_lookup": curve, "seconds": round(time.perf_counter() - started, 1),
        **provenance(),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
