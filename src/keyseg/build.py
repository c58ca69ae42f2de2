"""Assembling KeySeg models: :func:`build_keyseg` and the one table of local presets.

``build_keyseg(cfg)`` turns a :class:`~keyseg.config.ModelConfig` into a ready
:class:`~keyseg.model.keyseg.KeySegModel`: the VLM (a pretrained HF directory, or a local
random preset), SAM (a preset, with an official checkpoint's weights read through
:mod:`keyseg.convert`), the processor (tokenizer, chat template, image transforms) and the
KeySeg heads, put together with :meth:`KeySegModel.from_parts`.

This module sits above what it assembles: ``model/`` (the parts), ``convert/`` (official SAM
and SAM 2 checkpoints), the processor, and ``data/`` (the ``shapes`` preset's tokenizer is
trained on the shapes world's own text). Training, evaluation and the pipeline call it; the
model never imports it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from keyseg import tokens
from keyseg.config import BackboneConfig, ModelConfig
from keyseg.convert.sam import load_official_sam, load_sam
from keyseg.convert.sam2 import load_official_sam2
from keyseg.data.shapes import ShapesConfig, ShapesDataset
from keyseg.errors import KeySegCheckpointError, KeySegConfigError
from keyseg.model import qwen, tiny
from keyseg.model.backbone import FAMILIES, QWEN_FAMILIES, apply_projector, num_image_tokens
from keyseg.model.keyseg import SEGMENTERS, KeySegModel
from keyseg.model.sam import DEFAULT_PROMPT_DIM, SAM_PRESETS, SamSegmenter, sam_config
from keyseg.model.sam2 import SAM2_PRESETS
from keyseg.model.trainable import apply_lora, configure_trainable
from keyseg.processor import KeySegProcessor

#: The local presets, by family: what ``model.backbone.preset`` (with no ``name_or_path``)
#: and ``model.sam.preset`` may name. VLM presets are random tiny models (``tiny``, and
#: ``shapes``: the embedded default's VLM); SAM presets are architectures (``vit_h`` ...
#: equal the released checkpoints, ``tiny`` / ``shapes`` are small).
PRESETS: dict[str, Mapping[str, object]] = {
    "llava": tiny.VLM_PRESETS,
    **{family: qwen.QWEN_PRESETS for family in QWEN_FAMILIES},
    "sam": SAM_PRESETS,
    "sam2": SAM2_PRESETS,
}

#: Records of the shapes world whose texts train the ``shapes`` preset's tokenizer.
SHAPES_CORPUS_RECORDS = 600


def preset_corpus(preset: str) -> list[str] | None:
    """Tokenizer training text for a local VLM preset (None: the small default corpus).

    The ``shapes`` (and ``shapes192``) preset's tokenizer is trained on the procedural world's
    own queries and answers, so its few hundred merges cover the words the embedded default
    will see.
    """
    if not preset.startswith("shapes"):
        return None
    return list(_shapes_corpus())


@functools.cache
def _shapes_corpus() -> tuple[str, ...]:
    """The shapes presets' corpus, generated once per process (600 records take seconds)."""
    dataset = ShapesDataset("train", ShapesConfig())
    corpus = list(tiny.DEFAULT_CORPUS)
    for index in range(SHAPES_CORPUS_RECORDS):
        for ref in dataset[index].referents:
            corpus += [ref.text, ref.answer or "", ref.keyword or ""]
    return tuple(corpus)


def _check_preset(family: str, preset: str) -> None:
    presets = PRESETS[family]
    if preset not in presets:
        family_name = f"{family} " if family in QWEN_FAMILIES else ""
        raise KeySegConfigError(
            f"model.backbone.preset: unknown {family_name}preset {preset!r} without "
            f"name_or_path (local presets: {', '.join(presets)})"
        )


