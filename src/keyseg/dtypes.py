"""Dtype names: one spelling for every ``--dtype``, the configs' ``train.precision`` and the
runtime (``keyseg.runtime.resolve_dtype``). No torch here: the names map to attributes of
``torch`` (:data:`TORCH_DTYPE_NAMES`)."""

from __future__ import annotations

from keyseg.errors import KeySegConfigError

DTYPES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
"""The canonical dtype names; ``auto`` lets the command choose (see each command's help)."""

_DTYPE_ALIASES: dict[str, str] = {
    "auto": "auto", "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
}
TORCH_DTYPE_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Canonical name -> attribute of ``torch`` (``getattr(torch, TORCH_DTYPE_NAMES[name])``)."""


def dtype_name(value: str) -> str:
    """The canonical name (one of :data:`DTYPES`) of a dtype spelled ``fp32``/``bf16``/
    ``fp16``/``auto`` or as torch names it (``float32``, ``bfloat16``, ``torch.float16``)."""
    text = str(value).strip().lower().removeprefix("torch.")
    if text not in _DTYPE_ALIASES:
        raise KeySegConfigError(
            f"unknown dtype {value!r}: use auto, fp32, bf16 or fp16 (float32, bfloat16 and "
            "float16 also work)")
    return _DTYPE_ALIASES[text]


def torch_dtype_name(value: str) -> str | None:
    """``"float32"``/``"bfloat16"``/``"float16"`` for a dtype spelled any accepted way;
    ``None`` for ``auto``."""
    name = dtype_name(value)
    return None if name == "auto" else TORCH_DTYPE_NAMES[name]
