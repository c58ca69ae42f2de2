"""train.log_every sets the cadence of the logged loss terms (metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from keyseg.config import load_config
from keyseg.train import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-test.yaml"


def test_loss_terms_are_logged_every_log_every_steps_and_at_the_end(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(TINY, [f"train.output_dir={tmp_path / 'run'}", "train.epochs=1",
                                 "train.steps_per_epoch=5", "train.save_every=5",
                                 "train.log_every=2", "train.validate_every_epoch=false"])
        result = main(cfg)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line)
            for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 5]
    assert len(result.history) == 5  # every step still trains and is returned
