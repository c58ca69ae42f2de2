"""experiments/tower_probe.py: a vision tower trained alone on the probe losses (issue #16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "tower_probe.py"


def test_a_few_steps_write_a_curve_of_kind_scores(tmp_path) -> None:
    out_file = tmp_path / "tower.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "4", "--eval-every", "2", "--eval-images", "6",
         "--images-per-step", "2", "--width", "32", "--patch-size", "32", "--kind-on-objects",
         "--out", str(out_file)], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out_file.read_text())
    assert [row["step"] for row in result["curve"]] == [2, 4]
    assert all(0.0 <= row[k] <= 1.0 for row in result["curve"]
               for k in ("kind_presence", "patch_kind"))
    assert result["tower"] == {"kind": "clip", "width": 32, "layers": 2, "heads": 2,
                               "patch_size": 32, "init": None}
    assert [h["step"] for h in result["history"]] == [2, 4]
    assert result["args"]["kind_on_objects"] is True


def test_a_patch_size_that_does_not_divide_the_image_is_refused(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--patch-size", "10", "--out",
                          str(tmp_path / "x.json")], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 2 and "--patch-size" in out.stderr


def test_the_conv_baseline_runs_through_the_same_probes(tmp_path) -> None:
    out_file = tmp_path / "conv.json"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--conv", "--steps", "2", "--eval-every", "2",
         "--eval-images", "4", "--images-per-step", "2", "--width", "8", "--patch-size", "32",
         "--out", str(out_file)], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out_file.read_text())
    assert result["tower"]["kind"] == "conv"
    assert result["tower"]["layers"] == 6  # five stride-2 convolutions to 6x6, then one more
    assert 0.0 <= result["curve"][0]["patch_kind"] <= 1.0


def test_the_conv_baseline_needs_a_power_of_two_patch(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--conv", "--patch-size", "12", "--out",
                          str(tmp_path / "x.json")], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 2 and "--conv" in out.stderr
