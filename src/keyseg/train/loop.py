"""Training: ``main(cfg)`` reads top to bottom: setup -> main -> fit -> validate.

One optimizer *step* is ``grad_accumulation`` micro-batches of ``batch_size`` conversations
per process; a run is ``epochs x steps_per_epoch`` steps (the reference counts the same way).
The data of a step: :mod:`keyseg.train.loader`; what trains: :mod:`keyseg.train.build`; the
train state and its checkpoints: :mod:`keyseg.train.checkpoint`; progress bar, TensorBoard
and ``metrics.jsonl``: :mod:`keyseg.train.logger`.

Host-device syncs are marked ``# sync``: one per step (whether to apply the update) and one
per logging step (the loss terms of the steps since the last one).

Multi-GPU / multi-node runs use ``accelerate launch`` (see docs/TRAINING.md).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from keyseg.config import EvalConfig, EvalMode, KeySegConfig, TrainConfig, save_config
from keyseg.data.datasets import build_mixture, build_val_records
from keyseg.data.mixture import MixtureSampler
from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegConfigError, KeySegError
from keyseg.evaluate import run_evaluation
from keyseg.io import atomic_write_json
from keyseg.train.build import build_model, build_optimizer, build_scheduler
from keyseg.train.checkpoint import (
    TrainState,
    is_deepspeed,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_best,
    save_checkpoint,
    save_final,
    set_rng_state,
    trainable_parameters,
)
from keyseg.train.loader import MicroBatch, MicroBatches
from keyseg.train.logger import TERMS, RunLogger, StopSignal

if TYPE_CHECKING:
    from accelerate import Accelerator

    from keyseg.model.keyseg import KeySegOutput

SANITY_BATCHES = 2  # validation batches per process before step 1


@dataclass
class Hooks:
    """Optional callbacks (tests, experiments); they see the unwrapped model."""

    before_optimizer_step: Callable[[torch.nn.Module, TrainState], None] | None = None
    after_checkpoint: Callable[[Path, TrainState], None] | None = None


@dataclass(frozen=True)
class Run:
    """What stays fixed while :func:`fit` runs."""

    cfg: KeySegConfig
    accelerator: Accelerator
    run_dir: Path
    hooks: Hooks = field(default_factory=Hooks)


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    last_checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step
    stopped: str = "finished"  # "finished" | "early_stopping" | "interrupted"


# =========================================================================================
# setup


def setup_accelerator(train: TrainConfig) -> Accelerator:
    """Accelerator with the configured precision and gradient accumulation; seeds all RNGs."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from keyseg.runtime import check_process_group

    mixed = "no" if train.precision == "fp32" else train.precision
    # Some trainable parts can sit out a step (no [KEY] -> no table projection gradient).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=mixed, kwargs_handlers=[ddp],
                              gradient_accumulation_steps=train.grad_accumulation)
    check_process_group(accelerator.num_processes)  # N lone "main" processes: one run dir
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = train.batch_size
        ds["gradient_accumulation_steps"] = train.grad_accumulation
    set_seed(train.seed)
    return accelerator


def setup_run_dir(cfg: KeySegConfig, accelerator: Accelerator, resume: str | None) -> Path:
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


def environment_info(accelerator: Accelerator) -> dict[str, Any]:
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


def print_data_totals(accelerator: Accelerator, mixture: MixtureSampler,
                      val_records: Sequence[SegRecord] | None) -> None:
    """What the readers accepted, one line per split (the lines ``keyseg eval`` and
    ``keyseg data check`` print for the same folder)."""
    from keyseg.data.check import totals_lines

    for line in totals_lines(mixture):
        accelerator.print(f"data: {line}")
    if val_records is not None:
        for line in totals_lines(val_records):
            accelerator.print(f"data: {line}")


# =========================================================================================
# main: setup -> build -> fit -> save


