"""Pretrain a tiny SAM the way SAM is trained, on the shapes world (issue #16, stage 1).

Class-agnostic and promptable: every visible object of every image is a training mask,
prompted by one random interior point or by its box (SAM's point/box prompts, not KeySeg's
[SEG] prompt), and with ``--concepts-per-image`` also by learned colour/kind "concept"
tokens fed the way KeySeg feeds [SEG]; SAM's losses: focal 20 : dice 1 on the mask, plus
the IoU head regressed onto the mask's actual IoU (MSE), so the score SAM prints means
something. The image encoder,
prompt encoder and mask decoder all train; KeySeg fine-tuning later freezes the first two.

    OMP_NUM_THREADS=1 python experiments/pretrain_sam.py --preset shapes --steps 2000 \\
        --out runs/sam_pretrain/shapes

Prints losses every ``--log-every`` steps and, at the end, the point-prompted mIoU on
``--eval-images`` test images (each object prompted by its most interior pixel), the box-
prompted mIoU, and the correlation of the IoU head with the real IoU; writes
``metrics.json`` (with the command, timing and machine) and the SAM weights
(``save_pretrained``) to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_losses import colour_kind_loss
from provenance import provenance

from keyseg.data.shapes import (
    COLOURS,
    KINDS,
    ShapesDataset,
    cell_labels,
    scene_from_record,
)
from keyseg.io import atomic_write_json
from keyseg.model.sam import SamSegmenter
from keyseg.transforms import sam_preprocess


def visible_objects(scene) -> tuple[np.ndarray, list]:
    """``(n, S, S)`` bool masks of what each object of a scene shows after occlusion, and
    those ``n`` objects (the ones that show nothing are dropped)."""
    shows = scene.visible.reshape(len(scene.visible), -1).any(1)
    return scene.visible[shows], [o for o, keep in zip(scene.objects, shows, strict=True)
                                  if keep]


def visible_masks(record) -> np.ndarray:
    """``(n, S, S)`` bool: what each visible object of a shapes record shows."""
    return visible_objects(scene_from_record(record))[0]


def prepare(record, sam: SamSegmenter, low_res: int) -> dict:
    """SAM input, the objects' masks at the low-res output size and in input coordinates."""
    sam_input = sam_preprocess(record.image, sam.image_size)
    scene = scene_from_record(record)
    visible, objects = visible_objects(scene)
    masks = torch.from_numpy(visible).float()  # (n, H, W)
    h, w = sam_input.resized_size
    resized = F.interpolate(masks[None], size=(h, w), mode="nearest")[0]
    padded = torch.zeros(len(masks), sam.image_size, sam.image_size)
    padded[:, :h, :w] = resized
    target = F.adaptive_avg_pool2d(padded[None], low_res)[0] > 0.5  # (n, low, low)
    return {"pixels": sam_input.pixel_values, "input_masks": padded > 0.5,
            "target": target.float(),
            "concepts": [(COLOUR_INDEX[o.colour], KIND_INDEX[o.kind]) for o in objects],
            "cells": torch.from_numpy(cell_labels(scene, sam.embedding_size)).long()}


class EmbeddingProbe(torch.nn.Module):
    """``--patch-loss-weight``: linear colour and kind classifiers on every cell of SAM's
    image embedding. SAM's class-agnostic objective never asks the encoder what an object
    is, and looking an object up by concept needs exactly that; ViT-H arrives with it from
    MAE pretraining on a billion masks, the tiny encoder gets it from this probe. Not
    shipped."""

    def __init__(self, channels: int, kind_on_objects: bool = False) -> None:
        super().__init__()
        self.colour = torch.nn.Linear(channels, len(COLOURS) + 1)
        self.kind = torch.nn.Linear(channels, len(KINDS) + 1)
        self.kind_on_objects = kind_on_objects

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean CE over ``(B, C, h, w)`` embeddings and ``(B, 2, h * w)`` cell labels
        (``kind_on_objects``: the kind term on object cells only, ``probe_losses``)."""
        cells = embeddings.flatten(2).transpose(1, 2).flatten(0, 1)  # (B*h*w, C)
        return colour_kind_loss(self.colour(cells), self.kind(cells),
                                labels.transpose(0, 1).flatten(1), self.kind_on_objects)


# ---------------------------------------------------------------------------- concepts
# A stand-in for the semantic features a real SAM's ViT-H brings from its pretraining: a
# learned embedding per colour and per kind ("any" is the last row of each), summed into one
# sparse prompt token, which must find every visible object of that colour and/or kind. It
# goes through the decoder exactly as KeySeg's [SEG] prompt does (SamSegmenter.decode_many),
# so fine-tuning starts from a decoder that can look an object up by what it is. The table
# itself is not shipped: KeySeg's text_hidden_fcs learn to produce such prompts.

COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}
KIND_INDEX = {name: i for i, name in enumerate(KINDS)}
ANY_COLOUR, ANY_KIND = len(COLOURS), len(KINDS)


class ConceptPrompts(torch.nn.Module):
    """``(colour, kind)`` index pairs -> ``(n, C)`` prompt tokens (colour row + kind row)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.colour = torch.nn.Embedding(len(COLOURS) + 1, dim)
        self.kind = torch.nn.Embedding(len(KINDS) + 1, dim)
        for table in (self.colour, self.kind):
            torch.nn.init.normal_(table.weight, std=0.5)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """``pairs``: ``(n, 2)`` long; returns ``(n, dim)``."""
        return self.colour(pairs[:, 0]) + self.kind(pairs[:, 1])


