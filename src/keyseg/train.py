"""Training: ``main(cfg)`` reads top to bottom: setup -> build -> fit -> save.

One optimizer *step* is ``grad_accumulation`` micro-batches of ``batch_size`` conversations
per process; a run is ``epochs x steps_per_epoch`` steps (the reference counts the same way).

Data is a pure function of the position: micro-batch ``n`` (``n = step * grad_accumulation +
micro``) of process ``rank`` draws mixture indices ``(n * world + rank) * batch_size + j``,
and its templates use ``random.Random`` seeded by that index. So the data position of a
checkpoint is just its step, and resuming replays nothing and skips nothing.

Checkpoints (``run_dir/checkpoints/step-NNNNNNN/``, written atomically)::

    trainable.safetensors   every parameter with requires_grad, by model.named_parameters()
    optimizer.pt scheduler.pt [scaler.pt]   torch.save'd state dicts (weights_only loadable)
    rng.pt                  python / numpy / torch / cuda RNG states of every process
    state.json              step, epoch, best metric, counters, data position, mixture state

Multi-GPU / multi-node runs use ``accelerate launch`` (see docs/TRAINING.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from keyseg.batch import Batch
from keyseg.config import KeySegConfig, TrainConfig, save_config, to_dict
from keyseg.data.collate import Collator, record_to_example
from keyseg.data.datasets import build_mixture, build_val_records
from keyseg.data.mixture import MixtureSampler
from keyseg.data.sample import SegRecord
from keyseg.errors import (
    KeySegCheckpointError,
    KeySegConfigError,
    KeySegDataError,
    KeySegError,
    KeySegInputError,
)
from keyseg.evaluate import run_evaluation
from keyseg.io import atomic_directory, atomic_write_json

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
WEIGHTS = "trainable.safetensors"
MAX_BATCH_ATTEMPTS = 10  # redraws of a micro-batch whose every record is bad


# =========================================================================================
# State, result, hooks


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must restore (besides tensors)."""

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


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    last_checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    stopped: str = "finished"  # "finished" | "early_stopping" | "interrupted"


@dataclass
class Hooks:
    """Optional callbacks (tests, experiments); they see the unwrapped model."""

    before_optimizer_step: Callable[[torch.nn.Module, TrainState], None] | None = None
    after_checkpoint: Callable[[Path, TrainState], None] | None = None


# =========================================================================================
# main: setup -> build -> fit -> save


def main(cfg: KeySegConfig, resume: str | None = None, hooks: Hooks | None = None) -> TrainResult:
    """Train ``cfg`` (``resume``: ``"latest"`` or a checkpoint directory)."""
    hooks = hooks or Hooks()
    accelerator = setup_accelerator(cfg.train)
    run_dir = setup_run_dir(cfg, accelerator, resume)

    model = build_model(cfg, accelerator, run_dir)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    mixture = build_mixture(cfg.data, seed=cfg.train.seed)
    val_records = build_val_records(cfg.data) if cfg.train.validate_every_epoch else None
    print_data_totals(accelerator, mixture, val_records)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainState()
    if resume is not None:
        checkpoint = resolve_checkpoint(run_dir, resume)
        state = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler, cfg)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    # Per-process stream for dropout etc. (restored exactly on resume by load_checkpoint).
    elif accelerator.num_processes > 1:
        torch.manual_seed(cfg.train.seed + accelerator.process_index)

    batches = MicroBatches(mixture, accelerator.unwrap_model(model).processor, cfg,
                           rank=accelerator.process_index, world=accelerator.num_processes)
    result = fit(accelerator, model, optimizer, scheduler, batches, val_records, cfg, state,
                 run_dir, hooks)
    if result.stopped != "interrupted":
        save_final(accelerator, model, run_dir, cfg)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def print_data_totals(accelerator, mixture, val_records) -> None:
    """What the readers accepted, one line per split (the lines ``keyseg eval`` and
    ``keyseg data check`` print for the same folder)."""
    from keyseg.data.check import totals_lines

    for line in totals_lines(mixture):
        accelerator.print(f"data: {line}")
    if val_records is not None:
        for line in totals_lines(val_records):
            accelerator.print(f"data: {line}")


