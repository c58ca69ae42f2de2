"""``keyseg export SRC DST [--merge-lora]``: a self-contained model directory."""

from __future__ import annotations

import argparse

HELP = "export a run or model as a self-contained directory (optionally merging LoRA)"
EXAMPLE = "keyseg export runs/keyseg exported/keyseg-7b --merge-lora --weights best"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="RUN_DIR_OR_MODEL_DIR",
                        help="a training run directory (uses final/) or a KeySeg model directory")
    parser.add_argument("dst", metavar="DST_DIR", help="directory to write (replaced atomically)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the LoRA adapters into the weights (no PEFT needed to load)")
    parser.add_argument("--weights", default=None, metavar="best|latest|FILE",
                        help="lay these trainable weights over the run's final model")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="dtype of the written weights (auto: as loaded)")
    parser.add_argument("--max-shard-size", type=float, default=2.0, metavar="GIB",
                        help="largest safetensors shard in GiB (default 2)")


def run(args: argparse.Namespace) -> int:
    import torch

    from keyseg.export import export_model

    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16}[args.dtype]
    result = export_model(args.src, args.dst, merge=args.merge_lora, weights=args.weights,
                          dtype=dtype, max_shard_bytes=int(args.max_shard_size * 1024**3))
    merged = f", merged {result.merged_lora} LoRA layers" if args.merge_lora else ""
    print(f"exported {result.source} -> {result.directory} ({result.num_parameters / 1e6:.1f}M "
          f"parameters in {result.shards} shard(s){merged})")
    return 0
