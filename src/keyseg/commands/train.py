"""``keyseg train --config FILE [--resume latest|PATH] [section.key=value ...]``."""

from __future__ import annotations

import argparse

HELP = "train KeySeg (Accelerate: one CPU/GPU, or many with `accelerate launch`)"
EXAMPLE = ("keyseg train --config configs/keyseg-7b.yaml data.dataset_dir=/data "
           "train.output_dir=runs/keyseg-7b   # add --resume latest after a crash")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument(
        "--resume", metavar="latest|PATH", default=None,
        help="continue the run in train.output_dir from its latest checkpoint, or from PATH",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value",
        help="config overrides, e.g. train.lr=1e-4 model.lora.r=16",
    )


def run(args: argparse.Namespace) -> int:
    from keyseg.config import load_config

    # `train.lr=1e-4`; `--train.lr=1e-4` also works after a `--` separator. Every config
    # problem is reported here, before torch is imported or a run directory is written.
    cfg = load_config(args.config, args.overrides)
    from keyseg.train import main
    result = main(cfg, resume=args.resume)
    state = result.state
    print(f"{result.stopped} at step {state.step}; last checkpoint: {result.last_checkpoint}; "
          f"skipped: {state.nonfinite_skipped} non-finite steps, {state.bad_samples} bad samples")
    return 0 if result.stopped != "interrupted" else 130
