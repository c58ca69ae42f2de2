"""Reconciling a loaded model with the architecture a training run asks for.

``train.init_from`` loads a model directory (its weights fix most of the architecture) while
the run's config also names an architecture. Each ``model.*`` key falls in one class:

* **where weights come from** (:data:`WEIGHT_SOURCES`): irrelevant once the directory
  provides the weights; ignored, with a note when the run config names another source;
* **fixed by the weights** (:data:`FIXED`): a different value cannot take effect, so the run
  stops with one line naming the key and both values;
* **adjustable** (everything else): takes effect on the loaded model (fusion rebuilt, with
  every tensor whose name and shape still fit kept; a separate ``[KEY]`` head started as a
  copy of ``text_hidden_fcs``; token registration redone for another convention).

A run key that differs from the directory's but equals the dataclass default is taken as
unset: the directory's value is kept and said so. ``lora``, ``loss`` and ``trainable`` always
come from the run config (what and how to train).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from keyseg import tokens
from keyseg.config import ModelConfig, to_dict
from keyseg.errors import KeySegConfigError
from keyseg.model.fusion import KeywordFusion

# Keys always taken from the run config: what and how to train.
FROM_RUN = ("lora", "loss", "trainable")
WEIGHT_SOURCES = ("backbone.name_or_path", "backbone.preset", "sam.checkpoint")
FIXED = ("backbone.family", "backbone.image_token", "backbone.use_im_start_end",
         "backbone.projector", "sam.preset", "fusion.dim")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _replace_dotted(config: ModelConfig, key: str, value: Any) -> ModelConfig:
    section, _, leaf = key.rpartition(".")
    if not section:
        return dataclasses.replace(config, **{leaf: value})
    parent = getattr(config, section)
    return dataclasses.replace(config, **{section: dataclasses.replace(parent, **{leaf: value})})


def reconcile(model, requested: ModelConfig, source: str) -> list[str]:
    """Make ``model`` (loaded from ``source``) the architecture ``requested`` asks for.

    Args:
        model: a :class:`~keyseg.model.keyseg.KeySegModel` as loaded from ``source``.
        requested: the run's ``model`` config.
        source: the ``train.init_from`` directory (for messages).

    Returns:
        One human-readable line per key whose run value and directory value differ, saying
        what happened. ``model.config`` is updated in place.

    Raises:
        KeySegConfigError: a key fixed by the weights is asked to change (before training).
    """
    loaded = model.config
    ours = _flatten({k: v for k, v in to_dict(requested).items() if k not in FROM_RUN})
    theirs = _flatten({k: v for k, v in to_dict(loaded).items() if k not in FROM_RUN})
    defaults = _flatten({k: v for k, v in to_dict(ModelConfig()).items() if k not in FROM_RUN})
    config = dataclasses.replace(loaded, **{k: getattr(requested, k) for k in FROM_RUN})
    notes: list[str] = []
    for key, wanted in ours.items():
        have = theirs.get(key)
        if wanted == have:
            continue
        if key in WEIGHT_SOURCES:
            notes.append(f"model.{key}={wanted!r} ignored: the weights come from "
                         f"train.init_from {source}")
        elif wanted == defaults.get(key):
            notes.append(f"model.{key}: {have!r} kept from train.init_from {source} (this "
                         f"config leaves the default {wanted!r})")
        elif key in FIXED:
            raise KeySegConfigError(
                f"model.{key}: this config asks for {wanted!r} but train.init_from {source} "
                f"has {have!r}, which its weights fix; drop the key or start without init_from")
        else:
            config = _replace_dotted(config, key, wanted)
            notes.append(f"model.{key}: {have!r} from train.init_from {source} -> {wanted!r} "
                         "(this config)")
    return notes + _apply(model, config)


def _apply(model, config: ModelConfig) -> list[str]:
    """Rebuild what ``config`` changes on ``model``, set ``model.config``; returns notes on
    tensors that start fresh."""
    old = model.config
    notes = []
    if config.fusion != old.fusion:
        fresh = KeywordFusion(config.fusion).to(model.device, model.dtype)
        kept = {name: tensor for name, tensor in model.keyword_fusion.state_dict().items()
                if name in fresh.state_dict() and fresh.state_dict()[name].shape == tensor.shape}
        fresh.load_state_dict(kept, strict=False)
        model.keyword_fusion = fresh
        new = sorted(set(fresh.state_dict()) - set(kept))
        if new:
            notes.append(f"keyword_fusion: {len(new)} tensors start fresh (first: {new[0]})")
    if config.key_projection != old.key_projection:
        model.keyword_text_proj = (copy.deepcopy(model.text_hidden_fcs)
                                   if config.key_projection == "separate" else None)
        if model.keyword_text_proj is not None:
            notes.append("keyword_text_proj: starts as a copy of text_hidden_fcs")
    if config.backbone != old.backbone:
        processor = model.processor
        processor.backbone = config.backbone
        tokens.add_special_tokens(processor.tokenizer, config.backbone.image_token,
                                  config.backbone.use_im_start_end,
                                  strip_spaces=config.backbone.convention == "lisa")
    model.config = config
    return notes
