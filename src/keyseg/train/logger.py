"""What a run reports while it trains, and how it is asked to stop.

:class:`RunLogger`: a Rich progress bar, TensorBoard scalars and ``metrics.jsonl``, one line
every ``train.log_every`` steps (and at the last step). The loss terms of the steps in
between stay on the device and come to the host together, once per logging step.
:class:`StopSignal`: SIGTERM / Ctrl-C -> checkpoint and stop.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from keyseg.train.checkpoint import TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

TERMS = ("loss", "ce", "bce", "dice", "key")  # KeySegOutput's loss terms, in this order
SCALARS = (*TERMS, "lr", "grad_norm", "samples_per_s", "tokens_per_s")


def summarise(steps: list[dict[str, float]]) -> dict[str, float]:
    """One log line for a window of steps: the mean of each value over the steps where it is
    finite (NaN if none), ``lr`` at the last step, ``skipped``: how many steps were skipped."""
    line: dict[str, float] = {}
    for key in SCALARS:
        values = [s[key] for s in steps if math.isfinite(s[key])]
        line[key] = math.fsum(values) / len(values) if values else float("nan")
    line["lr"] = steps[-1]["lr"]
    line["skipped"] = float(sum(s["skipped"] for s in steps))
    return line


class RunLogger:
    """Rich progress bar (loss parts, throughput), TensorBoard scalars, ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, total: int, start: int = 0,
                 every: int = 1) -> None:
        self.run_dir, self.accelerator = run_dir, accelerator
        self.total, self.start, self.every = total, start, every
        self.main = accelerator.is_main_process
        self.writer = None
        self.progress = None
        self.window: list[tuple[torch.Tensor, dict[str, float]]] = []

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

    def log_step(self, state: TrainState, terms: torch.Tensor,
                 metrics: dict[str, float]) -> list[dict[str, float]]:
        """Record a finished step (``terms``: its :data:`TERMS` on the device). On a logging
        step, write one line for the window and return the window's steps, each with its
        loss terms; else return ``[]``."""
        self.window.append((terms, metrics))
        if self.main:
            self.progress.update(self.task, completed=state.step)
        if state.step % self.every and state.step < self.total:
            return []
        return self.flush(state)

    def flush(self, state: TrainState) -> list[dict[str, float]]:
        """Write the steps logged since the last line (if any) and return them."""
        if not self.window:
            return []
        # sync: the loss terms of the whole window come to the host at once, here only.
        values = torch.stack([terms for terms, _ in self.window]).tolist()
        steps = [{**dict(zip(TERMS, row, strict=True)), **metrics}
                 for row, (_, metrics) in zip(values, self.window, strict=True)]
        self.window = []
        if self.main:
            self._write(state, summarise(steps), len(steps))
        return steps

    def _write(self, state: TrainState, m: dict[str, float], steps: int) -> None:
        self.progress.update(self.task, description=(
            f"loss {m['loss']:.3f} (ce {m['ce']:.2f} bce {m['bce']:.3f} dice {m['dice']:.3f} "
            f"key {m['key']:.2f}) {m['samples_per_s']:.1f} samples/s "
            f"{m['tokens_per_s']:.0f} tok/s"))
        for key in SCALARS:
            if math.isfinite(m[key]):
                self.writer.add_scalar(f"train/{key}", m[key], state.step)
        self._jsonl({"step": state.step, "steps": steps, **m, "bad_samples": state.bad_samples,
                     "nonfinite_skipped": state.nonfinite_skipped})

    def log_validation(self, state: TrainState, scores: dict, improved: bool,
                       mode: str = "teacher") -> None:
        """One validation's scores: TensorBoard ``val/giou``, ``val/ciou``, a
        ``metrics.jsonl`` row (with ``val_mode``) and a console line (naming ``generate``
        mode, so the two kinds of number are not confused)."""
        if not self.main:
            return
        for key in ("giou", "ciou"):
            if key in scores:
                self.writer.add_scalar(f"val/{key}", scores[key], state.step)
        self._jsonl({"step": state.step, "epoch": state.epoch, "val": scores,
                     "val_mode": mode, "best": improved})
        label = "" if mode == "teacher" else f" ({mode})"
        self.progress.console.print(
            f"epoch {state.epoch} step {state.step}{label}: "
            f"gIoU {scores.get('giou', float('nan')):.4f} "
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

    def requested(self, accelerator: Accelerator) -> bool:
        """True when any process got a signal (all processes agree, so they stop together)."""
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([int(self.flag)], device=accelerator.device)
        # sync (several processes only): one all-reduce of the flag per step.
        return bool(accelerator.reduce(flag, "sum").item())
