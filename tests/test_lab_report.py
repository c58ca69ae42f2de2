"""experiments/lab_report.py: the issue's acceptance numbers from hand-written eval rows."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import experiment_module

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "lab_report.py"


def _module():
    return experiment_module("lab_report")


def _row(difficulty, iou, answer="Sure, [SEG].", overlap=None, unions=(10,)):
    return {"difficulty": difficulty, "iou": iou, "answer": answer, "max_pred_overlap": overlap,
            "U": list(unions)}


def test_summary_and_checks_from_rows(tmp_path):
    lab = _module()
    rows = [
        _row("direct", 0.9), _row("direct", 0.7),
        _row("negative", 1.0, "There is no such shape, [SEG].", unions=(0,)),
        _row("negative", 0.0, "Sure, it is the red star, [SEG]."),
        _row("multi", 0.6, overlap=0.1), _row("multi", 0.4, overlap=0.9),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"batch_end": 1}\n{"torn')
    summary = lab.summarise(lab.read_rows(path))
    assert summary["samples"] == 6
    assert abs(summary["giou"] - 3.6 / 6) < 1e-9
    assert summary["by_difficulty"]["direct"]["giou"] == 0.8
    assert summary["negatives_answered"] == 0.5 and summary["negatives_empty_mask"] == 0.5
    assert summary["positives_denied"] == 0.0
    denied = lab.summarise([*rows, _row("direct", 0.0, "Nothing in the image matches, [SEG].")])
    assert denied["positives_denied"] == 1 / 5
    assert summary["multi_share_distinct"] == 0.5 and summary["multi_mean_overlap"] == 0.5
    results = dict((text.split(" ")[0], ok) for text, ok in lab.checks(summary, None))
    assert results["direct"] is True and results["multi"] is True  # 0.8 and 0.5 >= 0.5
    assert results["gIoU"] is False and results["negatives"] is False
    export = dict(summary, giou=summary["giou"] + 0.05)
    assert lab.checks(summary, export)[-1][1] is False  # a 0.05 gap is outside 0.03