def main(cfg: KeySegConfig, resume: str | None = None, hooks: Hooks | None = None) -> TrainResult:
    """Train ``cfg`` (``resume``: ``"latest"`` or a checkpoint directory)."""
    accelerator = setup_accelerator(cfg.train)
    run = Run(cfg, accelerator, setup_run_dir(cfg, accelerator, resume), hooks or Hooks())

    model = build_model(cfg, accelerator, run.run_dir)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    mixture = build_mixture(cfg.data, seed=cfg.train.seed)
    val_records = build_val_records(cfg.data) if cfg.train.validate_every_epoch else None
    print_data_totals(accelerator, mixture, val_records)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainState(model, optimizer, scheduler)
    if resume is not None:
        checkpoint = resolve_checkpoint(run.run_dir, resume)
        load_checkpoint(checkpoint, accelerator, state, cfg)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    # Per-process stream for dropout etc. (restored exactly on resume by load_checkpoint).
    elif accelerator.num_processes > 1:
        torch.manual_seed(cfg.train.seed + accelerator.process_index)

    batches = MicroBatches(mixture, accelerator.unwrap_model(model).processor, cfg,
                           rank=accelerator.process_index, world=accelerator.num_processes)
    result = fit(run, state, batches, val_records)
    cache = getattr(accelerator.unwrap_model(model), "image_embedding_cache", None)
    if cache is not None:
        accelerator.print(cache.summary())
    if result.stopped != "interrupted":
        save_final(accelerator, model, run.run_dir, cfg)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# =========================================================================================
# fit: one loop


def fit(run: Run, state: TrainState, batches: MicroBatches,
        val_records: Sequence[SegRecord] | None) -> TrainResult:
    """Steps from ``state.step`` to the end: log, validate each epoch, checkpoint."""
    accelerator, train = run.accelerator, run.cfg.train
    total = train.epochs * train.steps_per_epoch
    result = TrainResult(run_dir=run.run_dir, state=state, last_checkpoint=None)
    if val_records is not None:
        sanity_check(accelerator, state.model, val_records, mode=train.val_mode)
    logger = RunLogger(run.run_dir, accelerator, total, start=state.step, every=train.log_every)
    micro_batches = batches.loader(state.step, total)
    state.model.train()
    with logger, StopSignal() as stop:
        while state.step < total:
            terms, metrics = train_step(accelerator, state, micro_batches, train, run.hooks)
            state.step += 1
            result.history += logger.log_step(state, terms, metrics)

            if state.step % train.steps_per_epoch == 0:
                state.epoch += 1
                if val_records is not None:
                    scores = validate(accelerator, state.model, val_records, train.val_limit,
                                      mode=train.val_mode)
                    improved = track_best(accelerator, state, scores, run.run_dir)
                    logger.log_validation(state, scores, improved, mode=train.val_mode)
                    if _early_stop(state, train):
                        result.stopped = "early_stopping"
            stopping = result.stopped != "finished" or stop.requested(accelerator)
            if state.step % train.save_every == 0 or state.step == total or stopping:
                result.last_checkpoint = save_checkpoint(accelerator, state, batches,
                                                         run.run_dir, train.keep_last)
                if run.hooks.after_checkpoint is not None:
                    run.hooks.after_checkpoint(result.last_checkpoint, state)
            if stopping:
                result.history += logger.flush(state)
                if result.stopped == "finished":
                    result.stopped = "interrupted"
                accelerator.print(f"stopping at step {state.step} ({result.stopped})")
                break
    return result


