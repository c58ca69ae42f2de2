"""What trains: the model (LoRA, trainable set, dtypes, gradient checkpointing), the
optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from keyseg.config import KeySegConfig, TrainConfig
from keyseg.runtime import resolve_dtype
from keyseg.train.checkpoint import trainable_parameters

if TYPE_CHECKING:
    from accelerate import Accelerator

    from keyseg.model.keyseg import KeySegModel
    from keyseg.model.trainable import ComponentCount


def build_model(cfg: KeySegConfig, accelerator: Accelerator,
                run_dir: Path | None = None) -> KeySegModel:
    """KeySegModel with LoRA, the trainable set applied (printed and logged), frozen weights
    in the compute dtype and gradient checkpointing as configured."""
    from keyseg.model.trainable import configure_trainable, format_trainable_table

    compute = resolve_dtype(cfg.train.precision, accelerator.device)
    model, notes = starting_model(cfg)
    if accelerator.is_main_process:
        for note in notes:
            print(f"init_from: {note}")
    counts = configure_trainable(model, cfg.model.trainable)  # raises on an empty component
    if accelerator.is_main_process:
        _print_trainable(counts)
        if run_dir is not None:
            (run_dir / "trainable.txt").write_text(format_trainable_table(counts) + "\n")
    if compute != torch.float32:
        # Frozen weights never need fp32 master copies: halves the memory of a 7B base.
        # Trainable ones are fp32 masters (mixed precision autocasts the compute).
        for param in model.parameters():
            param.data = param.data.to(torch.float32 if param.requires_grad else compute)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.train.image_embedding_cache_gb:
        from keyseg.model.embedding_cache import ImageEmbeddingCache

        model.image_embedding_cache = ImageEmbeddingCache(
            int(cfg.train.image_embedding_cache_gb * 2**30))
    return model


def starting_model(cfg: KeySegConfig) -> tuple[KeySegModel, list[str]]:
    """The model before its first step, LoRA wrapped, and the ``init_from`` notes.

    Built after ``set_seed(cfg.train.seed)``, the same call gives the same random frozen
    parts, which is how ``keyseg export`` rebuilds a run stopped before ``final/``."""
    from keyseg.build import build_keyseg
    from keyseg.model.architecture import reconcile
    from keyseg.model.keyseg import KeySegModel
    from keyseg.model.trainable import apply_lora

    notes: list[str] = []
    if cfg.train.init_from:
        # Loaded in the dtype the weights are stored in (a directory or a Hub id): one copy
        # per process, no fp32 detour for a bf16 checkpoint; what trains is upcast to fp32
        # by build_model (exactly), the frozen rest cast to the compute dtype.
        model = KeySegModel.from_pretrained(cfg.train.init_from, dtype="auto")
        # What and how to train from this run's config; architecture keys that differ from
        # the directory's take effect or stop the run (keyseg.model.architecture).
        notes = reconcile(model, cfg.model, cfg.train.init_from)
    else:
        model = build_keyseg(cfg.model)
    apply_lora(model, cfg.model.lora)
    return model, notes


def _print_trainable(counts: dict[str, ComponentCount]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="parameters per component")
    for column in ("component", "trainable", "frozen"):
        table.add_column(column, justify="left" if column == "component" else "right")
    total_t = total_f = 0
    for name, count in counts.items():
        if count.trainable or count.frozen:
            table.add_row(name, f"{count.trainable:,}", f"{count.frozen:,}")
            total_t, total_f = total_t + count.trainable, total_f + count.frozen
    table.add_row("total", f"{total_t:,}", f"{total_f:,}", style="bold")
    Console().print(table)


def enable_gradient_checkpointing(model: KeySegModel) -> bool:
    """Activation checkpointing on the HF VLM (if it supports it); returns whether enabled."""
    base = model.backbone.base
    if not getattr(base, "supports_gradient_checkpointing", False):
        return False
    # Non-reentrant: works with frozen inputs and with DDP's find_unused_parameters.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not model.backbone.input_embeddings().weight.requires_grad:
        base.enable_input_require_grads()
    return True


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only; with ``train.lr_scale``, one parameter
    group per multiplier (the unscaled group first), each group's ``lr_scale`` kept in it."""
    named = trainable_parameters(model)
    if not train.lr_scale:
        return torch.optim.AdamW([p for _, p in named], lr=train.lr, betas=train.betas,
                                 weight_decay=train.weight_decay)
    from keyseg.model.trainable import parameter_components

    scale_of = dict(train.lr_scale)
    owners = parameter_components(model)
    by_scale: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in named:
        by_scale.setdefault(float(scale_of.get(owners[name], 1.0)), []).append(param)
    order = sorted(by_scale, key=lambda scale: (scale != 1.0, scale))
    groups = [{"params": by_scale[s], "lr": train.lr * s, "lr_scale": s} for s in order]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas,
                             weight_decay=train.weight_decay)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then decay to 0 at
    ``total`` (``linear`` as the reference's WarmupDecayLR, ``cosine``) or ``constant``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer,
                    train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier :func:`lr_factor` over ``epochs x steps_per_epoch`` steps."""
    total = train.epochs * train.steps_per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, train.warmup_steps, total, train.lr_schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
