"""How good can the mask side get? Train SAM alone with a *perfect* concept prompt.

The language side of KeySeg has to turn "Which shape is the colour of a lime?" into a prompt
that means "green"; SAM then has to find the green pixels. This script removes the language
side: every single-target referent of the shapes world is prompted with a learned embedding
of its keyword (``"green"``, ``"triangle"``, ``"red star"``: one row per entry of
:data:`keyseg.data.shapes.KEYWORD_VOCAB`), and a SAM preset is trained from scratch with the
reference BCE + Dice losses. Its validation gIoU is a rough upper bound on what the full model
reaches with the same SAM and a similar number of masks seen, so it tells whether a slow run
is limited by the mask side or by the language side.

    OMP_NUM_THREADS=1 python experiments/sam_oracle.py --preset shapes --steps 2000 \
        --out runs/sam_oracle/shapes.json

Prints the loss every 100 steps and writes the final metrics (overall and per difficulty),
the preset, the timing and the device to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from keyseg.data.shapes import KEYWORD_VOCAB, ShapesDataset
from keyseg.io import atomic_write_json
from keyseg.metrics import SegMetrics
from keyseg.model.losses import dice_loss, sigmoid_ce_loss
from keyseg.model.sam import SamSegmenter
from keyseg.transforms import sam_preprocess


def concept_samples(split: str, count: int, image_size: int, vocab: dict[str, int]) -> list:
    """``count`` single-target referents of ``split``: (sam input, concept id, mask, difficulty).

    Multi-target referents are skipped: one concept prompt cannot say which instance.
    """
    dataset = ShapesDataset(split)
    samples, index = [], 0
    while len(samples) < count and index < len(dataset):
        record = dataset[index]
        index += 1
        ref = record.referents[0]
        if ref.masks.shape[0] != 1 or ref.keyword not in vocab:
            continue
        sam_input = sam_preprocess(record.image, image_size)
        samples.append((sam_input, vocab[ref.keyword], torch.from_numpy(ref.masks[0].copy()),
                        ref.difficulty))
    return samples


def predict(sam: SamSegmenter, concepts: torch.nn.Embedding, batch: list) -> torch.Tensor:
    """``(B, H, W)`` mask logits at the original image size for a list of samples."""
    pixels = torch.stack([s[0].pixel_values for s in batch])
    prompts = concepts(torch.tensor([s[1] for s in batch]))
    low_res, _ = sam.decode_many(sam.encode_images(pixels), torch.arange(len(batch)), prompts)
    first = batch[0][0]  # every shapes image has the same size
    return sam.postprocess_masks(low_res, first.resized_size, first.original_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes", help="SAM preset (keyseg.model.sam)")
    parser.add_argument("--prompt-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--train-samples", type=int, default=12000)
    parser.add_argument("--val-samples", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--positional-std", type=float, default=None,
                        help="re-draw SAM's random-Fourier positional matrix with this std "
                             "(segment-anything: 1.0; transformers' init: encoder width / 2)")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    vocab = {keyword: i for i, keyword in enumerate(sorted(KEYWORD_VOCAB))}
    sam = SamSegmenter.from_preset(args.preset, prompt_dim=args.prompt_dim)
    if args.positional_std is not None:
        torch.nn.init.normal_(sam.sam.shared_image_embedding.positional_embedding,
                              std=args.positional_std)
        sam.tie_positional_encoding()
    positional_std = float(sam.sam.shared_image_embedding.positional_embedding.detach().std())
    concepts = torch.nn.Embedding(len(vocab), sam.prompt_dim)
    train = concept_samples("train", args.train_samples, sam.image_size, vocab)
    val = concept_samples("val", args.val_samples, sam.image_size, vocab)
    params = [*sam.parameters(), *concepts.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)

    start = time.perf_counter()
    for step in range(args.steps):
        # Linear warm-up, cosine decay: the schedule of configs/tiny-shapes.yaml.
        warmup = min(1.0, (step + 1) / args.warmup)
        scale = warmup * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        batch = [train[(step * args.batch_size + j) % len(train)] for j in range(args.batch_size)]
        logits = predict(sam, concepts, batch)
        target = torch.stack([s[2] for s in batch]).float()
        bce = sigmoid_ce_loss(logits, target, len(batch))
        dice = dice_loss(logits, target, len(batch))
        optimizer.zero_grad()
        (2.0 * bce + 0.5 * dice).backward()  # the reference loss weights
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: bce {bce.item():.3f} dice {dice.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - start

    sam.eval()
    overall, by_difficulty = SegMetrics(), {}
    with torch.no_grad():
        for i in range(0, len(val), 16):
            batch = val[i:i + 16]
            for sample, logits in zip(batch, predict(sam, concepts, batch), strict=True):
                overall.update(logits, sample[2])
                by_difficulty.setdefault(sample[3], SegMetrics()).update(logits, sample[2])
    result = {
        "preset": args.preset, "sam_image_size": sam.image_size, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "positional_std": positional_std,
        "val": overall.compute(),
        "by_difficulty": {d: m.compute() for d, m in sorted(by_difficulty.items())},
        "seconds_per_step": train_seconds / args.steps,
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)",
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, result)
    assert not np.isnan(result["val"]["giou"])


if __name__ == "__main__":
    main()
