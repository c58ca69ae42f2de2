"""KeySeg reference checkpoints -> a KeySeg model directory.

The reference model is LISA plus three modules at the top of its state dict (SPEC §7), so a
reference checkpoint is a LISA checkpoint (:mod:`keyseg.convert.lisa`, same rules) plus:

=========================================  ===============================================
reference name                             KeySeg name / fate
=========================================  ===============================================
``keyword_fusion.query_proj.{w,b}``        ``keyword_fusion.cross_attn.q_proj.{w,b}``
``keyword_fusion.key_proj.{w,b}``          ``keyword_fusion.cross_attn.k_proj.{w,b}``
``keyword_fusion.value_proj.{w,b}``        ``keyword_fusion.cross_attn.v_proj.{w,b}``
``keyword_fusion.out_proj.{w,b}``          ``keyword_fusion.cross_attn.out_proj.{w,b}``
``keyword_fusion.self_attn.{q,k,v,out}_proj``  ``keyword_fusion.self_attn.{q,k,v,out}_proj``
                                           (single-head self-attention, SPEC §2.4)
``keyword_fusion.norm{1,2}.*``             ignored: built, unused by the reference forward
``keyword_fusion.mlp.{0,2}.*``             ignored: likewise (an ablation left them out)
``embedding_table_proj.{w,b}``             ``embedding_table_proj.{w,b}`` (H -> 256)
``keyword_text_proj.{w,b}``                ignored: a Linear(H, 256) the reference builds but
                                           never calls ([KEY] goes through text_hidden_fcs)
=========================================  ===============================================

Two source shapes are accepted: an HF directory (as LISA's) or a single state-dict file such
as DeepSpeed's ``zero_to_fp32`` output (``pytorch_model.bin``), whose names may carry a
``module.`` prefix and, when training used PEFT, ``base_model.model.`` plus LoRA factors
(``X.lora_A[.default].weight``, ``X.lora_B[...]``, ``X.base_layer.weight``), which are merged:
``W + alpha / r * B @ A``. A single file has no config or tokenizer: they are read from its
directory or from ``base`` (the LISA directory training started from).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from keyseg.config import ModelConfig
from keyseg.convert.checkpoint_io import Checkpoint, read_checkpoint
from keyseg.convert.lisa import convert_lisa, read_json
from keyseg.errors import KeySegCheckpointError

_P = r"(weight|bias)"
KEYSEG_REF_RULES: tuple[tuple[str, str], ...] = (
    (rf"keyword_fusion\.query_proj\.{_P}", r"keyword_fusion.cross_attn.q_proj.\1"),
    (rf"keyword_fusion\.key_proj\.{_P}", r"keyword_fusion.cross_attn.k_proj.\1"),
    (rf"keyword_fusion\.value_proj\.{_P}", r"keyword_fusion.cross_attn.v_proj.\1"),
    (rf"keyword_fusion\.out_proj\.{_P}", r"keyword_fusion.cross_attn.out_proj.\1"),
    (rf"keyword_fusion\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.{_P}",
     r"keyword_fusion.self_attn.\1.\2"),
    (rf"embedding_table_proj\.{_P}", r"embedding_table_proj.\1"),
)

KEYSEG_REF_IGNORED: dict[str, str] = {
    rf"keyword_fusion\.norm[12]\.{_P}": "built but unused by the reference fusion (SPEC §2.4)",
    rf"keyword_fusion\.mlp\.[02]\.{_P}": "built but unused by the reference fusion (SPEC §2.4)",
    rf"keyword_text_proj\.{_P}": "built but never called by the reference forward",
}

# Only our optional separate [KEY] head has no reference counterpart.
KEYSEG_REF_FRESH: tuple[str, ...] = ("keyword_text_proj.",)

_LORA = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


def merge_lora_tensors(state: dict[str, torch.Tensor], alpha: float,
                       source: str) -> tuple[dict[str, torch.Tensor], int]:
    """Fold PEFT LoRA factors into their base weights; returns (state, merged count).

    ``X.base_layer.weight`` becomes ``X.weight``; ``X.weight += alpha / r * B @ A`` where
    ``r`` is A's row count. Computed in fp32, stored in the base weight's dtype.
    """
    factors: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _LORA.fullmatch(name)
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = tensor
        else:
            out[name.replace(".base_layer.", ".")] = tensor
    for module, pair in factors.items():
        if set(pair) != {"A", "B"} or f"{module}.weight" not in out:
            raise KeySegCheckpointError(
                f"{source}: {module}: incomplete LoRA factors (need lora_A, lora_B and the base "
                "weight)")
        a, b = pair["A"].float(), pair["B"].float()
        base = out[f"{module}.weight"]
        out[f"{module}.weight"] = (base.float() + (alpha / a.shape[0]) * (b @ a)).to(base.dtype)
    return out, len(factors)


def _normalise_names(checkpoint: Checkpoint, lora_alpha: float) -> tuple[Checkpoint, int]:
    """Strip ``module.`` / ``base_model.model.`` prefixes and merge LoRA factors."""
    tensors, origin = {}, {}
    for name, tensor in checkpoint.tensors.items():
        new = name
        for prefix in ("module.", "base_model.model."):
            new = new.removeprefix(prefix)
        tensors[new] = tensor
        origin[new] = checkpoint.origin.get(name, checkpoint.source)
    merged_state, merged = merge_lora_tensors(tensors, lora_alpha, str(checkpoint.source))
    # merge_lora_tensors drops ".base_layer." from every name (weights and biases alike)
    unwrapped = {n.replace(".base_layer.", "."): where for n, where in origin.items()}
    origin = {n: origin.get(n, unwrapped.get(n, checkpoint.source)) for n in merged_state}
    return Checkpoint(merged_state, origin, checkpoint.source), merged


def reference_model_config(config: ModelConfig, query_shape: tuple[int, ...] | None,
                           saved: dict) -> ModelConfig:
    """What a reference checkpoint fixes beyond LISA's layout: the cross-attention's inner
    width (the reference builds it at 256 whatever its fusion width; read from the shape of
    ``keyword_fusion.query_proj.weight``, ``(inner, dim)``) and the keyword temperature
    (``temperature`` in its ``config.json``)."""
    fusion = config.fusion
    if query_shape is not None and len(query_shape) == 2 and query_shape[0] != query_shape[1]:
        fusion = replace(fusion, inner_dim=int(query_shape[0]))
    loss = config.loss
    if isinstance(saved.get("temperature"), int | float):
        loss = replace(loss, key_temperature=float(saved["temperature"]))
    return replace(config, fusion=fusion, loss=loss)


def convert_keyseg_ref(
    src: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    lora_alpha: float = 16.0,
    progress: bool = False,
):
    """Build a :class:`KeySegModel` from a KeySeg reference checkpoint.

    Args:
        src: an HF directory (``config.json``, tokenizer, weights) or one state-dict file
            (``zero_to_fp32`` output).
        base: directory holding ``config.json`` and the tokenizer when ``src`` is a file
            without them beside it.
        lora_alpha: LoRA alpha used in training (reference: 16) when LoRA factors are present.

    Returns:
        ``(model, report)``; ``report.ignored`` lists every deliberately unused tensor.
    """
    src = Path(src)
    config_dir = Path(base) if base is not None else (src if src.is_dir() else src.parent)
    if not (config_dir / "config.json").is_file():
        raise KeySegCheckpointError(
            f"{config_dir}: no config.json / tokenizer beside {src.name}; pass --base DIR "
            "(the LISA directory training started from)")
    checkpoint, merged = _normalise_names(read_checkpoint(src, progress=progress), lora_alpha)
    if not any(k.startswith("keyword_fusion.") for k in checkpoint.tensors):
        raise KeySegCheckpointError(
            f"{checkpoint.source}: no keyword_fusion.* tensors: not a KeySeg reference "
            "checkpoint (use `keyseg convert lisa` for LISA)")
    query = checkpoint.tensors.get("keyword_fusion.query_proj.weight")
    query_shape = tuple(query.shape) if query is not None else None
    saved = read_json(config_dir / "config.json")
    model, report = convert_lisa(
        src, vision_tower=vision_tower, dtype=dtype, extra_rules=KEYSEG_REF_RULES,
        extra_ignored=KEYSEG_REF_IGNORED, fresh_targets=KEYSEG_REF_FRESH,
        checkpoint=checkpoint, config_dir=config_dir, progress=progress,
        configure=lambda cfg: reference_model_config(cfg, query_shape, saved),
    )
    report.lora_merged = merged  # type: ignore[attr-defined]
    return model, report