def build_vlm(cfg: BackboneConfig, tokenizer=None, dtype: torch.dtype | None = None):
    """Build the VLM, its image processor and tokenizer.

    ``cfg.name_or_path`` loads a pretrained HF directory of the family ``cfg.family``;
    otherwise ``cfg.preset`` names a locally built random model (:data:`PRESETS`). Returns
    ``(vlm, image_processor, tokenizer)``; the tokenizer is the given one, or the
    directory's.
    """
    if cfg.family not in FAMILIES:
        raise KeySegConfigError(f"model.backbone.family: unsupported family {cfg.family!r}")
    if cfg.name_or_path is None:
        _check_preset(cfg.family, cfg.preset)
        if cfg.family in QWEN_FAMILIES:
            vlm, image_processor, tokenizer = qwen.build_tiny_qwen(cfg.preset, tokenizer,
                                                                   family=cfg.family)
            return vlm.to(dtype) if dtype is not None else vlm, image_processor, tokenizer
        preset = tiny.VLM_PRESETS[cfg.preset]
        tokenizer = tokenizer or tiny.build_tiny_tokenizer(preset_corpus(cfg.preset))
        vocab = tokenizer.get_vocab()
        config = tiny.tiny_llava_config(
            vocab_size=len(tokenizer),
            image_token_id=vocab[cfg.image_token],
            pad_token_id=tokenizer.pad_token_id,
            **preset,
        )
        if cfg.attn_implementation is not None:
            config._attn_implementation = cfg.attn_implementation
        vlm = apply_projector(LlavaForConditionalGeneration(config), cfg)
        image_processor = tiny.tiny_image_processor(config.vision_config.image_size)
        return vlm.to(dtype) if dtype is not None else vlm, image_processor, tokenizer

    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        if cfg.family in QWEN_FAMILIES:
            from transformers import Qwen2VLImageProcessorPil

            _, model_class = qwen.qwen_classes(cfg.family)
            vlm = model_class.from_pretrained(cfg.name_or_path, dtype=dtype,
                                              attn_implementation=cfg.attn_implementation)
            # The PIL variant: works without torchvision.
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(cfg.name_or_path)
        else:
            if cfg.projector != "mlp2x_gelu":
                raise KeySegConfigError(
                    f"model.backbone.projector={cfg.projector!r} needs a KeySeg directory "
                    "(keyseg convert lisa ...), not a plain HF LLaVA one"
                )
            vlm = LlavaForConditionalGeneration.from_pretrained(
                cfg.name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation)
            image_processor = AutoImageProcessor.from_pretrained(cfg.name_or_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.name_or_path)
    except OSError as error:
        raise KeySegCheckpointError(f"{cfg.name_or_path}: cannot load VLM: {error}") from error
    return vlm, image_processor, tokenizer


def build_segmenter(family: str, preset: str, *, prompt_dim: int = DEFAULT_PROMPT_DIM,
                    checkpoint: str | None = None) -> SamSegmenter:
    """The mask decoder ``model.sam`` describes: SAM or SAM 2 (``family``) of a preset, with
    the weights of ``checkpoint`` when given: an official file (converted by
    :mod:`keyseg.convert`), or, for SAM, a pretrained SAM directory (``config.json`` +
    safetensors, e.g. the lab's ``experiments/pretrain_sam.py``) of exactly that preset at
    ``prompt_dim``."""
    if family not in SEGMENTERS:
        raise KeySegConfigError(f"model.sam.family: {family!r} is not one of 'sam', 'sam2'")
    if checkpoint and family == "sam" and Path(checkpoint).is_dir():
        return load_sam(checkpoint, expected=sam_config(preset, prompt_dim=prompt_dim))
    if checkpoint:
        load_official = load_official_sam2 if family == "sam2" else load_official_sam
        return load_official(checkpoint, preset=preset)
    _, segmenter_class = SEGMENTERS[family]
    return segmenter_class.from_preset(preset, prompt_dim=prompt_dim)


def build_keyseg(config: ModelConfig, tokenizer=None,
                 dtype: torch.dtype | None = None) -> KeySegModel:
    """A :class:`KeySegModel` from our config: pretrained VLM if ``backbone.name_or_path`` is
    set, else a local preset (random); SAM from ``sam.preset`` (+ official checkpoint if
    given); the processor that goes with them; fresh KeySeg heads.

    Args:
        config: the model config.
        tokenizer: use this tokenizer instead of the VLM directory's / the preset's.
        dtype: build (or load) the parts in this dtype.
    """
    vlm, image_processor, tokenizer = build_vlm(config.backbone, tokenizer, dtype)
    sam = build_segmenter(config.sam.family, config.sam.preset, prompt_dim=config.fusion.dim,
                          checkpoint=config.sam.checkpoint)
    processor = KeySegProcessor(
        tokenizer, image_processor, config.backbone,
        num_image_tokens=num_image_tokens(vlm.config), sam_image_size=sam.image_size,
        sam_family=sam.family,
    )
    tokens.resize_embeddings(vlm, tokenizer, new_token_ids=tokenizer.convert_tokens_to_ids(
        processor.added_tokens))
    model = KeySegModel.from_parts(config, vlm, sam, processor)
    return model.to(dtype) if dtype is not None else model


def build_tiny_model(seed: int = 0, config: ModelConfig | None = None,
                     lora: bool = False) -> KeySegModel:
    """A random tiny :class:`KeySegModel` (same classes as 7B), seeded, in fp32.

    ``config`` defaults to :func:`keyseg.model.tiny.tiny_model_config`. With ``lora=True``
    the LoRA adapters are applied and components made trainable as the config says, exactly
    as training does.
    """
    torch.manual_seed(seed)
    config = config or tiny.tiny_model_config()
    model = build_keyseg(config)
    if lora:
        apply_lora(model, config.lora)
        configure_trainable(model, config.trainable)
    return model


__all__ = [
    "PRESETS",
    "build_keyseg",
    "build_segmenter",
    "build_tiny_model",
    "build_vlm",
    "preset_corpus",
]
