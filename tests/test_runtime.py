"""keyseg.runtime: one resolution of device and dtype names."""

from __future__ import annotations

import pytest
import torch

from keyseg.errors import KeySegConfigError
from keyseg.runtime import resolve_dtype


@pytest.mark.parametrize(("name", "dtype"), [
    ("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
    ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16),
    (torch.float16, torch.float16),
])
def test_both_spellings_of_a_dtype_resolve_to_it(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) == dtype


def test_auto_and_none_mean_fp32_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == resolve_dtype("auto", cpu) == torch.float32


def test_unknown_dtype_is_one_config_error_listing_the_names():
    with pytest.raises(KeySegConfigError, match=r"unknown dtype 'int4'.*fp32.*bfloat16"):
        resolve_dtype("int4", torch.device("cpu"))


def test_process_group_that_does_not_see_itself_is_refused(monkeypatch):
    from keyseg.runtime import check_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KeySegConfigError, match="WORLD_SIZE=2 but Accelerate set up 1 "
                                                r"process\(es\).*accelerate launch --cpu"):
        check_process_group(1)
    check_process_group(2)
    monkeypatch.delenv("WORLD_SIZE")
    check_process_group(1)  # a plain single-process run


CLI = "import sys; from keyseg.cli import main; sys.exit(main(sys.argv[1:]))"


def test_training_launched_without_a_process_group_stops_before_writing(tmp_path):
    """Two CPU processes launched without --cpu each get a lone Accelerator: the run must stop
    (one line) instead of writing the same run directory twice."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # No LOCAL_RANK: Accelerate then starts no group at all (with one, and a rendezvous, it
    # starts a group but still reports one process: the same mismatch, needing two workers).
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root / "src")}
    for name in ("ACCELERATE_USE_CPU", "LOCAL_RANK", "RANK"):
        env.pop(name, None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CLI, "train", "--config",
                           str(root / "configs" / "tiny-test.yaml"), f"train.output_dir={out}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 but Accelerate set up 1 process(es)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
