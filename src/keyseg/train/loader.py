"""Micro-batches as a pure function of their position.

Micro-batch ``n`` (``n = step * grad_accumulation + micro``) of process ``rank`` draws mixture
indices ``(n * world + rank) * batch_size + j``, and its templates use ``random.Random``
seeded by that index. So the data position of a checkpoint is just its step, and resuming
replays nothing and skips nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from keyseg.batch import Batch
from keyseg.config import KeySegConfig
from keyseg.data.collate import Collator, record_to_example
from keyseg.data.mixture import MixtureSampler
from keyseg.data.sample import SegRecord
from keyseg.errors import KeySegDataError, KeySegInputError

if TYPE_CHECKING:
    from keyseg.processor import KeySegProcessor

MAX_BATCH_ATTEMPTS = 10  # redraws of a micro-batch whose every record is bad


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

    def __init__(self, mixture: MixtureSampler, processor: KeySegProcessor, cfg: KeySegConfig,
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

    def state_dict(self, step: int) -> dict[str, Any]:
        """The data position before ``step`` (a checkpoint's ``data``) and the layout it
        depends on."""
        train = self.cfg.train
        mixture = self.mixture.state_dict()
        mixture["step"] = self.draw_index(step * train.grad_accumulation, 0)
        return {"next_step": step, "world": self.world, "batch_size": train.batch_size,
                "grad_accumulation": train.grad_accumulation, "mixture": mixture}

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
