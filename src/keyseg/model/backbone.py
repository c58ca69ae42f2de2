"""The vision-language backbone: an HF image-text-to-text model.

Families (``BackboneConfig.family``): ``llava`` (HF LLaVA: LLaMA + CLIP; projector
``mlp2x_gelu`` or LLaVA-v1's single ``linear``) and the Qwen-VL families ``qwen2_vl``,
``qwen2_5_vl``, ``qwen3_vl`` (dynamic image-token counts, see :mod:`keyseg.model.qwen`).

Nothing here assumes LLaMA widths or CLIP-224: the hidden size, vocabulary size and number of
image tokens are read from the loaded config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from keyseg.config import BackboneConfig
from keyseg.errors import KeySegConfigError

#: Backbone families with Qwen's dynamic resolution and ChatML (keys of
#: ``keyseg.model.qwen.QWEN_FAMILIES``; literal here so this import stays light).
QWEN_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
FAMILIES: tuple[str, ...] = ("llava", *QWEN_FAMILIES)


# Children of a Qwen ``model.visual`` that map vision features to the LM width.
_QWEN_PROJECTOR_PARTS = ("merger", "deepstack_merger_list")


@dataclass
class BackboneOutput:
    """``logits: (B, L, V)``; ``last_hidden: (B, L, H)`` (last layer, final norm applied)."""

    logits: torch.Tensor
    last_hidden: torch.Tensor


class LinearProjector(nn.Module):
    """LLaVA-v1's image->text projector: one ``Linear(vision_hidden, text_hidden)``
    (``(B, N, Dv) -> (B, N, H)``), in place of HF LLaVA's two-layer GELU MLP."""

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_hidden, text_hidden)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear(image_features)


def apply_projector(vlm, cfg: BackboneConfig):
    """Swap HF LLaVA's MLP projector for :class:`LinearProjector` when
    ``cfg.projector == "linear"`` (LLaVA-v1 / LISA); returns ``vlm``."""
    if cfg.family != "llava" or cfg.projector == "mlp2x_gelu":
        return vlm
    config = vlm.config
    layers = config.vision_feature_layer
    width = config.vision_config.hidden_size * (len(layers) if isinstance(layers, list) else 1)
    old = vlm.model.multi_modal_projector
    reference = old.linear_1.weight
    vlm.model.multi_modal_projector = LinearProjector(width, config.text_config.hidden_size).to(
        device=reference.device, dtype=reference.dtype
    )
    return vlm


def vlm_from_config(cfg: BackboneConfig, vlm_config):
    """An untrained VLM of the family ``cfg.family`` built from its transformers config
    (or a saved ``config.to_dict()``), with the configured projector; weights are loaded by
    the caller."""
    if cfg.family in QWEN_FAMILIES:
        from keyseg.model.qwen import qwen_classes

        config_class, model_class = qwen_classes(cfg.family)
        if isinstance(vlm_config, dict):
            vlm_config = config_class.from_dict(vlm_config)
        return model_class(vlm_config)
    if cfg.family != "llava":
        raise KeySegConfigError(f"model.backbone.family: unsupported family {cfg.family!r}")
    if isinstance(vlm_config, dict):
        vlm_config = LlavaConfig.from_dict(vlm_config)
    return apply_projector(LlavaForConditionalGeneration(vlm_config), cfg)


def num_image_tokens(config) -> int:
    """Image tokens LLaVA inserts per image: patches, plus CLS under the ``full`` strategy.

    Dynamic-resolution families (Qwen-VL) have no fixed count: 0, and the processor reads
    the count of each image from its ``image_grid_thw``.
    """
    if getattr(config, "model_type", "") in QWEN_FAMILIES:
        return 0
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


class VisionLanguageBackbone(nn.Module):
    """Thin wrapper giving every VLM family the same three calls: forward, generate, and the
    module groups (language model, vision tower, projector) used to decide what trains."""

    def __init__(self, vlm: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.vlm = vlm

    @property
    def family(self) -> str:
        model_type = self.base.config.model_type
        return model_type if model_type in QWEN_FAMILIES else "llava"

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
        if self.family in QWEN_FAMILIES:
            visual = self.base.model.visual
            # Everything of the ViT except the merger(s) (the projector, below).
            return nn.ModuleList([m for n, m in visual.named_children()
                                  if n not in _QWEN_PROJECTOR_PARTS])
        return self.base.model.vision_tower

    def projector(self) -> nn.Module:
        if self.family in QWEN_FAMILIES:
            # The merger, plus Qwen3-VL's DeepStack mergers (vision -> LM width too).
            visual = self.base.model.visual
            return nn.ModuleList([m for n, m in visual.named_children()
                                  if n in _QWEN_PROJECTOR_PARTS])
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
            vision_inputs: the image processor's outputs, e.g. ``pixel_values (B, 3, h, w)``
                (LLaVA) or ``pixel_values (n_patches, D)`` + ``image_grid_thw (B, 3)`` (Qwen).
        """
        out = self.vlm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            **self.model_inputs(input_ids, vision_inputs),
        )
        return BackboneOutput(logits=out.logits, last_hidden=out.hidden_states[-1])

    def model_inputs(self, input_ids: torch.Tensor,
                     vision_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``vision_inputs`` plus what the family derives from the ids: Qwen's M-RoPE
        needs ``mm_token_type_ids (B, L)`` (1 at image tokens, 0 elsewhere)."""
        if self.family not in QWEN_FAMILIES or "mm_token_type_ids" in vision_inputs:
            return vision_inputs
        image_id = self.base.config.image_token_id
        return {**vision_inputs, "mm_token_type_ids": (input_ids == image_id).to(torch.int32)}

    def row_vision_inputs(self, vision_inputs: dict[str, torch.Tensor],
                          row: int) -> dict[str, torch.Tensor]:
        """The vision inputs of batch row ``row`` alone (one image per row).

        LLaVA's tensors have one entry per row; Qwen's ``pixel_values (n_patches, D)`` hold
        every row's patches back to back, ``t * h * w`` of them per row of
        ``image_grid_thw (B, 3)``.
        """
        if "image_grid_thw" not in vision_inputs:
            return {k: v[row : row + 1] for k, v in vision_inputs.items()}
        grid = vision_inputs["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        start = int(sum(sizes[:row]))
        out = {k: v[row : row + 1] for k, v in vision_inputs.items() if k != "pixel_values"}
        out["pixel_values"] = vision_inputs["pixel_values"][start : start + int(sizes[row])]
        return out

    def generate(self, **kwargs):
        if "input_ids" in kwargs and self.family in QWEN_FAMILIES:
            extra = self.model_inputs(kwargs["input_ids"], {})
            kwargs = {**extra, **kwargs}
        return self.vlm.generate(**kwargs)
