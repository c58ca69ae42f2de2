"""Reading foreign checkpoint tensors: single files, shards with an index, two formats.

Reading (:func:`read_checkpoint`) accepts

* a file: ``*.safetensors``, or a pickle (``*.bin``/``*.pt``/``*.pth``) loaded with
  ``torch.load(weights_only=True)`` (a DeepSpeed ``zero_to_fp32`` output is such a file);
* a directory with ``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``
  (HF sharding: ``{"weight_map": {tensor: shard file}}``), or with one ``model.safetensors``
  / ``pytorch_model.bin``.

Every error names the file and, where there is one, the first offending tensor (a shard the
index names but that is missing, a tensor the index promises but its shard lacks, a
non-tensor entry). Each tensor remembers the file it came from (:attr:`Checkpoint.origin`)
so a converter can say where a wrongly shaped tensor lives.

KeySeg's own directories are written and read by transformers (``KeySegModel.save_pretrained``
/ ``from_pretrained``); this module is for the converters.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from keyseg.errors import KeySegCheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class Checkpoint:
    """Tensors of a checkpoint plus where each came from.

    Attributes:
        tensors: name -> tensor (CPU).
        origin: name -> the file that held it.
        source: what was read (file or directory), for messages.
    """

    tensors: dict[str, Tensor]
    origin: dict[str, Path] = field(default_factory=dict)
    source: Path = Path(".")

    def where(self, name: str) -> str:
        """``file: name`` for an error message."""
        return f"{self.origin.get(name, self.source)}: {name}"


def _weights_only_reason(error: Exception) -> str:
    """The informative part of torch's long weights-only error, as one line."""
    text = str(error)
    _, found, reason = text.partition("WeightsUnpickler error:")
    reason = " ".join(reason.split()) if found else (text.splitlines() or [""])[0]
    reason = reason.split(" Please use ")[0].split(" Check the documentation")[0]
    return reason or "unreadable pickle"


def read_tensor_file(path: Path, unwrap: bool = True) -> dict[str, Tensor]:
    """One ``.safetensors`` or pickle file -> ``{name: tensor}`` (CPU).

    A pickle is loaded with ``weights_only=True`` (and ``mmap`` when the file is in torch's
    zip format, so a 7B shard is not copied into memory twice). With ``unwrap``, a
    ``{"module": state}``, ``{"state_dict": state}`` or ``{"model": state}`` wrapper
    (DeepSpeed / Lightning) is unwrapped; without, such a file is refused (naming the key).
    """
    if not path.is_file():
        raise KeySegCheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # legacy (non-zip) pickles cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise KeySegCheckpointError(
            f"{path}: not a plain tensor state dict; torch.load(weights_only=True) refused it "
            f"({_weights_only_reason(error)})"
        ) from error
    except KeySegCheckpointError:
        raise
    except Exception as error:  # torch/safetensors raise many types for a bad file
        raise KeySegCheckpointError(
            f"{path}: cannot read checkpoint ({type(error).__name__}: {error})".splitlines()[0]
        ) from error
    if unwrap and isinstance(state, Mapping):
        for wrapper in ("module", "state_dict", "model"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and len(state) <= 3:
                state = inner
                break
    if not isinstance(state, Mapping):
        raise KeySegCheckpointError(
            f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}"
        )
    for name, value in state.items():
        if not isinstance(value, Tensor):
            raise KeySegCheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor "
                "(expected a plain name -> tensor state dict)"
            )
    return dict(state)


def _read_index(index_file: Path) -> dict[str, str]:
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KeySegCheckpointError(
            f"{index_file}: not a shard index (expected JSON with a 'weight_map'): {error}"
        ) from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise KeySegCheckpointError(f"{index_file}: 'weight_map' is empty or not a mapping")
    return weight_map


def checkpoint_files(src: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """The files to read for ``src`` and the index file (if sharded)."""
    src = Path(src)
    if src.is_file():
        if src.name.endswith(".index.json"):
            return _index_files(src), src
        return [src], None
    if not src.is_dir():
        raise KeySegCheckpointError(f"{src}: no such checkpoint file or directory")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (src / index_name).is_file():
            return _index_files(src / index_name), src / index_name
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (src / single).is_file():
            return [src / single], None
    candidates = sorted(p for p in src.iterdir()
                        if p.suffix in (".safetensors", *PICKLE_SUFFIXES) and p.is_file())
    if len(candidates) == 1:
        return candidates, None
    raise KeySegCheckpointError(
        f"{src}: unknown checkpoint layout: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, "
        f"{SAFETENSORS_SINGLE} or {BIN_SINGLE}"
        + (f" (found {len(candidates)} weight files and no index)" if candidates else
           " (no weight file found)")
    )


def _index_files(index_file: Path) -> list[Path]:
    weight_map = _read_index(index_file)
    files: list[Path] = []
    for tensor, shard in weight_map.items():
        path = index_file.parent / shard
        if path not in files:
            if not path.is_file():
                raise KeySegCheckpointError(
                    f"{index_file}: shard {shard} is missing (first tensor it should hold: "
                    f"{tensor})"
                )
            files.append(path)
    return files


def read_checkpoint(src: str | os.PathLike, strip_prefix: str | None = None,
                    progress: bool = False) -> Checkpoint:
    """Read every tensor of a checkpoint file or directory (see the module docstring).

    Args:
        src: a weight file, an ``*.index.json`` or a directory.
        strip_prefix: removed from names that start with it (e.g. ``"module."``).
        progress: show a progress bar over the shards.
    """
    src = Path(src)
    files, index_file = checkpoint_files(src)
    expected = _read_index(index_file) if index_file is not None else None
    tensors: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    iterator = files
    if progress and len(files) > 1:
        from tqdm import tqdm

        iterator = tqdm(files, desc=f"reading {src.name}", unit="shard")
    for path in iterator:
        for name, tensor in read_tensor_file(path).items():
            if name in tensors:
                raise KeySegCheckpointError(
                    f"{path}: tensor {name} also appears in {origin[name]}"
                )
            tensors[name] = tensor
            origin[name] = path
    if expected is not None:
        for name, shard in expected.items():
            if name not in tensors:
                raise KeySegCheckpointError(
                    f"{index_file.parent / shard}: tensor {name} listed in {index_file.name} "
                    "is not in the shard"
                )
    if strip_prefix:
        tensors = {_strip(k, strip_prefix): v for k, v in tensors.items()}
        origin = {_strip(k, strip_prefix): v for k, v in origin.items()}
    return Checkpoint(tensors, origin, src)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name
