"""Export a trained model as one self-contained directory.

``export_model(SRC, DST, merge_lora=True)`` reads a KeySeg model directory or a training run
directory (its ``final/`` model, optionally with the ``best/`` or latest checkpoint's
trainable weights laid over it; a run stopped before ``final/`` is rebuilt from its
``config.yaml`` and needs ``--weights``), optionally folds the LoRA adapters into the language model
(PEFT ``merge_and_unload``: ``W + alpha/r * B @ A``, so no PEFT is needed to run it), and
writes with :meth:`KeySegModel.save_pretrained`::

    DST/config.json                        KeySeg config + VLM config + SAM config
    DST/model-0000i-of-0000n.safetensors   weight shards
    DST/model.safetensors.index.json       tensor -> shard
    DST/tokenizer*.json, special_tokens_map.json, preprocessor_config.json,
    DST/keyseg_processor.json              tokenizer, image processor, KeySeg processor
    DST/export.json                        where it came from, whether LoRA was merged

    DST/README.md                          model card (Hub metadata, eval numbers, config)

``KeySegModel.from_pretrained(DST)`` needs nothing else. ``keyseg export ... --push-to-hub
REPO`` then uploads the folder (:func:`keyseg.hub.push_folder`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from keyseg.errors import KeySegCheckpointError
from keyseg.hub import write_model_card
from keyseg.io import atomic_write_json

EXPORT_FILE = "export.json"


@dataclass
class ExportResult:
    directory: Path
    source: Path
    merged_lora: int  # number of LoRA-wrapped layers folded into their base weights
    num_parameters: int
    shards: int


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "keyseg_processor.json").is_file()


def is_stopped_run(path: Path) -> bool:
    """A run directory that never wrote ``final/`` (interrupted or killed): its
    ``config.yaml`` and a checkpoint are all there is."""
    return (path / "config.yaml").is_file() and not is_model_dir(path / "final")


def resolve_source(src: str | os.PathLike, weights: str | None = None) -> tuple[Path, Path | None]:
    """``(model_dir, trainable_weights_file or None)`` for a model or run directory.

    ``model_dir`` is the run directory itself for a stopped run (no ``final/``): the model
    is then rebuilt from its ``config.yaml`` (:func:`rebuild_from_run`) and ``weights``
    is required.

    Args:
        src: a KeySeg model directory, or a run directory (with or without ``final/``).
        weights: for a run directory: ``"best"`` (``best/trainable.safetensors``),
            ``"latest"`` (the newest ``checkpoints/step-*``), or a path to a
            ``trainable.safetensors``; None uses ``final/`` as saved.
    """
    src = Path(src)
    if is_model_dir(src):
        model_dir = src
    elif is_model_dir(src / "final"):
        model_dir = src / "final"
    elif is_stopped_run(src):
        if weights is None:
            raise KeySegCheckpointError(
                f"{src}: run stopped before writing final/; pass --weights best or latest "
                "to export one of its checkpoints")
        model_dir = src
    else:
        raise KeySegCheckpointError(
            f"{src}: neither a KeySeg model directory (config.json + keyseg_processor.json) "
            "nor a run directory (config.yaml)")
    if weights is None:
        return model_dir, None
    if weights == "best":
        file = src / "best" / "trainable.safetensors"
    elif weights == "latest":
        steps = sorted((src / "checkpoints").glob("step-*/trainable.safetensors"))
        if not steps:
            raise KeySegCheckpointError(f"{src / 'checkpoints'}: no step checkpoint")
        file = steps[-1]
    else:
        file = Path(weights)
    if not file.is_file():
        raise KeySegCheckpointError(f"{file}: trainable weights not found")
    return model_dir, file


def load_for_export(src: str | os.PathLike, weights: str | None = None,
                    dtype: torch.dtype | None = None):
    """The model to export (with any trainable weights laid over it)."""
    from safetensors.torch import load_file

    from keyseg.model.keyseg import KeySegModel

    model_dir, file = resolve_source(src, weights)
    if is_model_dir(model_dir):
        model = KeySegModel.from_pretrained(model_dir)
    else:
        model = rebuild_from_run(model_dir)
    if file is not None:
        try:
            state = load_file(str(file))
        except Exception as error:
            raise KeySegCheckpointError(f"{file}: cannot read ({error})") from error
        model.load_checkpoint_state(state, source=str(file), strict=False)
    if dtype is not None:
        model = model.to(dtype)
    return model, model_dir


def rebuild_from_run(run_dir: Path):
    """The model a run started from, rebuilt from its ``config.yaml`` by the code training
    uses (:func:`keyseg.train.build.starting_model`, same seed, so random frozen parts come
    out identical), ready for a checkpoint's trainable weights."""
    from accelerate.utils import set_seed

    from keyseg.config import load_config
    from keyseg.train.build import starting_model

    cfg = load_config(run_dir / "config.yaml")
    set_seed(cfg.train.seed)  # as keyseg.train.loop.setup_accelerator does before building
    return starting_model(cfg)[0]


