"""transformers' Auto classes for KeySeg: ``AutoConfig`` / ``AutoModel.from_pretrained`` of a
KeySeg directory work after ``import keyseg`` (which calls :func:`register_auto_classes`).

Kept apart from :mod:`keyseg.model.configuration` so the config module does not import the
model (the model imports the config), and light: the model code (LLaVA, SAM, PEFT) is
imported on first use only.
"""

from __future__ import annotations

from typing import Any

from keyseg.model.configuration import MODEL_TYPE, KeySegModelConfig


class AutoKeySegModel:
    """Stands in for :class:`~keyseg.model.keyseg.KeySegModel` in transformers' ``AutoModel``
    mapping, so that ``import keyseg`` registers the Auto classes without importing the model
    code (LLaVA, SAM, PEFT); the real class is imported on first use."""

    config_class = KeySegModelConfig

    @staticmethod
    def _model_class():
        from keyseg.model.keyseg import KeySegModel

        return KeySegModel

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return cls._model_class().from_pretrained(*args, **kwargs)

    @classmethod
    def from_config(cls, config: KeySegModelConfig, **kwargs: Any):
        return cls._model_class()._from_config(config, **kwargs)

    _from_config = from_config


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModel`` know ``model_type: keyseg`` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(MODEL_TYPE, KeySegModelConfig, exist_ok=True)
    AutoModel.register(KeySegModelConfig, AutoKeySegModel, exist_ok=True)
