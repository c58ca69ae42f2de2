"""Where a result JSON of ``experiments/`` came from: the command line and the machine."""

from __future__ import annotations

import platform
import sys

import torch


def provenance() -> dict:
    """``{"command": "python SCRIPT ARGS...", "machine": {"platform", "torch", "threads"}}``,
    merged into every result JSON so a number can be rerun and its timing read in context."""
    return {"command": " ".join(["python", *sys.argv]),
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()}}
