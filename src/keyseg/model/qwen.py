"""The Qwen-VL backbone families: dynamic-resolution images, ChatML template.

Three transformers classes share one interface (``model.visual`` + ``model.language_model``,
``pixel_values`` + ``image_grid_thw`` in, M-RoPE from ``mm_token_type_ids``), so one code
path serves them all (:data:`QWEN_FAMILIES`):

* ``qwen2_vl``: ``Qwen2VLForConditionalGeneration`` (ViT patch 14, merger = projector);
* ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration`` (windowed-attention ViT with a few
  full-attention blocks, RMSNorm + SwiGLU, patch 14; merger = projector);
* ``qwen3_vl``: ``Qwen3VLForConditionalGeneration`` (patch 16, learned position grid,
  "DeepStack": extra mergers ``visual.deepstack_merger_list`` whose outputs are added to the
  first LM layers' states at image positions; merger + deepstack mergers = projector).

Qwen2-VL differs from LLaVA in three ways the rest of KeySeg must not care about:

* the number of image tokens depends on the image: the image processor cuts the image into
  ``patch_size`` patches on a ``(t, h, w)`` grid (``image_grid_thw``) and the vision merger
  folds ``merge_size x merge_size`` patches into one token, so an image gives
  ``t * h * w / merge_size**2`` tokens (:func:`qwen_image_token_count`);
* ``pixel_values`` are flattened patches ``(n_patches, C * T * P * P)``, so rows of a batch
  concatenate along axis 0 together with ``image_grid_thw (B, 3)``;
* the conversation is ChatML (``<|im_start|>user ... <|im_end|>``) with the image placeholder
  ``<|vision_start|><|image_pad|><|vision_end|>``
  (:func:`keyseg.tokens.render_chatml_conversation`).

This module builds the tiny local presets (tokenizer, config, image processor) used by tests,
one per family; a real checkpoint (``Qwen/Qwen2-VL-2B-Instruct``,
``Qwen/Qwen2.5-VL-3B-Instruct``, ``Qwen/Qwen3-VL-4B-Instruct`` downloaded to a directory) is
loaded by :func:`keyseg.build.build_vlm` through the same classes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import transformers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLImageProcessorPil

from keyseg import tokens

QWEN_IMAGE_TOKEN = "<|image_pad|>"
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    QWEN_IMAGE_TOKEN,
    "<|video_pad|>",
)

#: family -> (transformers config class, model class) names; all load with the PIL image
#: processor ``Qwen2VLImageProcessorPil`` (no torchvision), which every family's
#: ``preprocessor_config.json`` parameterises (patch 14 or 16, merge 2).
QWEN_FAMILIES: dict[str, tuple[str, str]] = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
}


def qwen_classes(family: str) -> tuple[type, type]:
    """``(config class, model class)`` of a Qwen family (see :data:`QWEN_FAMILIES`)."""
    config_name, model_name = QWEN_FAMILIES[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)


# Named local presets for BackboneConfig.preset when family is a Qwen family.
QWEN_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "patch_size": 4, "merge_size": 2},
}


def build_tiny_qwen_tokenizer(corpus: Iterable[str] | None = None,
                              vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's special tokens (no BOS, ``<|im_end|>`` ends a turn)."""
    from keyseg.model.tiny import train_byte_level_bpe

    tok = train_byte_level_bpe(corpus, vocab_size, QWEN_SPECIAL_TOKENS)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tokens.add_special_tokens(wrapped, QWEN_IMAGE_TOKEN)
    return wrapped


def tiny_qwen_config(
    family: str,
    vocab_size: int,
    image_token_id: int,
    vision_start_token_id: int,
    vision_end_token_id: int,
    video_token_id: int,
    pad_token_id: int,
    eos_token_id: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    patch_size: int = 4,
    merge_size: int = 2,
):
    """A config of ``family`` with a few hundred thousand parameters (4 heads of 16 dims,
    M-RoPE sections summing to 8 = head_dim / 2); the vision tower keeps each family's own
    structure (Qwen2.5-VL: one windowed + one full-attention block; Qwen3-VL: a 4x4 learned
    position grid and one DeepStack merger)."""
    config_class, _ = qwen_classes(family)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True  # as Qwen3-VL's released configs
    text = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": rope,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    vision: dict = {
        "depth": 2,
        "num_heads": 2,
        "patch_size": patch_size,
        "spatial_merge_size": merge_size,
        "temporal_patch_size": 2,
    }
    if family == "qwen2_vl":
        # The merger projects straight to the LM width (hidden_size = LM width here).
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size,
            # window in pixels: 2x2 merged tokens per window; block 1 attends globally
            window_size=2 * patch_size * merge_size, fullatt_block_indexes=[1],
        )
    else:
        text["head_dim"] = hidden_size // 4
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        )
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
        tie_word_embeddings=False,
    )


def tiny_qwen2_vl_config(*args, **kwargs) -> Qwen2VLConfig:
    """:func:`tiny_qwen_config` of the ``qwen2_vl`` family."""
    return tiny_qwen_config("qwen2_vl", *args, **kwargs)


def tiny_qwen_image_processor(patch_size: int = 4, merge_size: int = 2,
                              min_pixels: int = 16 * 16,
                              max_pixels: int = 48 * 48) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL preprocessing (PIL, no torchvision) on a tiny pixel budget: images are
    resized to multiples of ``patch_size * merge_size`` between ``min_pixels`` and
    ``max_pixels``, so different aspect ratios give different token counts."""
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
    )


def qwen_image_token_count(image_grid_thw: torch.Tensor, merge_size: int) -> int:
    """Image tokens of one image: ``t * h * w / merge_size**2`` from its ``(1, 3)`` or
    ``(3,)`` grid."""
    return int(image_grid_thw.reshape(-1, 3).prod(-1).sum()) // (merge_size**2)


def build_tiny_qwen(preset: str, tokenizer=None, family: str = "qwen2_vl"):
    """``(vlm, image_processor, tokenizer)`` for a local preset of a Qwen family (random
    weights)."""
    _, model_class = qwen_classes(family)
    settings = QWEN_PRESETS[preset]
    tokenizer = tokenizer or build_tiny_qwen_tokenizer()
    vocab = tokenizer.get_vocab()
    config = tiny_qwen_config(
        family,
        vocab_size=len(tokenizer),
        image_token_id=vocab[QWEN_IMAGE_TOKEN],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
        video_token_id=vocab["<|video_pad|>"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **settings,
    )
    vlm = model_class(config)
    processor = tiny_qwen_image_processor(settings["patch_size"], settings["merge_size"])
    return vlm, processor, tokenizer