# =========================================================================================
# setup


def setup_accelerator(train: TrainConfig):
    """Accelerator with the configured precision and gradient accumulation; seeds all RNGs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[train.precision]
    # Some trainable parts can sit out a step (no [KEY] -> no table projection gradient).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=mixed, kwargs_handlers=[ddp],
                              gradient_accumulation_steps=train.grad_accumulation)
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = train.batch_size
        ds["gradient_accumulation_steps"] = train.grad_accumulation
    set_seed(train.seed)
    return accelerator


def setup_run_dir(cfg: KeySegConfig, accelerator, resume: str | None) -> Path:
    """Create the run directory with the resolved config and the environment."""
    run_dir = Path(cfg.train.output_dir)
    if resume is None and list_checkpoints(run_dir):
        raise KeySegConfigError(
            f"{run_dir}: already holds checkpoints; pass --resume latest to continue it or "
            "choose another train.output_dir"
        )
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "environment.json", environment_info(accelerator))
    accelerator.wait_for_everyone()
    return run_dir


def environment_info(accelerator) -> dict[str, Any]:
    """Versions and devices, so a run can be reproduced."""
    import accelerate
    import peft
    import transformers

    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__,
        "numpy": np.__version__, "device": str(device), "device_name": name or device.type,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
        "cuda": torch.version.cuda, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# =========================================================================================
# build


def build_model(cfg: KeySegConfig, accelerator, run_dir: Path | None = None):
    """KeySegModel with LoRA, the trainable set applied (printed and logged), frozen weights
    in the compute dtype and gradient checkpointing as configured."""
    from keyseg.model.architecture import reconcile
    from keyseg.model.keyseg import KeySegModel
    from keyseg.model.trainable import apply_lora, configure_trainable, format_trainable_table

    compute = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    if cfg.train.init_from:
        # Loaded in the dtype the weights are stored in (a directory or a Hub id): one copy
        # per process, no fp32 detour for a bf16 checkpoint; what trains is upcast to fp32
        # below (exactly), the frozen rest cast to the compute dtype.
        model = KeySegModel.from_pretrained(cfg.train.init_from, dtype="auto")
        # What and how to train from this run's config; architecture keys that differ from
        # the directory's take effect or stop the run (keyseg.model.architecture).
        notes = reconcile(model, cfg.model, cfg.train.init_from)
        if accelerator.is_main_process:
            for note in notes:
                print(f"init_from: {note}")
    else:
        model = KeySegModel.from_config(cfg.model)
    apply_lora(model, cfg.model.lora)
    counts = configure_trainable(model, cfg.model.trainable)  # raises on an empty component
    if accelerator.is_main_process:
        _print_trainable(counts)
        if run_dir is not None:
            (run_dir / "trainable.txt").write_text(format_trainable_table(counts) + "\n")
    if compute is not None:
        # Frozen weights never need fp32 master copies: halves the memory of a 7B base.
        # Trainable ones are fp32 masters (mixed precision autocasts the compute).
        for param in model.parameters():
            param.data = param.data.to(torch.float32 if param.requires_grad else compute)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _print_trainable(counts) -> None:
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


def enable_gradient_checkpointing(model) -> bool:
    """Activation checkpointing on the HF VLM (if it supports it); returns whether enabled."""
    base = model.backbone.base
    if not getattr(base, "supports_gradient_checkpointing", False):
        return False
    # Non-reentrant: works with frozen inputs and with DDP's find_unused_parameters.
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not model.backbone.input_embeddings().weight.requires_grad:
        base.enable_input_require_grads()
    return True


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only."""
    params = [p for _, p in trainable_parameters(model)]
    return torch.optim.AdamW(params, lr=train.lr, betas=train.betas,
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


def build_scheduler(optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    total = train.epochs * train.steps_per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, train.warmup_steps, total, train.lr_schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# =========================================================================================
# data: micro-batches as a pure function of their position


@dataclass
class MicroBatch:
    index: int  # global micro-batch number: step * grad_accumulation + micro
    batch: Batch
    bad_samples: int  # records skipped (reader / collate errors) to build this batch


def _identity(item):
    return item


class MicroBatches(IterableDataset):
    """The micro-batches of one process from a given step on.

    Each item depends only on its index, so DataLoader workers split the indices round-robin
    (worker ``w`` builds indices ``w, w + W, ...``; the DataLoader returns them in order).
    """

    def __init__(self, mixture: MixtureSampler, processor, cfg: KeySegConfig,
                 rank: int = 0, world: int = 1) -> None:
        super().__init__()
        self.mixture = mixture
        self.collator = Collator(processor, mode="train")
        self.cfg = cfg
        self.rank, self.world = rank, world
        self.start = 0
        self.stop = 0

    def draw_index(self, index: int, row: int) -> int:
        """Mixture index of ``row`` of micro-batch ``index`` on this process."""
        return (index * self.world + self.rank) * self.cfg.train.batch_size + row

    def build(self, index: int) -> MicroBatch:
        """Micro-batch ``index``; bad records are dropped and counted, a batch whose every
        record is bad is redrawn (deterministically) up to :data:`MAX_BATCH_ATTEMPTS` times."""
        bad = 0
        for attempt in range(MAX_BATCH_ATTEMPTS):
            draws = [self.draw_index(index, row) for row in range(self.cfg.train.batch_size)]
            if attempt:  # replacement draws far beyond any real position
                draws = [2**40 + d * MAX_BATCH_ATTEMPTS + attempt for d in draws]
            examples = []
            for draw in draws:
                before = sum(self.mixture.skipped.values())
                try:
                    record = self.mixture[draw]
                    examples.append(self.example(record, draw))
                except (KeySegDataError, KeySegInputError):
                    bad += 1
                bad += sum(self.mixture.skipped.values()) - before
            batch, dropped = self.collate(examples)
            bad += dropped
            if batch is not None:
                return MicroBatch(index, batch, bad)
        raise KeySegDataError(
            f"micro-batch {index}: {MAX_BATCH_ATTEMPTS} draws in a row gave no usable sample "
            "(check the dataset with `keyseg data check`)"
        )

    def example(self, record: SegRecord, draw: int):
        data = self.cfg.data
        rng = random.Random(self.cfg.train.seed * 1_000_003 + draw)
        return record_to_example(
            record, rng, use_keyword=self.cfg.model.use_keyword, explanatory=data.explanatory,
            max_referents=data.max_referents_per_image, max_pixels=data.max_image_pixels,
        )

    def collate(self, examples: list) -> tuple[Batch | None, int]:
        """Collate; on an error find the bad examples one by one and collate the rest."""
        if not examples:
            return None, 0
        try:
            return self.collator(examples), 0
        except (KeySegDataError, KeySegInputError):
            good = []
            for example in examples:
                try:
                    self.collator([example])
                    good.append(example)
                except (KeySegDataError, KeySegInputError):
                    pass
            dropped = len(examples) - len(good)
            return (self.collator(good) if good else None), dropped

    def __iter__(self) -> Iterator[MicroBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in range(self.start + worker, self.stop, workers):
            yield self.build(index)

    def loader(self, start_step: int, stop_step: int) -> Iterator[MicroBatch]:
        """Micro-batches of steps ``[start_step, stop_step)``, in order."""
        ga = self.cfg.train.grad_accumulation
        self.start, self.stop = start_step * ga, stop_step * ga
        workers = self.cfg.data.num_workers
        # Own generator: the loader draws a base seed, which must not move the global RNG
        # (dropout) - otherwise a resumed run diverges from an uninterrupted one.
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return iter(DataLoader(self, batch_size=None, num_workers=workers, collate_fn=_identity,
                               generator=generator))


# =========================================================================================
# fit: one loop


def fit(accelerator, model, optimizer, scheduler, batches: MicroBatches,
        val_records: Sequence[SegRecord] | None, cfg: KeySegConfig, state: TrainState,
        run_dir: Path, hooks: Hooks) -> TrainResult:
    train = cfg.train
    total = train.epochs * train.steps_per_epoch
    result = TrainResult(run_dir=run_dir, state=state, last_checkpoint=None)
    logger = RunLogger(run_dir, accelerator, total, start=state.step, every=train.log_every)
    micro_batches = batches.loader(state.step, total)
    model.train()
    with logger, StopSignal() as stop:
        while state.step < total:
            metrics = train_step(accelerator, model, optimizer, scheduler, micro_batches,
                                 train, state, hooks)
            state.step += 1
            result.history.append(metrics)
            logger.log_step(state, metrics)

            if state.step % train.steps_per_epoch == 0:
                state.epoch += 1
                if val_records is not None:
                    scores = validate(accelerator, model, val_records, cfg)
                    improved = track_best(accelerator, model, state, scores, run_dir)
                    logger.log_validation(state, scores, improved)
                    if _early_stop(state, train):
                        result.stopped = "early_stopping"
            stopping = result.stopped != "finished" or stop.requested(accelerator)
            if state.step % train.save_every == 0 or state.step == total or stopping:
                result.last_checkpoint = save_checkpoint(accelerator, model, optimizer,
                                                         scheduler, state, batches, run_dir,
                                                         train.keep_last)
                if hooks.after_checkpoint is not None:
                    hooks.after_checkpoint(result.last_checkpoint, state)
            if stopping:
                if result.stopped == "finished":
                    result.stopped = "interrupted"
                accelerator.print(f"stopping at step {state.step} ({result.stopped})")
                break
    return result


def train_step(accelerator, model, optimizer, scheduler, micro_batches: Iterator[MicroBatch],
               train: TrainConfig, state: TrainState, hooks: Hooks) -> dict[str, float]:
    """One optimizer step over ``grad_accumulation`` micro-batches.

    A non-finite loss (on any process) or gradient skips the update: gradients are zeroed,
    the optimizer does not step, the data and the schedule move on.
    """
    start = time.perf_counter()
    parts = dict.fromkeys(("loss", "ce", "bce", "dice", "key"), 0.0)
    rows = tokens = bad = nonfinite = 0
    for _ in range(train.grad_accumulation):
        micro = next(micro_batches)
        batch = micro.batch.to(accelerator.device)
        bad += micro.bad_samples
        rows += len(batch)
        tokens += int(batch.attention_mask.sum())
        with accelerator.accumulate(model):
            out = model(batch)
            if not torch.isfinite(out.loss.detach()):
                nonfinite += 1
            # Backward even when non-finite: every DDP process must join the all-reduce.
            accelerator.backward(out.loss)
        for key, value in out.loss_parts().items():
            parts[key] += value / train.grad_accumulation

    params = [p for _, p in trainable_parameters(accelerator.unwrap_model(model))]
    if train.grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(params, train.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
    # DeepSpeed clips inside its engine and returns no norm here.
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    engine_clips = _is_deepspeed(accelerator)
    counts = torch.tensor([nonfinite, rows, tokens, bad], device=accelerator.device)
    counts = accelerator.reduce(counts, "sum") if accelerator.num_processes > 1 else counts
    nonfinite, rows, tokens, bad = (int(v) for v in counts.tolist())
    # fp16: an inf gradient is the GradScaler's business (it skips and lowers the scale).
    finite_grad = math.isfinite(grad_norm) or train.precision == "fp16" or engine_clips
    if nonfinite or not finite_grad:
        optimizer.zero_grad(set_to_none=True)
        state.nonfinite_skipped += 1
        state.consecutive_nonfinite += 1
        if state.consecutive_nonfinite >= train.max_consecutive_nonfinite:
            raise KeySegError(
                f"step {state.step + 1}: {state.consecutive_nonfinite} consecutive steps with "
                f"a non-finite loss or gradient (train.max_consecutive_nonfinite="
                f"{train.max_consecutive_nonfinite}); lower train.lr, use bf16 instead of fp16 "
                "or check the data"
            )
    else:
        state.consecutive_nonfinite = 0
        if hooks.before_optimizer_step is not None:
            hooks.before_optimizer_step(accelerator.unwrap_model(model), state)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    state.bad_samples += bad
    state.samples_seen += rows
    state.tokens_seen += tokens
    seconds = time.perf_counter() - start
    return {**parts, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "skipped": float(bool(nonfinite or not finite_grad)),
            "samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds}


# =========================================================================================
# validation


def validate(accelerator, model, records: Sequence[SegRecord], cfg: KeySegConfig) -> dict:
    """Teacher-forced gIoU / cIoU on ``records`` (:func:`keyseg.evaluate.run_evaluation`)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    try:
        with accelerator.autocast():
            report = run_evaluation(unwrapped, records, mode="teacher",
                                    limit=cfg.train.val_limit, accelerator=accelerator)
    finally:
        model.train()
    return dict(report.metrics)


def track_best(accelerator, model, state: TrainState, scores: dict, run_dir: Path) -> bool:
    """Remember the best gIoU; its trainable weights go to ``run_dir/best``."""
    giou = float(scores.get("giou", float("nan")))
    improved = math.isfinite(giou) and (state.best_giou is None or giou > state.best_giou)
    if improved:
        state.best_giou, state.best_step = giou, state.step
        state.epochs_without_improvement = 0
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            weights = _trainable_state(accelerator.unwrap_model(model))
            with atomic_directory(run_dir / "best") as tmp:
                save_file(weights, str(tmp / WEIGHTS))
                atomic_write_json(tmp / "metrics.json", {"step": state.step, **scores})
    else:
        state.epochs_without_improvement += 1
    accelerator.wait_for_everyone()
    return improved


def _early_stop(state: TrainState, train: TrainConfig) -> bool:
    patience = train.early_stopping_patience
    return patience is not None and state.epochs_without_improvement >= patience


# =========================================================================================
# checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def resolve_checkpoint(run_dir: Path, resume: str) -> Path:
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise KeySegCheckpointError(f"{run_dir / CHECKPOINTS}: no checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise KeySegCheckpointError(f"{path}: not a training checkpoint (no state.json)")
    return path


def _trainable_state(model) -> dict[str, torch.Tensor]:
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


def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainState,
                    batches: MicroBatches, run_dir: Path, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically, then keep the last ``keep_last``."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    path = Path(run_dir) / CHECKPOINTS / f"{STEP_PREFIX}{state.step:07d}"
    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    sharded = path.parent / f".deepspeed-{path.name}"
    if _is_deepspeed(accelerator):
        # ZeRO partitions the optimizer over processes: every process writes its shard.
        accelerator.save_state(str(sharded))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = _trainable_state(accelerator.unwrap_model(model))
        mixture = batches.mixture.state_dict()
        mixture["step"] = batches.draw_index(state.step * batches.cfg.train.grad_accumulation, 0)
        meta = {
            "state": dataclasses.asdict(state),
            "data": {"next_step": state.step, "world": batches.world,
                     "batch_size": batches.cfg.train.batch_size,
                     "grad_accumulation": batches.cfg.train.grad_accumulation,
                     "mixture": mixture},
            "config": to_dict(batches.cfg),
        }
        with atomic_directory(path) as tmp:
            save_file(weights, str(tmp / WEIGHTS))
            if _is_deepspeed(accelerator):
                shutil.move(str(sharded), tmp / "deepspeed")
            else:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            torch.save(rngs, tmp / "rng.pt")
            atomic_write_json(tmp / "state.json", meta)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _is_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise KeySegCheckpointError(f"{path}: cannot read: {error}") from error


def load_checkpoint(path: Path, accelerator, model, optimizer, scheduler,
                    cfg: KeySegConfig) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler, RNG and progress from ``path``."""
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

    unwrapped = accelerator.unwrap_model(model)
    weights = load_file(str(path / WEIGHTS))
    own = dict(trainable_parameters(unwrapped))
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
        optimizer.load_state_dict(_load_torch(path / "optimizer.pt"))
    scheduler.load_state_dict(_load_torch(path / "scheduler.pt"))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(_load_torch(path / "scaler.pt"))
    rngs = _load_torch(path / "rng.pt")
    set_rng_state(rngs[min(accelerator.process_index, len(rngs) - 1)])
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in meta["state"].items() if k in fields})


def save_final(accelerator, model, run_dir: Path, cfg: KeySegConfig | None = None) -> Path:
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


# =========================================================================================
# logging and signals


class RunLogger:
    """Rich progress bar (loss parts, throughput), TensorBoard scalars, ``metrics.jsonl``;
    the loss terms every ``every`` steps (``train.log_every``) and at the last step."""

    def __init__(self, run_dir: Path, accelerator, total: int, start: int = 0,
                 every: int = 1) -> None:
        self.run_dir, self.accelerator = run_dir, accelerator
        self.total, self.start, self.every = total, start, every
        self.main = accelerator.is_main_process
        self.writer = None
        self.progress = None

    def __enter__(self) -> RunLogger:
        if self.main:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.description}"))
            self.progress.start()
            self.task = self.progress.add_task("", total=self.total, completed=self.start)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()

    def log_step(self, state: TrainState, m: dict[str, float]) -> None:
        if not self.main:
            return
        if state.step % self.every and state.step != self.total:
            self.progress.update(self.task, completed=state.step)
            return
        self.progress.update(self.task, completed=state.step, description=(
            f"loss {m['loss']:.3f} (ce {m['ce']:.2f} bce {m['bce']:.3f} dice {m['dice']:.3f} "
            f"key {m['key']:.2f}) {m['samples_per_s']:.1f} samples/s "
            f"{m['tokens_per_s']:.0f} tok/s"))
        for key in ("loss", "ce", "bce", "dice", "key", "lr", "grad_norm", "samples_per_s",
                    "tokens_per_s"):
            if math.isfinite(m[key]):
                self.writer.add_scalar(f"train/{key}", m[key], state.step)
        self._jsonl({"step": state.step, **m, "bad_samples": state.bad_samples,
                     "nonfinite_skipped": state.nonfinite_skipped})

    def log_validation(self, state: TrainState, scores: dict, improved: bool) -> None:
        if not self.main:
            return
        for key in ("giou", "ciou"):
            if key in scores:
                self.writer.add_scalar(f"val/{key}", scores[key], state.step)
        self._jsonl({"step": state.step, "epoch": state.epoch, "val": scores,
                     "best": improved})
        self.progress.console.print(
            f"epoch {state.epoch} step {state.step}: gIoU {scores.get('giou', float('nan')):.4f} "
            f"cIoU {scores.get('ciou', float('nan')):.4f} (n={scores.get('n')})"
            + (" best" if improved else ""))

    def _jsonl(self, row: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


class StopSignal:
    """SIGTERM / first Ctrl-C ask the loop to checkpoint and stop; a second Ctrl-C aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.flag = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> StopSignal:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self, accelerator) -> bool:
        """True when any process got a signal (all processes agree, so they stop together)."""
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([int(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())
