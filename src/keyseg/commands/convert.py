"""``keyseg convert KIND SRC DST``: import foreign checkpoints into KeySeg's formats.

Each kind is one entry of :data:`KINDS` (help line + handler); adding a kind (``lisa``,
``keyseg-ref``, ...) means writing one ``_convert_<kind>(args) -> int`` and one entry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from keyseg.commands import DTYPE_METAVAR, dtype_argument

HELP = "convert a foreign checkpoint (e.g. the official SAM .pth) into KeySeg's format"
EXAMPLE = "keyseg convert sam sam_vit_h_4b8939.pth checkpoints/sam-vit-h"


def _convert_sam(args: argparse.Namespace) -> int:
    """Official segment-anything ``.pth`` -> HF ``SamModel`` directory (safetensors)."""
    from keyseg.convert.sam import load_official_sam, save_sam

    preset = None if args.preset == "auto" else args.preset
    segmenter = load_official_sam(args.src, preset=preset)
    dst = save_sam(segmenter, args.dst)
    count = sum(p.numel() for p in segmenter.parameters())
    print(f"converted {args.src} -> {dst} ({count / 1e6:.1f}M parameters)")
    return 0


def _sam_arguments(parser: argparse.ArgumentParser) -> None:
    # Literal list: keyseg.model.sam imports torch, which `keyseg --help` must not pay for.
    parser.add_argument(
        "--preset",
        default="auto",
        choices=["auto", "vit_h", "vit_l", "vit_b", "tiny", "shapes", "shapes192"],
        help="SAM size (default: inferred from the encoder's width and depth)",
    )


def _convert_sam2(args: argparse.Namespace) -> int:
    """Official SAM 2 ``.pt`` -> HF ``Sam2Model`` directory (safetensors)."""
    from keyseg.convert.sam import save_sam
    from keyseg.convert.sam2 import load_official_sam2

    preset = None if args.preset == "auto" else args.preset
    segmenter = load_official_sam2(args.src, preset=preset)
    dst = save_sam(segmenter, args.dst)
    count = sum(p.numel() for p in segmenter.parameters())
    print(f"converted {args.src} -> {dst} ({count / 1e6:.1f}M parameters; video-memory "
          "tensors left out)")
    return 0


def _sam2_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="auto",
        choices=["auto", "hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large", "tiny"],
        help="SAM 2 size (default: inferred from the Hiera width and depth)",
    )


def _dtype(name: str):
    import torch

    from keyseg.config import torch_dtype_name

    torch_name = torch_dtype_name(name)
    return None if torch_name is None else getattr(torch, torch_name)


def _finish(model, report, args: argparse.Namespace) -> int:
    """Save the converted model and print what the conversion did."""
    model.save_pretrained(args.dst)
    print(f"converted {args.src} -> {args.dst} ({report.summary()})")
    for name, token_id in report.new_token_rows.items():
        print(f"  new token {name} -> id {token_id} (row initialised to the mean row)")
    if report.fresh:
        print(f"  {len(report.fresh)} KeySeg tensors keep their fresh initialisation "
              f"(first: {report.fresh[0]})")
    return 0


def _convert_lisa(args: argparse.Namespace) -> int:
    """LISA HF directory (LLaVA-v1 LLaMA + SAM + text_hidden_fcs) -> KeySeg directory."""
    from keyseg.convert.lisa import convert_lisa

    model, report = convert_lisa(args.src, vision_tower=args.vision_tower,
                                 dtype=_dtype(args.dtype), progress=True)
    return _finish(model, report, args)


def _convert_keyseg_ref(args: argparse.Namespace) -> int:
    """KeySeg reference directory or zero_to_fp32 file -> KeySeg directory."""
    from keyseg.convert.keyseg_ref import convert_keyseg_ref

    model, report = convert_keyseg_ref(args.src, base=args.base, vision_tower=args.vision_tower,
                                       dtype=_dtype(args.dtype), lora_alpha=args.lora_alpha,
                                       progress=True)
    if getattr(report, "lora_merged", 0):
        print(f"  merged {report.lora_merged} LoRA pairs (alpha {args.lora_alpha})")
    return _finish(model, report, args)


def _lisa_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-tower", default=None, metavar="DIR",
                        help="local CLIP directory (default: mm_vision_tower from config.json "
                             "if it is a local directory, else SRC/vision_tower)")
    parser.add_argument("--dtype", default="auto", type=dtype_argument, metavar=DTYPE_METAVAR,
                        help="dtype of the written weights (auto: fp32)")


def _keyseg_ref_arguments(parser: argparse.ArgumentParser) -> None:
    _lisa_arguments(parser)
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="config.json + tokenizer directory when SRC is a single file")
    parser.add_argument("--lora-alpha", type=float, default=16.0,
                        help="LoRA alpha of the training run, to merge LoRA factors (16)")


# kind -> (help, extra-arguments hook or None, handler). Every kind takes SRC and DST.
KINDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None] | None, Callable[..., int]],
] = {
    "sam": (
        "official segment-anything checkpoint (sam_vit_h_4b8939.pth) -> SamModel directory",
        _sam_arguments,
        _convert_sam,
    ),
    "sam2": (
        "official SAM 2 / 2.1 checkpoint (sam2.1_hiera_large.pt) -> Sam2Model directory",
        _sam2_arguments,
        _convert_sam2,
    ),
    "lisa": (
        "LISA HF checkpoint directory (e.g. LISA-7B-v1) -> KeySeg model directory",
        _lisa_arguments,
        _convert_lisa,
    ),
    "keyseg-ref": (
        "KeySeg reference checkpoint (HF directory or zero_to_fp32 file) -> KeySeg directory",
        _keyseg_ref_arguments,
        _convert_keyseg_ref,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, (help_text, extra_arguments, handler) in KINDS.items():
        sub = kinds.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("src", metavar="SRC", help="checkpoint file or directory to read")
        sub.add_argument("dst", metavar="DST_DIR", help="directory to write (created if absent)")
        if extra_arguments is not None:
            extra_arguments(sub)
        sub.set_defaults(_convert=handler)


def run(args: argparse.Namespace) -> int:
    return int(args._convert(args))
