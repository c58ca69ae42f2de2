"""Small fixture builders shared by tests (importable as ``helpers``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from keyseg.data.sample import Referent, SegRecord

if TYPE_CHECKING:
    from transformers import LogitsProcessorList

    from keyseg.processor import KeySegProcessor


def make_record(height: int = 40, width: int = 60, seed: int = 0) -> SegRecord:
    """A random image with two referents: one mask with a keyword, two masks with one."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    first = np.zeros((1, height, width), np.uint8)
    first[0, 5:20, 10:30] = 1
    first[0, 0:2, 0:2] = 255  # an ignore region
    second = np.zeros((2, height, width), np.uint8)
    second[0, 20:30, 5:15] = 1
    second[1, 25:35, 40:55] = 1
    return SegRecord(
        sample_id=f"img{seed}",
        source="fixture",
        image=image,
        referents=[
            Referent("What would you use to eat soup?", True, first, keyword="spoon"),
            Referent("both circles", False, second, keyword="circle"),
        ],
    )


class ForceScript:
    """A logits processor forcing the first generated tokens to ``script`` (token ids), so a
    random tiny model 'answers' what a test wants (e.g. with [SEG]/[KEY]); later tokens are
    left to the model.

    ``prompt_length`` fixes where the answer starts; when ``None`` it is read at the first step
    of each ``generate`` call (a call starts when the length is not the previous one plus one),
    so one instance can be reused across calls. A plain callable (HF only calls it), so that
    importing ``helpers`` does not import transformers.
    """

    def __init__(self, script: list[int], prompt_length: int | None = None) -> None:
        self.script = list(script)
        self.fixed = prompt_length is not None
        self.prompt_length = -1 if prompt_length is None else prompt_length
        self.last = -1

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L), scores (B, V) -> scores with only the scripted token allowed."""
        length = input_ids.shape[1]
        if not self.fixed and length != self.last + 1:
            self.prompt_length = length
        self.last = length
        step = length - self.prompt_length
        if 0 <= step < len(self.script):
            scores = torch.full_like(scores, -1e9)
            scores[:, self.script[step]] = 0.0
        return scores


def forced(script: list[int], prompt_length: int | None = None) -> LogitsProcessorList:
    """``generate(..., logits_processor=forced(script))``: see :class:`ForceScript`."""
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ForceScript(script, prompt_length)])


def answer_ids(processor: KeySegProcessor, text: str, segs: int = 0,
               keyword: str | None = None) -> list[int]:
    """Token ids of ``text`` + ``segs`` x [SEG] (+ [KEY] `` keyword``) + EOS."""
    ids, tokenizer = processor.ids, processor.tokenizer
    out = [*tokenizer(text, add_special_tokens=False)["input_ids"], *[ids.seg] * segs]
    if keyword:
        out += [ids.key, *tokenizer(f" {keyword}", add_special_tokens=False)["input_ids"]]
    return [*out, ids.eos]


# The steering repository's shared/ folder (reference fixtures made by other code) sits
# beside the checkout on the development machines and in CI. It is looked for upwards from
# tests/, so a copy of the tests one level deeper (mutmut's mutants/) finds it too.
def _find_shared() -> Path:
    here = Path(__file__).resolve().parent
    for folder in here.parents:
        if (folder / "shared").is_dir():
            return folder / "shared"
    return here.parents[1] / "shared"


SHARED = _find_shared()


def shared_path(relative: str) -> Path:
    """``SHARED / relative``, or skip the calling test when that path is absent."""
    import pytest

    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the reference fixtures live in ../shared)")
    return path


def experiment_module(name: str):
    """Import ``experiments/<name>.py`` (scripts, not a package) as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

