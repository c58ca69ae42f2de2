"""Which vision tower learns to see shape kinds? (issue #16 diagnosis)

The stage 2 VLM's image tokens tell colours apart but hardly kinds (docs/RESULTS.md,
``experiments/vlm_existence.py``), so its "There is no such shape" carries no information
about the image. This trains a vision tower *alone* on the direct objectives of the lab's
stand-in for CLIP pretraining (``pretrain_vlm.pretrain_tower``: the per-patch colour/kind
probe and the image-level presence probe, weights 1 and 1), with no language model, so a
step costs a quarter of a QA step and tower shapes can be compared in minutes:

- a fresh ``CLIPVisionModel`` of ``--width``, ``--layers``, ``--heads``, ``--patch-size``
  at 192 px (the ``shapes192`` preset is width 96, 2 layers, 2 heads, patch 16), or
- ``--init DIR``: the tower of a saved stage 2 VLM, continued, or
- ``--conv``: a calibration baseline that is no VLM tower: ``ConvTower``, a plain stack of
  3x3 convolutions down to the same patch grid, ``--width`` channels. How fast a network
  with a convolution's locality learns kinds here tells whether the world is hard or the
  tiny ViTs are slow.

Every ``--eval-every`` steps it scores ``--eval-images`` test images:

- ``kind_presence``: balanced accuracy of the presence probe's "is a {kind} in the image"
  (logit > 0), averaged over the 8 kinds (chance 0.5);
- ``patch_kind``: accuracy of the patch probe's kind on patches an object covers (chance
  about 1/8).

    OMP_NUM_THREADS=1 python experiments/tower_probe.py --steps 1500 --out runs/tower_A.json
    OMP_NUM_THREADS=1 python experiments/tower_probe.py --init src/keyseg/assets/lab/vlm-shapes \\
        --steps 4500 --lr 3e-3 --out runs/tower_I.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_vlm as stage2
from provenance import provenance
from vlm_existence import balanced_accuracy

from keyseg.data.shapes import KINDS, ShapesDataset
from keyseg.io import atomic_write_json
from keyseg.model.tiny import tiny_image_processor

IMAGE_SIZE = 192


class ConvTower(torch.nn.Module):
    """``--conv``: log2(patch) stride-2 3x3 convolutions (GELU after each) down to the
    ``IMAGE_SIZE / patch`` grid, then one stride-1 3x3; all ``width`` channels. Its output
    looks like a CLIP tower's to the probes: ``last_hidden_state`` ``(B, 1 + P, width)``,
    row 0 the mean of the grid in place of a class token."""

    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        downs = int(math.log2(patch_size))
        layers: list[torch.nn.Module] = []
        for i in range(downs):
            layers += [torch.nn.Conv2d(3 if i == 0 else width, width, 3, 2, 1), torch.nn.GELU()]
        layers += [torch.nn.Conv2d(width, width, 3, 1, 1), torch.nn.GELU()]
        self.body = torch.nn.Sequential(*layers)
        self.config = SimpleNamespace(image_size=IMAGE_SIZE, patch_size=patch_size,
                                      hidden_size=width, num_hidden_layers=downs + 1,
                                      num_attention_heads=0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import BaseModelOutput

        grid = self.body(pixel_values).flatten(2).transpose(1, 2)  # (B, P, width)
        return BaseModelOutput(last_hidden_state=torch.cat([grid.mean(1, keepdim=True), grid],
                                                           1))


def build_tower(args: argparse.Namespace):
    """A ``CLIPVisionModel``: the tower of ``args.init`` (a HF LLaVA directory) or a fresh
    one of the requested shape; with ``--conv``, a :class:`ConvTower`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaForConditionalGeneration

    if args.conv:
        return ConvTower(args.width, args.patch_size)
    if args.init is not None:
        return LlavaForConditionalGeneration.from_pretrained(args.init).model.vision_tower
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=args.width, intermediate_size=2 * args.width,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        image_size=IMAGE_SIZE, patch_size=args.patch_size, projection_dim=args.width))


