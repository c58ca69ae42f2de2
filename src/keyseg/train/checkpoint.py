"""The train state and its checkpoints: one :class:`TrainState` saved and restored whole.

A checkpoint (``run_dir/checkpoints/step-NNNNNNN/``, written atomically)::

    trainable.safetensors   every parameter with requires_grad, by model.named_parameters()
    optimizer.pt scheduler.pt [scaler.pt]   torch.save'd state dicts (weights_only loadable)
    [deepspeed/]            ZeRO's sharded model + optimizer (instead of optimizer.pt)
    rng.pt                  python / numpy / torch / cuda RNG states of every process
    state.json              counters (step, epoch, best metric, ...), data position, config

The last ``train.keep_last`` are kept. ``run_dir/best`` holds the trainable weights of the
best validation and ``run_dir/final`` the whole model (``save_pretrained``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from keyseg.config import KeySegConfig, to_dict
from keyseg.errors import KeySegCheckpointError
from keyseg.io import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

    from keyseg.train.loader import MicroBatches

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
WEIGHTS = "trainable.safetensors"


@dataclass
class TrainState:
    """Everything a checkpoint saves and restores, as one object: the prepared model (its
    trainable tensors), optimizer and scheduler, and the progress counters. (The grad scaler
    lives in the Accelerator and the RNG states are global; both are saved too.)"""

    model: torch.nn.Module = field(repr=False)  # the prepared (DDP-wrapped) KeySegModel
    optimizer: torch.optim.Optimizer = field(repr=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(repr=False)
    step: int = 0  # optimizer steps done (= data position)
    epoch: int = 0  # completed epochs
    best_giou: float | None = None
    best_step: int | None = None
    epochs_without_improvement: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_skipped: int = 0  # steps skipped for a non-finite loss / gradient
    bad_samples: int = 0  # records skipped by reader or collate errors
    samples_seen: int = 0  # conversation rows, all processes
    tokens_seen: int = 0

    def counters(self) -> dict[str, Any]:
        """The progress counters (``state.json``'s ``state``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _OBJECTS}

    def load_counters(self, saved: dict[str, Any]) -> None:
        for name in self.counters():
            if name in saved:
                setattr(self, name, saved[name])


_OBJECTS = ("model", "optimizer", "scheduler")


# =========================================================================================
# finding checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(run_dir: Path, resume: str) -> Path:
    """``resume``: ``"latest"`` (the run's newest checkpoint) or a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise KeySegCheckpointError(f"{run_dir / CHECKPOINTS}: no checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise KeySegCheckpointError(f"{path}: not a training checkpoint (no state.json)")
    return path


# =========================================================================================
# saving


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors, by name (what ``trainable.safetensors`` holds)."""
    return {n: p.detach().contiguous().clone().cpu() for n, p in trainable_parameters(model)}


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain types (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator: Accelerator, state: TrainState, batches: MicroBatches,
                    run_dir: Path, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically, then keep the last ``keep_last``."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    path = Path(run_dir) / CHECKPOINTS / f"{STEP_PREFIX}{state.step:07d}"
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    sharded = path.parent / f".deepspeed-{path.name}"
    if is_deepspeed(accelerator):
        # ZeRO partitions the optimizer over processes: every process writes its shard.
        accelerator.save_state(str(sharded))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = trainable_state(accelerator.unwrap_model(state.model))
        meta = {"state": state.counters(), "data": batches.state_dict(state.step),
                "config": to_dict(batches.cfg)}
        with atomic_directory(path) as tmp:
            save_file(weights, str(tmp / WEIGHTS))
            if is_deepspeed(accelerator):
                shutil.move(str(sharded), tmp / "deepspeed")
            else:
                torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(state.scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(rngs, tmp / "rng.pt")
            atomic_write_json(tmp / "state.json", meta)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def save_best(accelerator: Accelerator, state: TrainState, scores: dict, run_dir: Path) -> None:
    """The trainable weights and ``metrics.json`` of a new best validation -> ``run_dir/best``
    (main process)."""
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        weights = trainable_state(accelerator.unwrap_model(state.model))
        with atomic_directory(Path(run_dir) / "best") as tmp:
            save_file(weights, str(tmp / WEIGHTS))
            atomic_write_json(tmp / "metrics.json", {"step": state.step, **scores})


def save_final(accelerator: Accelerator, model: torch.nn.Module, run_dir: Path,
               cfg: KeySegConfig | None = None) -> Path:
    """The whole model via ``save_pretrained`` into ``run_dir/final`` (for eval/segment),
    with a model card naming the training config."""
    from keyseg.hub import write_model_card

    path = Path(run_dir) / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(path)
        write_model_card(path, unwrapped.settings,
                         train_config=to_dict(cfg) if cfg is not None else None,
                         datasets=_card_datasets(cfg) if cfg is not None else None)
    return path


def _card_datasets(cfg: KeySegConfig) -> list[str]:
    """Dataset names of the training mixture, for the model card's metadata."""
    names = {"reason_seg": "ReasonSeg", "refer_seg": "refCOCO", "shapes": "keyseg-shapes"}
    return [names.get(n, n) for n in cfg.data.datasets]


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


# =========================================================================================
# loading


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise KeySegCheckpointError(f"{path}: cannot read: {error}") from error


def load_checkpoint(path: Path, accelerator: Accelerator, state: TrainState,
                    cfg: KeySegConfig) -> TrainState:
    """Restore ``state`` whole from ``path``: weights, optimizer, scheduler, counters, and
    the Accelerator's scaler and this process's RNG states."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    data = meta["data"]
    expected = {"world": accelerator.num_processes, "batch_size": cfg.train.batch_size,
                "grad_accumulation": cfg.train.grad_accumulation}
    changed = {k: (data[k], v) for k, v in expected.items() if data.get(k) != v}
    if changed:
        accelerator.print(f"warning: {path}: data layout changed {changed}; the sample order "
                          "after resuming differs from an uninterrupted run")
    mixture = data["mixture"]
    if mixture.get("seed") != cfg.train.seed:
        raise KeySegCheckpointError(f"{path}: saved with train.seed={mixture.get('seed')}, "
                                    f"the config says {cfg.train.seed}")

    weights = load_file(str(path / WEIGHTS))
    own = dict(trainable_parameters(accelerator.unwrap_model(state.model)))
    if set(weights) != set(own):
        diff = sorted(set(weights) ^ set(own))
        raise KeySegCheckpointError(
            f"{path / WEIGHTS}: trainable tensors do not match the model "
            f"(first difference: {diff[0]}, {len(diff)} in all); same model.trainable/lora?"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if own[name].shape != tensor.shape:
                raise KeySegCheckpointError(f"{path / WEIGHTS}: {name}: shape "
                                            f"{tuple(tensor.shape)} != {tuple(own[name].shape)}")
            own[name].copy_(tensor)
    if (path / "deepspeed").is_dir():
        accelerator.load_state(str(path / "deepspeed"))  # model + sharded optimizer
    else:
        state.optimizer.load_state_dict(_load_torch(path / "optimizer.pt"))
    state.scheduler.load_state_dict(_load_torch(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(_load_torch(path / "scaler.pt"))
    rngs = _load_torch(path / "rng.pt")
    set_rng_state(rngs[min(accelerator.process_index, len(rngs) - 1)])
    state.load_counters(meta["state"])
    return state
