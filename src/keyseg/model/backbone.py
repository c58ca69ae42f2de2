"""The vision-language backbone: an HF image-text-to-text model (LLaVA family first).

Nothing here assumes LLaMA widths or CLIP-224: the hidden size, vocabulary size and number of
image tokens are read from the loaded config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from keyseg.config import BackboneConfig
from keyseg.errors import KeySegCheckpointError, KeySegConfigError


@dataclass
class BackboneOutput:
    """``logits: (B, L, V)``; ``last_hidden: (B, L, H)`` (last layer, final norm applied)."""

    logits: torch.Tensor
    last_hidden: torch.Tensor


def num_image_tokens(config: LlavaConfig) -> int:
    """Image tokens LLaVA inserts per image: patches, plus CLS under the ``full`` strategy."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def build_vlm(cfg: BackboneConfig, tokenizer, dtype: torch.dtype | None = None):
    """Build the VLM, its image processor and tokenizer.

    ``cfg.name_or_path`` loads a pretrained HF LLaVA directory; otherwise ``cfg.preset``
    names a locally built random model (``tiny``). Returns ``(vlm, image_processor,
    tokenizer)``; the tokenizer is the given one, or the directory's.
    """
    if cfg.family != "llava":
        raise KeySegConfigError(f"model.backbone.family: unsupported family {cfg.family!r}")
    if cfg.name_or_path is None:
        from keyseg.model import tiny

        if cfg.preset not in tiny.VLM_PRESETS:
            raise KeySegConfigError(
                f"model.backbone.preset: unknown preset {cfg.preset!r} without name_or_path "
                f"(local presets: {', '.join(tiny.VLM_PRESETS)})"
            )
        preset = tiny.VLM_PRESETS[cfg.preset]
        tokenizer = tokenizer or tiny.build_tiny_tokenizer()
        vocab = tokenizer.get_vocab()
        config = tiny.tiny_llava_config(
            vocab_size=len(tokenizer),
            image_token_id=vocab[cfg.image_token],
            pad_token_id=tokenizer.pad_token_id,
            **preset,
        )
        vlm = LlavaForConditionalGeneration(config)
        image_processor = tiny.tiny_image_processor(config.vision_config.image_size)
        return vlm.to(dtype) if dtype is not None else vlm, image_processor, tokenizer

    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        vlm = LlavaForConditionalGeneration.from_pretrained(cfg.name_or_path, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(cfg.name_or_path)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.name_or_path)
    except OSError as error:
        raise KeySegCheckpointError(f"{cfg.name_or_path}: cannot load VLM: {error}") from error
    return vlm, image_processor, tokenizer


class VisionLanguageBackbone(nn.Module):
    """Thin wrapper giving every VLM family the same three calls: forward, generate, and the
    module groups (language model, vision tower, projector) used to decide what trains."""

    def __init__(self, vlm: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.vlm = vlm

    @property
    def base(self) -> LlavaForConditionalGeneration:
        """The underlying HF model, with any PEFT wrapper removed."""
        vlm = self.vlm
        return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm

    @property
    def hidden_size(self) -> int:
        return self.base.config.text_config.hidden_size

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.base.config)

    def language_model(self) -> nn.Module:
        return self.base.model.language_model

    def vision_tower(self) -> nn.Module:
        return self.base.model.vision_tower

    def projector(self) -> nn.Module:
        return self.base.model.multi_modal_projector

    def input_embeddings(self) -> nn.Embedding:
        return self.base.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_inputs: dict[str, torch.Tensor],
    ) -> BackboneOutput:
        """One teacher-forced pass.

        Args:
            input_ids: ``(B, L)`` with image tokens already expanded.
            attention_mask: ``(B, L)``.
            vision_inputs: the image processor's outputs, e.g. ``pixel_values (B, 3, h, w)``.
        """
        out = self.vlm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            **vision_inputs,
        )
        return BackboneOutput(logits=out.logits, last_hidden=out.hidden_states[-1])

    def generate(self, **kwargs):
        return self.vlm.generate(**kwargs)