@torch.no_grad()
def evaluate(tower, image_processor, patch_probe, presence_probe, records) -> dict[str, float]:
    """``{"kind_presence", "patch_kind"}`` on ``records`` (see the module docstring)."""
    tower.eval()
    grid = tower.config.image_size // tower.config.patch_size
    said, present, patch_pred, patch_true = [], [], [], []
    for start in range(0, len(records), 25):
        chunk = records[start:start + 25]
        pixels = image_processor(images=[r.image for r in chunk],
                                 return_tensors="pt")["pixel_values"].to(tower.dtype)
        patches = tower(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, P, C), no CLS
        said.append(presence_probe.head(patches.amax(1))[:, :len(KINDS)] > 0)
        present.append(torch.stack([stage2.existence_labels(r) for r in chunk])[:, :len(KINDS)]
                       > 0.5)
        patch_pred.append(patch_probe.kind(patches).argmax(-1))
        patch_true.append(torch.stack([stage2.patch_labels(r, grid)[1] for r in chunk]))
    tower.train()
    said, present = torch.cat(said).numpy(), torch.cat(present).numpy()
    per_kind = [balanced_accuracy(said[:, k], present[:, k]) for k in range(len(KINDS))]
    pred, true = torch.cat(patch_pred), torch.cat(patch_true)
    covered = true > 0
    return {"kind_presence": round(float(np.mean([a for a in per_kind if a is not None])), 4),
            "patch_kind": round(float((pred[covered] == true[covered]).float().mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, default=None,
                        help="continue the vision tower of this stage 2 VLM directory")
    parser.add_argument("--conv", action="store_true",
                        help="a ConvTower (3x3 convolutions) instead of a CLIP tower: the "
                             "calibration baseline")
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images-per-step", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-images", type=int, default=200)
    parser.add_argument("--kind-on-objects", action="store_true",
                        help="the patch probe's kind loss only on patches an object covers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="result JSON")
    args = parser.parse_args()
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    if args.init is None and IMAGE_SIZE % args.patch_size:
        parser.error(f"--patch-size must divide the image size {IMAGE_SIZE}")
    if args.conv and (args.init is not None or args.patch_size & (args.patch_size - 1)):
        parser.error("--conv builds a fresh ConvTower (no --init) and needs a --patch-size "
                     "that is a power of two")

    torch.manual_seed(args.seed)
    tower = build_tower(args)
    width = tower.config.hidden_size
    patch_probe = stage2.PatchProbe(width, kind_on_objects=args.kind_on_objects)
    presence_probe = stage2.ExistenceProbe(width)
    for probe in (patch_probe, presence_probe):
        tower.register_forward_hook(probe.capture)
    image_processor = tiny_image_processor(tower.config.image_size)
    train, rng = ShapesDataset("train"), np.random.default_rng(args.seed)
    test_records = [ShapesDataset("test")[i] for i in range(args.eval_images)]
    print(f"tower: width {width}, {tower.config.num_hidden_layers} layers, patch "
          f"{tower.config.patch_size}, {sum(p.numel() for p in tower.parameters()):,} "
          "parameters", flush=True)

    curve, started = [], time.perf_counter()

    def score(step: int) -> None:  # called at every logged step of the one schedule
        curve.append({"step": step, **evaluate(tower, image_processor, patch_probe,
                                               presence_probe, test_records)})
        print(f"step {step}: kind presence {curve[-1]['kind_presence']:.3f}, "
              f"patch kind {curve[-1]['patch_kind']:.3f}", flush=True)

    history = stage2.pretrain_tower(
        tower, image_processor, [(1.0, patch_probe), (1.0, presence_probe)], train, rng,
        args.steps, args.images_per_step, args.lr, args.warmup_steps, args.eval_every,
        on_log=score)
    seconds = time.perf_counter() - started
    atomic_write_json(args.out, {
        "curve": curve, "history": history, "seconds": round(seconds, 1),
        "tower": {"kind": "conv" if args.conv else "clip", "width": width,
                  "layers": tower.config.num_hidden_layers,
                  "heads": tower.config.num_attention_heads,
                  "patch_size": tower.config.patch_size,
                  "init": str(args.init) if args.init else None},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **provenance(),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
