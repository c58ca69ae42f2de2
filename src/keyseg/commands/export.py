"""``keyseg export SRC DST [--merge-lora]``: a self-contained model directory."""

from __future__ import annotations

import argparse

from keyseg.commands import DTYPE_METAVAR, dtype_argument
from keyseg.errors import KeySegConfigError

HELP = "export a run or model as a self-contained directory (optionally merging LoRA)"
EXAMPLE = ("keyseg export runs/keyseg exported/keyseg-7b --merge-lora --weights best "
           "--push-to-hub my-org/keyseg-7b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="RUN_DIR_OR_MODEL_DIR",
                        help="a training run directory (final/; a stopped run needs --weights) "
                        "or a KeySeg model directory")
    parser.add_argument("dst", metavar="DST_DIR", help="directory to write (replaced atomically)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the LoRA adapters into the weights (no PEFT needed to load)")
    parser.add_argument("--weights", default=None, metavar="best|latest|FILE",
                        help="lay these trainable weights over the run's final model")
    parser.add_argument("--dtype", default="auto", type=dtype_argument, metavar=DTYPE_METAVAR,
                        help="dtype of the written weights (auto: as loaded)")
    parser.add_argument("--max-shard-size", type=float, default=2.0, metavar="GIB",
                        help="largest safetensors shard in GiB (default 2)")
    parser.add_argument("--report", default=None, metavar="REPORT_JSON",
                        help="`keyseg eval` report whose numbers go into the model card "
                             "(default: the newest report.json in SRC)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="then upload the exported folder to this Hub repository "
                             "(org/name; needs `hf auth login` or HF_TOKEN)")
    parser.add_argument("--private", action="store_true",
                        help="create the Hub repository as private (with --push-to-hub)")


def run(args: argparse.Namespace) -> int:
    import torch

    from keyseg.config import torch_dtype_name
    from keyseg.export import export_model

    name = torch_dtype_name(args.dtype)
    dtype = None if name is None else getattr(torch, name)
    if args.private and not args.push_to_hub:
        raise KeySegConfigError("--private needs --push-to-hub REPO")
    result = export_model(args.src, args.dst, merge=args.merge_lora, weights=args.weights,
                          dtype=dtype, max_shard_bytes=int(args.max_shard_size * 1024**3),
                          report=args.report)
    merged = f", merged {result.merged_lora} LoRA layers" if args.merge_lora else ""
    print(f"exported {result.source} -> {result.directory} ({result.num_parameters / 1e6:.1f}M "
          f"parameters in {result.shards} shard(s){merged})")
    if args.push_to_hub:
        from keyseg.hub import push_folder

        url = push_folder(result.directory, args.push_to_hub, private=args.private)
        print(f"pushed to {args.push_to_hub}: {url}")
    return 0
