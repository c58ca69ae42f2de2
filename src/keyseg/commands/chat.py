"""``keyseg chat``: a multi-turn conversation about one image (stdin lines, history kept)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyseg.commands.segment import (
    add_max_pixels_argument,
    add_model_arguments,
    check_max_pixels,
    describe,
    load_pipeline,
)

HELP = "multi-turn chat about one image; each turn's masks go to OUT/turn_N/"
EXAMPLE = "keyseg chat kitchen.jpg --out outputs/chat   (type a question per line; 'exit' quits)"

QUIT = {"exit", "quit", ":q"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, help="image file")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default outputs/chat_IMAGE_STEM)")
    add_max_pixels_argument(parser)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from keyseg.data.images import load_image
    from keyseg.errors import KeySegInputError
    from keyseg.visualize import save_result

    image = load_image(args.image, max_pixels=check_max_pixels(args))
    pipeline = load_pipeline(args)
    pipeline.set_image(image)  # SAM-encodes once; every turn reuses it
    out = args.out or Path("outputs") / f"chat_{args.image.stem}"
    interactive = sys.stdin.isatty()
    print(f"chatting about {args.image} ({image.width}x{image.height}); "
          "'exit' or end-of-input quits, 'reset' starts over")
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        query = line.strip()
        if not query:
            continue
        if query.lower() in QUIT:
            break
        if query.lower() == "reset":
            pipeline.reset()
            print("(history cleared)")
            continue
        try:
            result = pipeline.ask(query)
        except KeySegInputError as error:
            print(f"error: {error}")
            continue
        turn += 1
        paths = save_result(out / f"turn_{turn}", image, result,
                            extra={"image": str(args.image), "turn": turn})
        print("\n".join(describe(result)))
        print(f"overlay: {paths['overlay']}", flush=True)
    print(f"{turn} turn(s); outputs in {out}")
    return 0
