"""experiments/seed_spread.py: the seed-to-seed spread of hand-written lab report records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import experiment_module

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "seed_spread.py"


def _record(giou, direct, negative, answered, export=None):
    native = {"giou": giou, "by_difficulty": {"direct": {"giou": direct, "n": 4},
                                              "negative": {"giou": negative, "n": 2}},
              "negatives_answered": answered, "positives_denied": 0.0,
              "multi_share_distinct": None}
    return {"native": native, "export": None if export is None else {"giou": export}}


def test_spread_is_mean_sd_and_range_over_the_seeds_that_have_a_column():
    spread = experiment_module("seed_spread")
    per_seed = {"s0": spread.seed_metrics(_record(0.4, 0.6, 0.3, 0.3, export=0.43)),
                "s1": spread.seed_metrics(_record(0.5, 0.7, 0.6, 0.6, export=0.49)),
                "s2": spread.seed_metrics(_record(0.6, 0.5, 0.9, 0.9))}
    assert abs(per_seed["s0"]["export_gap"] - 0.03) < 1e-12 and per_seed["s2"]["export_gap"] is None
    assert per_seed["s0"]["relational"] is None  # the record has no relational queries
    summary = spread.spread(per_seed)
    assert abs(summary["giou"]["mean"] - 0.5) < 1e-12
    assert abs(summary["giou"]["sd"] - 0.1) < 1e-12  # sample sd of 0.4, 0.5, 0.6
    assert abs(summary["negative"]["max"] - summary["negative"]["min"] - 0.6) < 1e-12
    assert summary["export_gap"]["n"] == 2 and abs(summary["export_gap"]["mean"] - 0.02) < 1e-12
    assert "relational" not in summary and "multi_share_distinct" not in summary
    table = spread.markdown(per_seed, summary).splitlines()
    assert len(table) == 2 + 3 + 3 and table[2].startswith("| s0 | 0.400 | 0.600 | – |")
    assert table[-1].startswith("| max - min | 0.200 |")


def test_cli_names_the_file_that_is_not_a_record(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_record(0.4, 0.6, 0.3, 0.3)))
    bad.write_text(json.dumps({"checks": []}))
    out = tmp_path / "spread.json"
    ok = subprocess.run([sys.executable, str(SCRIPT), f"a={good}", "--out", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text())["spread"]["giou"]["sd"] == 0.0
    failed = subprocess.run([sys.executable, str(SCRIPT), f"a={good}", f"b={bad}"],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "bad.json: not a lab_report.py record" in failed.stderr
    unlabelled = subprocess.run([sys.executable, str(SCRIPT), str(good)],
                                capture_output=True, text=True)
    assert unlabelled.returncode != 0 and "expected LABEL=PATH" in unlabelled.stderr