def concept_queries(sample: dict, rng: np.random.Generator, count: int,
                    exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` concepts about one image and their targets: ``(k, 2)`` long (colour, kind)
    pairs and ``(k, low, low)`` float union masks of the visible objects they name.

    Each names a random object by colour and kind, by colour only or by kind only (``exact``:
    always both, each object once, for evaluation); one in eight is a random pair, mostly
    one the image lacks (target empty), so "nothing there" is learnt too.
    """
    concepts = sample["concepts"]
    pairs: list[tuple[int, int]] = []
    if exact:
        pairs = list(dict.fromkeys(concepts))
    else:
        for _ in range(count):
            if rng.random() < 0.125:
                pair = (int(rng.integers(len(COLOURS))), int(rng.integers(len(KINDS))))
            else:
                colour, kind = concepts[int(rng.integers(len(concepts)))]
                form = rng.random()
                pair = (colour, kind) if form < 0.5 else (
                    (colour, ANY_KIND) if form < 0.75 else (ANY_COLOUR, kind))
            pairs.append(pair)
    return torch.tensor(pairs, dtype=torch.long), concept_targets(sample, pairs)


def concept_targets(sample: dict, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """``(k, low, low)`` float: for each ``(colour, kind)`` pair (either may be "any"), the
    union of the visible objects of ``sample`` it names (empty if none)."""
    concepts, target = sample["concepts"], sample["target"]
    masks = []
    for colour, kind in pairs:
        hits = [i for i, (c, k) in enumerate(concepts)
                if colour in (c, ANY_COLOUR) and kind in (k, ANY_KIND)]
        masks.append(target[hits].amax(0) if hits else torch.zeros_like(target[0]))
    return torch.stack(masks)


def prompts(masks: torch.Tensor, rng: np.random.Generator, kind: str,
            interior: bool = False, per_object: int = 1) -> tuple[torch.Tensor, ...]:
    """``per_object`` prompts per object, object-major: one point each ``(n*k, 1, 2)`` (x, y in
    input pixels; random inside, or the most interior pixel) with label 1, or the box
    ``(n*k, 4)`` xyxy (the same box ``k`` times)."""
    points, boxes = [], []
    for mask in masks.numpy():
        ys, xs = np.nonzero(mask)
        if kind == "box":
            boxes += [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]] * per_object
            continue
        if interior:  # the pixel farthest from the background, found by erosion
            core = torch.from_numpy(mask).float()[None, None]
            while True:
                eroded = -F.max_pool2d(-core, 3, 1, 1)
                if eroded.sum() == 0:
                    break
                core = eroded
            ys, xs = np.nonzero(core[0, 0].numpy())
            picks = [len(xs) // 2] * per_object
        else:
            picks = rng.integers(len(xs), size=per_object)
        points += [[[xs[pick] + 0.5, ys[pick] + 0.5]] for pick in picks]
    if kind == "box":
        return (torch.tensor(boxes, dtype=torch.float32),)
    return torch.tensor(points, dtype=torch.float32), torch.ones(len(points), 1)


def decode(sam: SamSegmenter, embedding: torch.Tensor, kind: str,
           prompt: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's objects through SAM's prompt encoder and mask decoder: ``(n, low, low)``
    mask logits and ``(n,)`` predicted IoU."""
    if kind == "box":
        out = sam.sam(image_embeddings=embedding[None], input_boxes=prompt[0][None],
                      multimask_output=False)
    else:
        points, labels = prompt
        out = sam.sam(image_embeddings=embedding[None], input_points=points[None],
                      input_labels=labels[None], multimask_output=False)
    return out.pred_masks[0, :, 0], out.iou_scores[0, :, 0]


def losses(logits: torch.Tensor, target: torch.Tensor,
           iou_pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per mask SAM's focal (alpha 0.25, gamma 2) and dice losses and plain BCE, and the
    IoU-head MSE; each averaged over masks: ``(focal, dice, iou_mse, bce)``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha = 0.25 * target + 0.75 * (1 - target)
    focal = (alpha * ce * (1 - p_t) ** 2).flatten(1).mean(1)
    inter = (prob * target).flatten(1).sum(1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    with torch.no_grad():
        hard = logits > 0
        real = ((hard & (target > 0.5)).flatten(1).sum(1)
                / ((hard | (target > 0.5)).flatten(1).sum(1).clamp(min=1)))
    return focal.mean(), dice.mean(), F.mse_loss(iou_pred, real), ce.flatten(1).mean(1).mean()


@torch.no_grad()
def evaluate(sam: SamSegmenter, samples: list[dict], kind: str) -> dict[str, float]:
    """mIoU over every object of ``samples`` prompted by its most interior point (or box),
    at the low-res output size; and the IoU head's correlation with the real IoU."""
    sam.eval()
    ious, predicted = [], []
    rng = np.random.default_rng(0)
    for sample in samples:
        embedding = sam.encode_images(sample["pixels"][None])[0]
        logits, iou_pred = decode(sam, embedding, kind,
                                  prompts(sample["input_masks"], rng, kind, interior=True))
        hard, target = logits > 0, sample["target"] > 0.5
        inter = (hard & target).flatten(1).sum(1).float()
        union = (hard | target).flatten(1).sum(1).clamp(min=1).float()
        ious += (inter / union).tolist()
        predicted += iou_pred.tolist()
    sam.train()
    corr = float(np.corrcoef(ious, predicted)[0, 1]) if np.std(predicted) > 0 else 0.0
    return {"miou": float(np.mean(ious)), "objects": len(ious), "iou_head_corr": corr}


@torch.no_grad()
def evaluate_concepts(sam: SamSegmenter, concepts: ConceptPrompts,
                      samples: list[dict]) -> dict[str, float]:
    """mIoU of the colour + kind concept of every distinct object of ``samples`` (its target:
    every visible object of that colour and kind)."""
    sam.eval()
    ious = []
    for sample in samples:
        embedding = sam.encode_images(sample["pixels"][None])
        pairs, target = concept_queries(sample, np.random.default_rng(0), 0, exact=True)
        logits, _ = sam.decode_many(embedding, torch.zeros(len(pairs), dtype=torch.long),
                                    concepts(pairs))
        hard, target = logits > 0, target > 0.5
        inter = (hard & target).flatten(1).sum(1).float()
        union = (hard | target).flatten(1).sum(1).clamp(min=1).float()
        ious += (inter / union).tolist()
    sam.train()
    return {"miou": float(np.mean(ious)), "concepts": len(ious)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shapes", help="SAM preset (keyseg.model.sam)")
    parser.add_argument("--prompt-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--images-per-step", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--focal-weight", type=float, default=20.0,
                        help="weight of the focal loss (SAM: 20; docs/RESULTS.md: at 20:1 this "
                             "tiny SAM collapses to background from scratch)")
    parser.add_argument("--dice-weight", type=float, default=1.0)
    parser.add_argument("--bce-weight", type=float, default=0.0,
                        help="weight of plain per-pixel BCE (LISA's mask loss with dice)")
    parser.add_argument("--prompts-per-object", type=int, default=1,
                        help="prompts per object per step (random points; boxes repeated): "
                             "more mask supervision per image-encoder pass")
    parser.add_argument("--positional-std", type=float, default=1.0,
                        help="std of SAM's random-Fourier positional matrix (segment-anything: "
                             "1.0; transformers' init, encoder width / 2, aliases point "
                             "coordinates on a 24x24 grid)")
    parser.add_argument("--box-fraction", type=float, default=0.3,
                        help="share of images prompted by boxes instead of points")
    parser.add_argument("--concepts-per-image", type=int, default=0,
                        help="also this many concept prompts per image and step (a learned "
                             "colour/kind embedding standing in for semantic features; "
                             "docs/RESULTS.md); 0: point and box prompts only")
    parser.add_argument("--patch-loss-weight", type=float, default=0.0,
                        help="weight of per-cell colour/kind probes on the image embedding "
                             "(EmbeddingProbe); 0: off")
    parser.add_argument("--kind-on-objects", action="store_true",
                        help="the probe's kind loss on cells an object covers only "
                             "(probe_losses; default: every cell, the background included)")
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--val-every", type=int, default=0,
                        help="every this many steps, point mIoU on --val-images val images "
                             "(0: never); the learning curve, kept apart from the test score")
    parser.add_argument("--val-images", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this run's sam/ directory (same preset) with a new "
                             "warm-up + cosine cycle; --positional-std is then not re-drawn")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.init is not None:
        from keyseg.convert.sam import load_sam
        from keyseg.model.sam import sam_config

        sam = load_sam(args.init, expected=sam_config(args.preset, prompt_dim=args.prompt_dim))
    else:
        sam = SamSegmenter.from_preset(args.preset, prompt_dim=args.prompt_dim)
        torch.nn.init.normal_(sam.sam.shared_image_embedding.positional_embedding,
                              std=args.positional_std)
        sam.tie_positional_encoding()
    low_res = 4 * sam.embedding_size
    train, test = ShapesDataset("train"), ShapesDataset("test")
    evaluation = [prepare(test[i], sam, low_res) for i in range(args.eval_images)]
    val = ShapesDataset("val")
    validation = ([prepare(val[i], sam, low_res) for i in range(args.val_images)]
                  if args.val_every else [])
    curve = []
    concepts = ConceptPrompts(args.prompt_dim)
    probe = EmbeddingProbe(args.prompt_dim, kind_on_objects=args.kind_on_objects)
    trained = [*sam.parameters(), *(concepts.parameters() if args.concepts_per_image else []),
               *(probe.parameters() if args.patch_loss_weight else [])]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    # 5% warm-up then cosine (OneCycle); a short test run needs its warm-up end past step 0
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.steps, pct_start=max(0.05, 1.5 / args.steps))
    started, history = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        batch = [prepare(train[int(i)], sam, low_res)
                 for i in rng.integers(len(train), size=args.images_per_step)]
        embeddings = sam.encode_images(torch.stack([b["pixels"] for b in batch]))
        totals = torch.zeros(4)
        loss = embeddings.new_zeros(())
        probe_loss = None
        if args.patch_loss_weight:
            probe_loss = probe(embeddings, torch.stack([b["cells"] for b in batch]))
            loss = loss + args.patch_loss_weight * probe_loss
        for sample, embedding in zip(batch, embeddings, strict=True):
            kind = "box" if rng.random() < args.box_fraction else "point"
            k = args.prompts_per_object
            logits, iou_pred = decode(sam, embedding, kind,
                                      prompts(sample["input_masks"], rng, kind, per_object=k))
            parts = losses(logits, sample["target"].repeat_interleave(k, 0), iou_pred)
            if args.concepts_per_image:
                pairs, concept_target = concept_queries(sample, rng, args.concepts_per_image)
                logits, iou_pred = sam.decode_many(
                    embedding[None], torch.zeros(len(pairs), dtype=torch.long),
                    concepts(pairs))
                parts = tuple((a + b) / 2 for a, b in zip(
                    parts, losses(logits, concept_target, iou_pred), strict=True))
            loss = loss + (args.focal_weight * parts[0] + args.dice_weight * parts[1]
                           + parts[2] + args.bce_weight * parts[3]) / len(batch)
            totals += torch.stack([p.detach() for p in parts]) / len(batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            focal, dice, iou, bce = totals.tolist()
            seconds = time.perf_counter() - started
            history.append({"step": step, "focal": focal, "dice": dice, "iou_mse": iou,
                            "bce": bce, "seconds": round(seconds, 1)})
            if probe_loss is not None:
                history[-1]["probe"] = float(probe_loss)
            print(f"step {step}: focal {focal:.4f} dice {dice:.3f} bce {bce:.4f} "
                  f"iou-mse {iou:.4f} "
                  + (f"probe {float(probe_loss):.3f} " if probe_loss is not None else "") +
                  f"({seconds / step:.2f} s/step)", flush=True)
        if args.val_every and step % args.val_every == 0:
            point_val = evaluate(sam, validation, "point")
            curve.append({"step": step, "val_point_miou": round(point_val["miou"], 4)})
            line = f"step {step}: val point mIoU {point_val['miou']:.3f}"
            if args.concepts_per_image:
                concept_val = evaluate_concepts(sam, concepts, validation)["miou"]
                curve[-1]["val_concept_miou"] = round(concept_val, 4)
                line += f", concept mIoU {concept_val:.3f}"
            print(line, flush=True)
    train_seconds = time.perf_counter() - started
    point, box = evaluate(sam, evaluation, "point"), evaluate(sam, evaluation, "box")
    concept = evaluate_concepts(sam, concepts, evaluation) if args.concepts_per_image else None
    print(f"test: point mIoU {point['miou']:.3f} (IoU head r={point['iou_head_corr']:.2f}), "
          f"box mIoU {box['miou']:.3f}, {point['objects']} objects"
          + (f"; concept mIoU {concept['miou']:.3f}" if concept else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    sam.sam.save_pretrained(args.out / "sam")
    if concept is not None:  # kept for the record; fine-tuning never reads it
        from safetensors.torch import save_file

        save_file(concepts.state_dict(), str(args.out / "concepts.safetensors"))
    atomic_write_json(args.out / "metrics.json", {
        "point": point, "box": box, "concept": concept, "history": history,
        "val_curve": curve,
        "train_seconds": round(train_seconds, 1),
        "s_per_step": round(train_seconds / args.steps, 3),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **provenance(),
    })
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'sam'}")


if __name__ == "__main__":
    main()
