"""One module per ``keyseg`` subcommand.

Each module defines ``HELP`` (one line), ``EXAMPLE`` (one example command line),
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports (torch, transformers)
happen inside ``run`` so that ``keyseg --help`` stays instant.
"""

from __future__ import annotations

import argparse

DTYPE_METAVAR = "auto|fp32|bf16|fp16"


def dtype_argument(text: str) -> str:
    """The argparse ``type`` of every ``--dtype``: one of ``auto|fp32|bf16|fp16`` (torch's
    ``float32``/``bfloat16``/``float16`` also work), returned in the short spelling."""
    from keyseg.config import dtype_name
    from keyseg.errors import KeySegConfigError

    try:
        return dtype_name(text)
    except KeySegConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
