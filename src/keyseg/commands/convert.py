"""``keyseg convert KIND SRC DST``: import foreign checkpoints into KeySeg's formats.

Each kind is one entry of :data:`KINDS` (help line + handler); adding a kind (``lisa``,
``keyseg-ref``, ...) means writing one ``_convert_<kind>(args) -> int`` and one entry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

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
        choices=["auto", "vit_h", "vit_l", "vit_b", "tiny"],
        help="SAM size (default: inferred from the encoder's width and depth)",
    )


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
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, (help_text, extra_arguments, handler) in KINDS.items():
        sub = kinds.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("src", metavar="SRC", help="checkpoint file to read")
        sub.add_argument("dst", metavar="DST_DIR", help="directory to write (created if absent)")
        if extra_arguments is not None:
            extra_arguments(sub)
        sub.set_defaults(_convert=handler)


def run(args: argparse.Namespace) -> int:
    return int(args._convert(args))