def merge_lora(model) -> int:
    """Fold the LoRA adapters into the base weights (PEFT ``merge_and_unload``) in place.

    Returns the number of merged layers (0 when the model has no adapters)."""
    vlm = model.backbone.vlm
    if not hasattr(vlm, "peft_config"):
        return 0
    from peft.tuners.lora import LoraLayer

    count = sum(1 for m in vlm.modules() if isinstance(m, LoraLayer))
    model.backbone.vlm = vlm.merge_and_unload()
    return count


def export_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    merge: bool = False,
    weights: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    report: str | os.PathLike | None = None,
) -> ExportResult:
    """Write a self-contained model directory with a model card (see the module docstring).

    Args:
        src: model directory or run directory.
        dst: output directory (replaced atomically).
        merge: fold LoRA into the language model (the result needs no PEFT).
        weights: ``best`` / ``latest`` / a ``trainable.safetensors`` path (run directories).
        dtype: cast before writing (after merging, which runs in the loaded dtype).
        max_shard_bytes: shard size (default 2 GiB).
        report: a ``keyseg eval`` ``report.json`` whose numbers go into the card (default:
            the newest one found in the source directory).
    """
    model, model_dir = load_for_export(src, weights)
    merged = merge_lora(model) if merge else 0
    if dtype is not None:
        model = model.to(dtype)
    dst = Path(dst)
    if dst.resolve() == model_dir.resolve():
        raise KeySegCheckpointError(f"{dst}: export destination is the source directory")
    model.save_pretrained(dst, max_shard_bytes=max_shard_bytes)
    atomic_write_json(dst / EXPORT_FILE, {
        "source": str(Path(src).resolve()),
        "weights": weights,
        "merged_lora_layers": merged,
        "lora_in_weights": hasattr(model.backbone.vlm, "peft_config"),
        "dtype": str(model.dtype).removeprefix("torch."),
    })
    write_model_card(dst, model.settings, report=_report(src, report),
                     train_config=_train_config(src), title=dst.name)
    return ExportResult(dst, Path(src), merged, sum(p.numel() for p in model.parameters()),
                        count_shards(dst))


def count_shards(directory: Path) -> int:
    """Weight files of a saved directory: the index's shards, or 1 for one
    ``model.safetensors`` (what transformers writes when everything fits one shard)."""
    import json

    from keyseg.convert.checkpoint_io import SAFETENSORS_INDEX

    index = directory / SAFETENSORS_INDEX
    if not index.is_file():
        return 1
    return len(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))


def _report(src: str | os.PathLike, report: str | os.PathLike | None) -> dict | None:
    """The evaluation report for the card: ``report`` if given, else the newest
    ``report.json`` within two levels of ``src`` (e.g. ``RUN/eval/report.json``)."""
    import json

    if report is not None:
        try:
            return json.loads(Path(report).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise KeySegCheckpointError(f"{report}: cannot read the report ({error})") from None
    found = [*Path(src).glob("report.json"), *Path(src).glob("*/report.json"),
             *Path(src).glob("*/*/report.json")]
    for candidate in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def _train_config(src: str | os.PathLike) -> dict | None:
    """The run's ``config.yaml`` as a dict, when ``src`` is a run directory."""
    import yaml

    file = Path(src) / "config.yaml"
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None
