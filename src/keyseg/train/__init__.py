"""Training (``keyseg train``): read :mod:`keyseg.train.loop` first.

=================  =======================================================================
``loop``           ``main(cfg)``: setup -> build -> fit (step, log, validate, checkpoint)
                   -> save; the sanity validation before step 1
``build``          the model (LoRA, trainable set, dtypes), AdamW, the learning-rate schedule
``loader``         ``MicroBatches``: micro-batches as a pure function of their position
``checkpoint``     ``TrainState`` (saved and restored whole), ``step-N`` checkpoints, best /
                   final exports, RNG states
``logger``         progress bar, TensorBoard, ``metrics.jsonl`` every ``train.log_every``
                   steps; SIGTERM / Ctrl-C
=================  =======================================================================
"""

from keyseg.train.build import (
    build_model,
    build_optimizer,
    build_scheduler,
    enable_gradient_checkpointing,
    lr_factor,
)
from keyseg.train.checkpoint import (
    CHECKPOINTS,
    STEP_PREFIX,
    WEIGHTS,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    save_final,
    set_rng_state,
    trainable_parameters,
)
from keyseg.train.loader import MAX_BATCH_ATTEMPTS, MicroBatch, MicroBatches
from keyseg.train.logger import RunLogger, StopSignal
from keyseg.train.loop import (
    Hooks,
    Run,
    TrainResult,
    environment_info,
    fit,
    main,
    print_data_totals,
    sanity_check,
    setup_accelerator,
    setup_run_dir,
    track_best,
    train_step,
    validate,
)

__all__ = [
    "CHECKPOINTS", "MAX_BATCH_ATTEMPTS", "STEP_PREFIX", "WEIGHTS", "Hooks", "MicroBatch",
    "MicroBatches", "Run", "RunLogger", "StopSignal", "TrainResult", "TrainState",
    "build_model", "build_optimizer", "build_scheduler", "enable_gradient_checkpointing",
    "environment_info", "fit", "list_checkpoints", "load_checkpoint", "lr_factor", "main",
    "print_data_totals", "resolve_checkpoint", "rng_state", "sanity_check", "save_checkpoint",
    "save_final", "set_rng_state", "setup_accelerator", "setup_run_dir", "track_best",
    "train_step", "trainable_parameters", "validate",
]
