"""``keyseg segment``: answer one question about one image and write its masks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyseg.commands import DTYPE_METAVAR, dtype_argument

HELP = "answer a question about an image; write mask_K.png, overlay.png and result.json"
EXAMPLE = ('keyseg segment kitchen.jpg "What would you use to eat soup?" '
           "--checkpoint runs/keyseg-7b/final --out outputs/kitchen")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by segment / chat / batch / demo."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model directory (save_pretrained); default: the embedded model")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda:0, mps (default: cuda > mps > cpu)")
    parser.add_argument("--dtype", default="auto", type=dtype_argument, metavar=DTYPE_METAVAR,
                        help="precision (auto, the default: bf16 on CUDA, fp32 elsewhere)")
    parser.add_argument("--load-in", default=None, choices=["4bit", "8bit"],
                        help="quantise the language model with bitsandbytes (CUDA only)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="generation budget per answer (default 64)")


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-pixels`` for segment / chat / batch (demo has its own, lower default)."""
    parser.add_argument("--max-pixels", type=int, default=64_000_000,
                        help="refuse larger images (width*height, default 64 MP)")


def check_max_pixels(args: argparse.Namespace) -> int:
    """``args.max_pixels``, refused in one line unless positive."""
    from keyseg.errors import KeySegConfigError

    if args.max_pixels < 1:
        raise KeySegConfigError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    return args.max_pixels


def load_pipeline(args: argparse.Namespace):
    """Build the pipeline the shared options describe."""
    from keyseg.errors import KeySegConfigError
    from keyseg.pipeline import EMBEDDED_DEFAULT_NOTE, KeySegPipeline

    if args.max_new_tokens < 1:
        raise KeySegConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    pipeline = KeySegPipeline.from_pretrained(
        args.checkpoint, device=args.device, dtype=args.dtype, load_in=args.load_in,
        max_new_tokens=args.max_new_tokens, max_pixels=check_max_pixels(args),
    )
    if uses_embedded_default(args):
        print(EMBEDDED_DEFAULT_NOTE, file=sys.stderr)
    return pipeline


def uses_embedded_default(args: argparse.Namespace) -> bool:
    """True when no --checkpoint is given and the packaged shapes-world model is the one."""
    from keyseg.pipeline import default_checkpoint

    return args.checkpoint in (None, "default") and default_checkpoint() is not None


def describe(result) -> list[str]:
    """Human-readable lines for one result: answer, keyword (+ neighbours), masks."""
    lines = [f"answer: {result.text or result.answer}"]
    if result.keyword is not None or result.keyword_neighbours:
        near = ", ".join(f"{t} ({s:.2f})" for t, s in
                         (result.keyword_neighbours[0] if result.keyword_neighbours else []))
        lines.append(f"keyword: {result.keyword or '-'}" + (f"   nearest words: {near}"
                                                            if near else ""))
    scores = ", ".join(f"{s:.2f}" for s in result.scores)
    lines.append(f"masks: {result.masks.shape[0]}" + (f" (scores {scores})" if scores else ""))
    if result.message:
        lines.append(f"note: {result.message}")
    return lines


def run(args: argparse.Namespace) -> int:
    from keyseg.data.images import load_image
    from keyseg.visualize import save_result

    # Load the image first: a bad file fails in a second, before the model loads.
    image = load_image(args.image, max_pixels=check_max_pixels(args))
    pipeline = load_pipeline(args)
    result = pipeline(image, args.query)
    out = args.out or Path("outputs") / args.image.stem
    paths = save_result(out, image, result, extra={
        "image": str(args.image),
        "checkpoint": str(args.checkpoint) if args.checkpoint else "default",
    })
    print("\n".join(describe(result)))
    print(f"overlay: {paths['overlay']}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="image file (jpg, png, ...)")
    parser.add_argument("query", help="the question, e.g. \"What would you use to eat soup?\"")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default outputs/IMAGE_STEM)")
    add_max_pixels_argument(parser)
    add_model_arguments(parser)
