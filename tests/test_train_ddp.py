"""Two-process CPU DDP (``accelerate launch``, gloo) agrees with one process on the same
global batch: 2 processes x 1 sample x 1 micro-step == 1 process x 1 sample x 2 micro-steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from keyseg.config import load_config
from keyseg.train import Hooks, list_checkpoints, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-test.yaml"
# No dropout (its masks differ between one and two processes); raw gradients (no clipping).
COMMON = ("train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=1",
          "train.grad_clip=0", "model.lora.dropout=0.0", "train.validate_every_epoch=false")

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from accelerate import PartialState
    from keyseg.config import load_config
    from keyseg.train import Hooks, main

    def dump(model, state):
        if PartialState().is_main_process:
            torch.save({n: p.grad.detach().clone() for n, p in model.named_parameters()
                        if p.grad is not None}, sys.argv[1])

    main(load_config(sys.argv[2], sys.argv[3:]), hooks=Hooks(before_optimizer_step=dump))
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters under torchrun: ~30 s on a loaded 2-core machine
def test_two_process_ddp_gradients_match_one_process(tmp_path):
    script = tmp_path / "grads.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    # CPU-only: --multi_gpu picks torchrun, ACCELERATE_USE_CPU makes Accelerate use gloo.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}  # no stray default accelerate config
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         str(script), str(tmp_path / "ddp.pt"), str(TINY), f"train.output_dir={out}", *COMMON],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    environment = json.loads((out / "environment.json").read_text())
    assert environment["num_processes"] == 2 and "MULTI_CPU" in environment["distributed_type"]
    last = list_checkpoints(out)[-1]
    assert len(torch.load(last / "rng.pt", weights_only=True)) == 2  # one RNG state per process

    grads: dict[str, torch.Tensor] = {}

    def keep(model, state):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.grad is not None})

    main(load_config(TINY, [f"train.output_dir={tmp_path / 'single'}", *COMMON,
                            "train.grad_accumulation=2"]),
         hooks=Hooks(before_optimizer_step=keep))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp.keys() == grads.keys() and len(grads) > 100
    for name, grad in grads.items():
        torch.testing.assert_close(ddp[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3  # not trivially zero