def train_step(accelerator: Accelerator, state: TrainState,
               micro_batches: Iterator[MicroBatch], train: TrainConfig,
               hooks: Hooks) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimizer step over ``grad_accumulation`` micro-batches -> the step's loss terms
    (``(len(TERMS),)``, on the device, not synced) and its host-side metrics.

    A non-finite loss (on any process) or gradient skips the update: gradients are zeroed,
    the optimizer does not step, the data and the schedule move on.
    """
    model, optimizer, scheduler = state.model, state.optimizer, state.scheduler
    start = time.perf_counter()
    device = accelerator.device
    terms = torch.zeros(len(TERMS), device=device)
    nonfinite = torch.zeros((), dtype=torch.long, device=device)
    rows = tokens = bad = 0
    for _ in range(train.grad_accumulation):
        micro = next(micro_batches)
        bad += micro.bad_samples
        rows += len(micro.batch)
        tokens += int(micro.batch.attention_mask.sum())  # still on the host: no sync
        batch = micro.batch.to(device)
        with accelerator.accumulate(model):
            out = model(batch)
            nonfinite += (~torch.isfinite(out.loss.detach())).long()
            # Backward even when non-finite: every DDP process must join the all-reduce.
            accelerator.backward(out.loss)
        terms += loss_terms(out) / train.grad_accumulation

    params = [p for _, p in trainable_parameters(accelerator.unwrap_model(model))]
    if train.grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(params, train.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
    counts = torch.cat([nonfinite.reshape(1), torch.tensor([rows, tokens, bad], device=device)])
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    # sync: whether to apply the update is decided on the host, from the finiteness of every
    # process's loss and of the gradient (the one sync of a step; grad_norm comes with it).
    nonfinite, rows, tokens, bad = (int(v) for v in counts.tolist())
    # DeepSpeed clips inside its engine and returns no norm here.
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    engine_clips = is_deepspeed(accelerator)
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
    # train.lr's current value (a first group under train.lr_scale is scaled)
    lr = scheduler.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0)
    return terms, {"lr": lr, "grad_norm": grad_norm,
                   "skipped": float(bool(nonfinite or not finite_grad)),
                   "samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds}


def loss_terms(out: KeySegOutput) -> torch.Tensor:
    """The output's :data:`~keyseg.train.logger.TERMS` as one ``(len(TERMS),)`` tensor on
    its device (detached; no sync)."""
    return torch.stack([getattr(out, name).detach().float() for name in TERMS])


# =========================================================================================
# validation


def validate(accelerator: Accelerator, model: torch.nn.Module, records: Sequence[SegRecord],
             limit: int | None, progress: bool = True,
             mode: EvalMode = "teacher") -> dict[str, float]:
    """gIoU / cIoU on the first ``limit`` of ``records`` in ``mode`` (teacher-forced or
    generated answers; :func:`keyseg.evaluate.run_evaluation`)."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    try:
        with accelerator.autocast():
            report = run_evaluation(unwrapped, records,
                                    EvalConfig(mode=mode, limit=limit, progress=progress),
                                    accelerator=accelerator)
    finally:
        model.train()
    return dict(report.metrics)


def sanity_check(accelerator: Accelerator, model: torch.nn.Module,
                 records: Sequence[SegRecord], mode: EvalMode = "teacher") -> dict[str, float]:
    """:data:`SANITY_BATCHES` validation batches per process before step 1, in the
    validation's own ``mode``, so a broken validation set or evaluation path fails in
    seconds rather than after an epoch. The RNG states are put back afterwards: the run
    trains exactly as it would without it."""
    saved = rng_state()
    try:
        scores = validate(accelerator, model, records,
                          limit=SANITY_BATCHES * accelerator.num_processes, progress=False,
                          mode=mode)
    finally:
        set_rng_state(saved)
    accelerator.print(f"sanity check: gIoU {scores.get('giou', float('nan')):.4f} "
                      f"cIoU {scores.get('ciou', float('nan')):.4f} (n={scores.get('n')})")
    return scores


def track_best(accelerator: Accelerator, state: TrainState, scores: dict,
               run_dir: Path) -> bool:
    """Remember the best gIoU; its trainable weights go to ``run_dir/best``."""
    giou = float(scores.get("giou", float("nan")))
    improved = math.isfinite(giou) and (state.best_giou is None or giou > state.best_giou)
    if improved:
        state.best_giou, state.best_step = giou, state.step
        state.epochs_without_improvement = 0
        save_best(accelerator, state, scores, run_dir)
    else:
        state.epochs_without_improvement += 1
    accelerator.wait_for_everyone()
    return improved


def _early_stop(state: TrainState, train: TrainConfig) -> bool:
    patience = train.early_stopping_patience
    return patience is not None and state.epochs_without_improvement >= patience
