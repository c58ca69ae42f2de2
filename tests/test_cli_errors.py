"""One-line CLI errors: an unavailable device, and images over the pixel limit naming
``--max-pixels`` (segment / chat / batch / eval), with the option actually raising it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from keyseg import cli
from keyseg.errors import KeySegConfigError
from keyseg.pipeline import resolve_device

NO_CUDA = not torch.cuda.is_available()
_mps = getattr(torch.backends, "mps", None)
NO_MPS = _mps is None or not _mps.is_available()


def write_image(path: Path, height: int = 30, width: int = 50) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"keyseg {command}: error: ")
    return lines[0]


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_segment_device_cuda_without_cuda_prints_one_line_and_exits_2(tmp_path):
    picture = write_image(tmp_path / "a.png")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "keyseg.cli", "segment", str(picture), "q", "--device", "cuda",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "segment")
    assert "--device cuda" in line and "CUDA is not available" in line
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["chat", "batch", "demo", "eval"])
def test_every_command_refuses_an_unavailable_cuda_in_one_line(tmp_path, capsys, command,
                                                               monkeypatch):
    picture = write_image(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO("q\n"))
    argv = {
        "chat": ["chat", str(picture)],
        "batch": ["batch", str(tmp_path), "--query", "q", "--out", str(tmp_path / "b")],
        "demo": ["demo"],
        "eval": ["eval", "--dataset", "shapes:val", "--limit", "1", "--no-progress",
                 "--out", str(tmp_path / "e")],
    }[command]
    assert cli.main([*argv, "--device", "cuda:0"]) == 2
    line = one_error_line(capsys.readouterr().err, command)
    assert "--device cuda:0" in line and "CUDA is not available" in line


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_mps_and_bad_names_are_refused_with_the_name():
    with pytest.raises(KeySegConfigError, match="--device mps: MPS"):
        resolve_device("mps")
    with pytest.raises(KeySegConfigError, match="not a torch device name"):
        resolve_device("gpu0")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda", "mps")


def test_segment_over_the_pixel_limit_names_max_pixels(tmp_path, capsys):
    picture = write_image(tmp_path / "a.png")  # 50 x 30 = 1500 pixels
    assert cli.main(["segment", str(picture), "q", "--max-pixels", "1000",
                     "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err, "segment")
    assert "1500 pixels" in line and "limit of 1000" in line and "--max-pixels" in line


def test_max_pixels_raises_the_limit_for_segment_chat_and_batch(tmp_path, monkeypatch, capsys):
    from keyseg.pipeline import KeySegPipeline

    seen = []

    class Refuse(Exception):
        pass

    def fake(cls, path=None, device=None, dtype=None, *, load_in=None, **kwargs):
        seen.append(kwargs["max_pixels"])
        raise Refuse  # the image passed the limit: the model would load now

    monkeypatch.setattr(KeySegPipeline, "from_pretrained", classmethod(fake))
    picture = write_image(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    for argv in (["segment", str(picture), "q"], ["chat", str(picture)],
                 ["batch", str(tmp_path), "--query", "q", "--out", str(tmp_path / "b")]):
        with pytest.raises(Refuse):
            cli.main([*argv, "--max-pixels", "1500"])
    assert seen == [1500, 1500, 1500]


def test_chat_and_batch_over_the_limit_name_max_pixels(tmp_path, capsys, monkeypatch):
    picture = write_image(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO("q\n"))
    assert cli.main(["chat", str(picture), "--max-pixels", "1000"]) == 2
    assert "--max-pixels" in one_error_line(capsys.readouterr().err, "chat")

    from keyseg.build import build_tiny_model
    from keyseg.pipeline import KeySegPipeline

    tiny = build_tiny_model(seed=0).eval()
    monkeypatch.setattr(KeySegPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, load_in=None, **kw: cls(
                            tiny, **{k: v for k, v in kw.items()
                                     if k not in ("device", "dtype")})))
    out = tmp_path / "b"
    assert cli.main(["batch", str(tmp_path), "--query", "q", "--out", str(out),
                     "--max-pixels", "1000"]) == 1
    (failure,) = json.loads((out / "failures.json").read_text())
    assert "--max-pixels" in failure["error"] and "1500 pixels" in failure["error"]


def test_eval_skips_images_over_max_pixels_and_says_which_option(tmp_path, capsys):
    from keyseg.build import build_tiny_model
    from keyseg.data.shapes import ShapesConfig, ShapesDataset, export_reason_seg

    root = tmp_path / "dataset"
    export_reason_seg(ShapesDataset("val", ShapesConfig(image_size=64, val_size=2)),
                      root / "reason_seg" / "ReasonSeg" / "val")
    checkpoint = tmp_path / "tiny"
    build_tiny_model(seed=0).save_pretrained(checkpoint)
    out = tmp_path / "out"
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "reason_seg:val",
                     "--dataset-dir", str(root), "--out", str(out), "--no-progress",
                     "--max-pixels", "100"]) == 0
    entry = json.loads((out / "report.json").read_text())["results"]["reason_seg:val"]["teacher"]
    assert entry["skipped"] == 2 and entry["samples"] == 0
    assert "--max-pixels" in entry["skipped_messages"][0]
    assert "4096 pixels" in entry["skipped_messages"][0]
