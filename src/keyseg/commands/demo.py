"""``keyseg demo``: the web page (Gradio), bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse

from keyseg.commands.segment import add_model_arguments, load_pipeline, uses_embedded_default

HELP = "web demo: upload an image, ask, see the overlay, answer, keyword and chat history"
EXAMPLE = "keyseg demo --checkpoint runs/keyseg-7b/final --port 7860   (then open the URL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--max-pixels", type=int, default=16_000_000,
                        help="refuse larger uploads (width*height, default 16 MP)")
    parser.add_argument("--max-file-size", default="20mb",
                        help="refuse larger upload files (default 20mb)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from keyseg.demo import launch
    from keyseg.errors import KeySegConfigError
    from keyseg.pipeline import default_checkpoint

    if not 0 < args.port < 65536:
        raise KeySegConfigError(f"--port must be 1-65535, got {args.port}")
    pipeline = load_pipeline(args)
    untrained = args.checkpoint is None and default_checkpoint() is None
    launch(pipeline, host=args.host, port=args.port, max_pixels=args.max_pixels,
           max_file_size=args.max_file_size, untrained=untrained,
           embedded_default=uses_embedded_default(args))
    return 0
