"""The transformers config of a KeySeg model: the VLM's and SAM's configs nested, as LLaVA
nests its text and vision configs, plus KeySeg's own frozen :class:`~keyseg.config.ModelConfig`
(the source of truth for training) stored as a plain dict under ``keyseg``.

``config.json`` of a KeySeg directory::

    {"model_type": "keyseg", "architectures": ["KeySegModel"],
     "keyseg": {...ModelConfig...}, "vlm_config": {...LlavaConfig / Qwen2VLConfig...},
     "sam_config": {...SamConfig...}, "lora_applied": false, "dtype": "float32", ...}

Directories written before this class existed (``{"keyseg", "vlm", "sam", "lora_applied"}``,
no ``model_type``) read the same: ``vlm``/``sam`` are taken as the sub-configs.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from keyseg.config import ModelConfig, from_dict, to_dict

MODEL_TYPE = "keyseg"


class KeySegModelConfig(PreTrainedConfig):
    """Composite config: ``vlm_config`` (any VLM family's config, resolved by its
    ``model_type``), ``sam_config`` (a ``SamConfig``), ``keyseg`` (``to_dict`` of
    :class:`~keyseg.config.ModelConfig`) and ``lora_applied`` (the weights carry unmerged
    LoRA adapters, so the model is built with them)."""

    model_type = MODEL_TYPE
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vlm_config": SubConfigSpec(config_class=AutoConfig, model_type="llava"),
        "sam_config": SubConfigSpec(config_class=AutoConfig, model_type="sam"),  # or sam2
    }

    vlm_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    keyseg: dict | None = None
    lora_applied: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # Directories of earlier versions named the sub-configs "vlm" and "sam".
        if self.vlm_config is None and isinstance(kwargs.get("vlm"), dict):
            self.vlm_config = kwargs.pop("vlm")
        if self.sam_config is None and isinstance(kwargs.get("sam"), dict):
            self.sam_config = kwargs.pop("sam")
        super().__post_init__(**kwargs)

    @property
    def settings(self) -> ModelConfig:
        """The frozen KeySeg model config (``keyseg`` parsed strictly)."""
        return from_dict(ModelConfig, with_recorded_convention(self.keyseg or {}),
                         source="config.json: keyseg")

    @classmethod
    def from_parts(cls, settings: ModelConfig, vlm_config: PreTrainedConfig,
                   sam_config: PreTrainedConfig, lora_applied: bool = False) -> KeySegModelConfig:
        return cls(keyseg=to_dict(settings), vlm_config=vlm_config, sam_config=sam_config,
                   lora_applied=lora_applied)


def with_recorded_convention(saved: dict) -> dict:
    """A saved model config (``to_dict`` of :class:`ModelConfig`) with its tokenisation
    convention made explicit: directories written before ``backbone.convention`` existed were
    trained with whitespace kept around the added tokens, so they load as ``"v0"`` and
    tokenise exactly as they did."""
    backbone = dict(saved.get("backbone") or {})
    backbone.setdefault("convention", "v0")
    return {**saved, "backbone": backbone}
