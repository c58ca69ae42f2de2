"""experiments/ablation.py and experiments/paired_bootstrap.py (issue #16, item 5): the
paired bootstrap on data whose answer is known by construction, the pairing by sample id,
the report rendered from hand-written results (old entries included), and one tiny run."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DIFFICULTIES = ("direct", "indirect", "multi", "negative", "relational")


def _import(name: str):
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def pb():
    return _import("paired_bootstrap")


@pytest.fixture(scope="module")
def ablation():
    return _import("ablation")


def rows(ious, masks=None, difficulties=None, prefix="s"):
    """Compact rows of one run: sample ``i`` has IoU ``ious[i]`` over ``masks[i]`` masks."""
    masks = masks if masks is not None else [1] * len(ious)
    difficulties = difficulties or [DIFFICULTIES[i % len(DIFFICULTIES)]
                                    for i in range(len(ious))]
    return [{"id": f"{prefix}{i}", "difficulty": difficulties[i], "iou": float(iou),
             "masks": int(m), "I": round(100 * float(iou)), "U": 100}
            for i, (iou, m) in enumerate(zip(ious, masks, strict=True))]


# ---------------------------------------------------------------------------------------
# The bootstrap on data whose answer is known


def test_identical_arms_give_zero_and_a_zero_width_interval(pb):
    base = np.random.default_rng(0).random(120)
    arm = [rows(base), rows(np.clip(base + 0.1, 0, 1)), rows(base * 0.5)]
    d = pb.compare(arm, arm)
    assert d.mean == 0 and d.low == 0 and d.high == 0
    assert not d.excludes_zero
    assert d.samples == 120 and d.replicates == 10_000


def test_a_constant_shift_is_recovered_exactly_with_multi_mask_samples(pb):
    rng = np.random.default_rng(1)
    masks = rng.integers(1, 4, size=80)
    base = rng.uniform(0, 0.8, size=(3, 80))
    arm_b = [rows(b, masks) for b in base]
    arm_a = [rows(b + 0.1, masks) for b in base]
    d = pb.compare(arm_a, arm_b)
    assert d.mean == pytest.approx(0.1, abs=1e-12)
    assert d.low == pytest.approx(0.1, abs=1e-12) and d.high == pytest.approx(0.1, abs=1e-12)
    assert d.excludes_zero
    for difficulty in DIFFICULTIES:
        assert pb.compare(arm_a, arm_b, difficulty=difficulty).mean == pytest.approx(0.1)


def test_a_noisy_shift_has_its_sign_and_swapping_the_arms_negates_it(pb):
    rng = np.random.default_rng(2)
    base = rng.random((3, 200))
    arm_b = [rows(b) for b in base]
    arm_a = [rows(b + 0.03 + 0.05 * rng.standard_normal(200)) for b in base]
    d = pb.compare(arm_a, arm_b)
    assert 0 < d.low < d.mean < d.high and d.excludes_zero
    assert abs(d.mean - 0.03) < 0.01
    swapped = pb.compare(arm_b, arm_a)  # same seed: the same draws
    assert swapped.mean == pytest.approx(-d.mean)
    assert swapped.low == pytest.approx(-d.high) and swapped.high == pytest.approx(-d.low)
    # No real difference: the interval straddles 0.
    null = [rows(b + 0.05 * rng.standard_normal(200)) for b in base]
    n = pb.compare(null, arm_b)
    assert n.low < 0 < n.high and not n.excludes_zero


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time(pb):
    rng = np.random.default_rng(3)
    covered = 0
    trials = 1000  # 1.7 s; the standard error of the coverage is then 0.007
    for trial in range(trials):
        b = rng.random((1, 60))
        a = b + 0.02 + 0.1 * rng.standard_normal((1, 60))  # true mean difference 0.02
        ones = np.ones_like(a)
        d = pb.paired_bootstrap(a, ones, b, ones, replicates=1000, seed=trial)
        covered += d.low <= 0.02 <= d.high
    # The percentile interval covers slightly less than 95% at n = 60 (0.934 here); a 90%
    # or 99% interval would fall outside these bounds (0.879, 0.987).
    assert 0.92 <= covered / trials <= 0.965


def test_pairing_beats_two_independent_samples_when_samples_differ_in_difficulty(pb):
    rng = np.random.default_rng(4)
    base = rng.random(150)  # samples from hopeless to trivial, for both arms alike
    arm_b = [rows(base)]
    arm_a = [rows(base + 0.02 + 0.01 * rng.standard_normal(150))]
    paired = pb.compare(arm_a, arm_b)
    assert paired.excludes_zero
    # Break the pairing: give arm a's scores to other samples (same ids, permuted scores).
    permuted = [dict(row, iou=arm_a[0][j]["iou"]) for row, j in
                zip(arm_a[0], rng.permutation(150), strict=True)]
    unpaired = pb.compare([permuted], arm_b)
    assert unpaired.mean == pytest.approx(paired.mean)  # the means do not see the pairing
    assert (unpaired.high - unpaired.low) > 5 * (paired.high - paired.low)
    assert not unpaired.excludes_zero


def test_row_order_does_not_matter_samples_are_matched_by_id(pb):
    rng = np.random.default_rng(5)
    base = rng.random((2, 90))
    arm_b = [rows(b) for b in base]
    arm_a = [rows(b + 0.05 * rng.standard_normal(90)) for b in base]
    shuffled = [[run[j] for j in rng.permutation(90)] for run in arm_a]
    for metric in ("giou", "ciou"):
        for difficulty in (None, "multi"):
            kwargs = {"metric": metric, "difficulty": difficulty, "replicates": 2000}
            assert pb.compare(shuffled, arm_b, **kwargs) == pb.compare(arm_a, arm_b, **kwargs)


def test_runs_not_scored_on_the_same_samples_are_refused(pb):
    arm = [rows([0.5] * 10)]
    with pytest.raises(ValueError, match=r"run 0 of arm b .*1 missing .*'s9'.*0 extra"):
        pb.compare(arm, [rows([0.5] * 9)])
    other = [rows([0.5] * 10, prefix="t")]
    with pytest.raises(ValueError, match=r"10 missing .* 10 extra"):
        pb.compare(arm, other)
    with pytest.raises(ValueError, match="run 1 of arm a"):
        pb.compare([arm[0], arm[0][:-1]], arm)
    twice = [arm[0] + arm[0][:1]]
    with pytest.raises(ValueError, match="holds a sample twice"):
        pb.compare(twice, arm)
    relabelled = [[dict(r, difficulty="direct") for r in arm[0]]]
    with pytest.raises(ValueError, match="other difficulties"):
        pb.compare(arm, relabelled)
    with pytest.raises(ValueError, match="no sample of difficulty 'absent'"):
        pb.compare(arm, arm, difficulty="absent")
    with pytest.raises(ValueError, match="at least one run"):
        pb.compare([], arm)


def test_point_estimates_equal_the_evaluations_giou_and_ciou(pb):
    """gIoU is the mean over *masks* (a multi-target sample counts once per mask) and cIoU a
    ratio of sums, as keyseg.metrics reports them; the bootstrap's difference matches."""
    from keyseg.metrics import SegMetrics, iou_score

    rng = np.random.default_rng(6)

    def run():
        out, metrics = [], SegMetrics()
        for i in range(40):
            k = int(rng.integers(1, 4))
            unions = [int(u) for u in rng.integers(0, 50, size=k)]
            inters = [int(rng.integers(0, u + 1)) for u in unions]
            for a, b in zip(inters, unions, strict=True):
                metrics.update_counts(a, b)
            row = {"id": f"x{i}", "difficulty": "multi", "I": inters, "U": unions,
                   "iou": sum(iou_score(a, b) for a, b in zip(inters, unions, strict=True)) / k}
            out.append(pb.compact_row(row))
        return out, metrics.compute()

    arm_a, arm_b = [run() for _ in range(3)], [run() for _ in range(2)]
    for metric in ("giou", "ciou"):
        want = (np.mean([m[metric] for _, m in arm_a]) - np.mean([m[metric] for _, m in arm_b]))
        got = pb.compare([r for r, _ in arm_a], [r for r, _ in arm_b], metric=metric,
                         replicates=10)
        assert got.mean == pytest.approx(want, abs=1e-12)


def test_resampling_seeds_widens_the_interval_when_seeds_disagree(pb):
    rng = np.random.default_rng(7)
    base = rng.random(100)
    arm_b = [rows(base)] * 3
    arm_a = [rows(np.clip(base + offset, 0, 1)) for offset in (-0.15, 0.0, 0.15)]
    tight = pb.compare(arm_a, arm_b)
    wide = pb.compare(arm_a, arm_b, resample_seeds=True)
    assert tight.high - tight.low < 0.05
    assert wide.low < -0.05 and wide.high > 0.05
    assert wide.mean == tight.mean


def test_the_interval_is_seeded_and_10000_replicates_are_fast(pb):
    import time

    rng = np.random.default_rng(8)
    a, b = rng.random((3, 300)), rng.random((3, 300))
    ones = np.ones_like(a)
    start = time.perf_counter()
    first = pb.paired_bootstrap(a, ones, b, ones, seed=1)
    assert time.perf_counter() - start < 1.0
    assert pb.paired_bootstrap(a, ones, b, ones, seed=1) == first
    assert pb.paired_bootstrap(a, ones, b, ones, seed=2) != first
    with pytest.raises(ValueError, match="do not pair"):
        pb.paired_bootstrap(a, ones, b[:, :10], ones[:, :10])
    with pytest.raises(ValueError, match="level"):
        pb.paired_bootstrap(a, ones, b, ones, level=1.5)


# ---------------------------------------------------------------------------------------
# The results file and the report


def result(variant, seed, ious, hidden_state="before", per_sample=True, curve=None):
    """A results.json entry as run_one writes it (``hidden_state=None``: the old format,
    with no hidden state and no per-sample scores)."""
    entry = {"variant": variant, "seed": seed, "steps": 100,
             "val_curve": curve or [[20, 0.1], [60, 0.2], [100, 0.21]]}
    if hidden_state is not None:
        entry["hidden_state"] = hidden_state
    samples = rows(ious)
    for mode in ("teacher", "generate"):
        present = sorted({r["difficulty"] for r in samples})
        by_difficulty = {d: {"giou": float(np.mean([r["iou"] for r in samples
                                                    if r["difficulty"] == d])),
                             "ciou": 0.0, "n": 1} for d in present}
        entry[mode] = {"giou": float(np.mean(ious)), "ciou": 0.5, "n": len(ious),
                       "by_difficulty": by_difficulty}
        if per_sample and hidden_state is not None:
            entry[mode]["per_sample"] = samples
    return entry


def hand_written_results():
    rng = np.random.default_rng(9)
    base = rng.uniform(0, 0.7, size=(3, 50))
    results = []
    for seed in range(3):
        results.append(result("none", seed, base[seed]))
        results.append(result("reference", seed, base[seed] + 0.2))  # clearly better
        results.append(result("reference", seed, base[seed] + 0.2, hidden_state="at"))
    results.append(result("residual", 0, base[0], hidden_state=None))  # old format
    return results


def test_old_entries_read_as_before_and_are_replaced_by_their_new_run(ablation, tmp_path):
    old = result("residual", 1, [0.3], hidden_state=None)
    assert ablation.arm_of(old) == ("residual", "before")
    assert ablation.arm_of(result("residual", 1, [0.3], "at")) == ("residual", "at")
    path = tmp_path / "results.json"
    path.write_text(json.dumps([old, result("none", 1, [0.2])]))
    ablation.add_result(path, result("residual", 1, [0.4], "at"))
    assert len(ablation.read_results(path)) == 3  # "at" is another arm
    ablation.add_result(path, result("residual", 1, [0.5], "before"))
    kept = ablation.read_results(path)
    assert sorted((*ablation.arm_of(r), r["seed"]) for r in kept) == [
        ("none", "before", 1), ("residual", "at", 1), ("residual", "before", 1)]
    assert next(r for r in kept if ablation.arm_of(r) == ("residual", "before"))[
        "hidden_state"] == "before"
    assert ablation.run_name("residual", "at", 1) == "residual-at-seed1"


def test_the_comparisons_answer_the_question(ablation):
    every = [(v, h) for v in ablation.VARIANTS for h in ablation.HIDDEN_STATES]
    names = [f"{ablation.arm_name(a)} - {ablation.arm_name(b)}"
             for a, b in ablation.comparisons(every)]
    assert names == [
        "reference/before - none/before", "residual/before - none/before",
        "gated/before - none/before", "reference/before - residual/before",
        "reference/before - gated/before", "residual/before - gated/before",
        "reference/at - none/at", "residual/at - none/at", "gated/at - none/at",
        "reference/at - residual/at", "reference/at - gated/at", "residual/at - gated/at",
        "reference/at - reference/before", "residual/at - residual/before",
        "gated/at - gated/before", "none/at - none/before"]
    assert len(ablation.comparisons([("reference", "before"), ("none", "before")])) == 1


def test_the_report_renders_both_tables_between_the_markers(ablation, tmp_path):
    report = tmp_path / "RESULTS.md"
    report.write_text("# Results\n\nbefore\n\n<!-- ablation:begin -->\nstale table\n"
                      "<!-- ablation:end -->\n\nafter\n")
    plot = tmp_path / "results_val_giou.png"
    ablation.render_report(hand_written_results(), report, plot, replicates=2000)
    text = report.read_text()
    assert text.startswith("# Results\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "stale table" not in text
    block = text[text.index(ablation.BEGIN): text.index(ablation.END)]
    lines = block.splitlines()
    # The summary: every arm, the old entry as residual/before.
    assert any(line.startswith("| residual/before (n=1) | generate |") for line in lines)
    assert any(line.startswith("| reference/at (n=3) | teacher | 0.") for line in lines)
    # The differences: a constant +0.2 shift is bold, with its interval at +0.200.
    shifted = next(line for line in lines
                   if line.startswith("| reference/before - none/before | generate |"))
    assert "**+0.200 [+0.200, +0.200]**" in shifted
    assert shifted.count("**") == 2 * (3 + len(DIFFICULTIES))  # every cell excludes 0
    same = next(line for line in lines
                if line.startswith("| reference/at - reference/before | generate |"))
    assert "+0.000 [+0.000, +0.000]" in same and "**" not in same
    # Residual runs have no per-sample scores: no row, but a note naming them.
    assert not any(line.startswith("| residual/before - none/before") for line in lines)
    note = next(line for line in lines if "no per-sample scores" in line)
    assert "residual/before - none/before (generate)" in note
    verdict = next(line for line in lines if line.startswith("- reference/before - none/before"))
    assert "excludes 0" in verdict and "3 and 3 seeds" in verdict
    assert "includes 0" in next(line for line in lines
                                if line.startswith("- reference/at - reference/before"))
    assert "| reference/at (n=3) | 100 | 0.210 ± 0.000 | 0.010 ± 0.000 |" in lines
    assert "![validation gIoU](results_val_giou.png)" in block
    with Image.open(plot) as image:
        assert image.size == (640, 400)
    # Rendering again replaces the block rather than adding one.
    ablation.render_report(hand_written_results(), report, plot, replicates=2000)
    assert report.read_text().count(ablation.BEGIN) == 1


def test_a_report_without_markers_is_appended(ablation, tmp_path):
    report = tmp_path / "new.md"
    report.write_text("intro\n")
    ablation.render_report(hand_written_results()[:6], report, tmp_path / "p.png",
                           replicates=100)
    text = report.read_text()
    assert text.startswith("intro\n\n" + ablation.BEGIN) and text.rstrip().endswith(ablation.END)


def test_val_tail_reads_flatness(ablation):
    assert ablation.val_tail([]) is None
    assert ablation.val_tail([[100, 0.3], [25, 0.1], [75, 0.3], [50, 0.2]]) == (0.3, 0.0)
    last, change = ablation.val_tail([[25, 0.1], [50, 0.2], [75, 0.3], [100, 0.4]])
    assert last == 0.4 and change == pytest.approx(0.1)


def test_at_is_drawn_dashed(ablation):
    image = Image.new("RGB", (100, 10), "white")
    draw = ImageDraw.Draw(image)
    ablation._polyline(draw, [(0, 2), (99, 2)], (255, 0, 0), dashed=False, width=1)
    ablation._polyline(draw, [(0, 7), (99, 7)], (255, 0, 0), dashed=True, width=1)
    pixels = np.asarray(image)
    solid, dashed = (pixels[y, :, 1] == 0 for y in (2, 7))
    assert solid.all()
    assert 35 <= dashed.sum() <= 65 and not dashed[10:14].any() and dashed[:7].all()


def test_report_only_trains_nothing_and_renders(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(hand_written_results()))
    report = tmp_path / "R.md"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "ablation.py"), "--report-only", "--out", str(out),
         "--report", str(report), "--replicates", "200", "--seeds", "7",
         # were it to train after all, a tiny run (found by the check below)
         "--config", "configs/tiny-test.yaml", "--variants", "reference", "--hidden-states",
         "before", "--steps", "1", "--validations", "1", "--test-limit", "1"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| reference/before - none/before | generate | **+0.200" in report.read_text()
    assert not (out / "reference-before-seed7").exists()
    assert (tmp_path / "results_val_giou.png").is_file()


# ---------------------------------------------------------------------------------------
# One tiny run through the real training and evaluation (a few seconds)


def test_a_tiny_run_keeps_its_arm_and_per_sample_scores(ablation, tmp_path):
    from keyseg.config import load_config

    args = argparse.Namespace(config="configs/tiny-test.yaml", out=str(tmp_path), steps=2,
                              validations=1, val_limit=2, test_limit=3)
    got = ablation.run_one("none", "at", 0, args)
    assert (got["variant"], got["hidden_state"], got["seed"], got["steps"]) == (
        "none", "at", 0, 2)
    saved = load_config(tmp_path / "none-at-seed0" / "config.yaml")
    assert saved.model.backbone.hidden_state == "at" and not saved.model.use_keyword
    pb = _import("paired_bootstrap")
    for mode in ablation.MODES:
        samples = got[mode]["per_sample"]
        assert len(samples) == got[mode]["samples"] == 3
        assert set(samples[0]) == {"id", "difficulty", "iou", "masks", "I", "U"}
        num, den = pb.ratio_parts([samples], sorted(r["id"] for r in samples), "giou")
        assert num.sum() / den.sum() == pytest.approx(got[mode]["giou"], abs=1e-12)
        assert sum(r["I"] for r in samples) == got[mode]["intersection"]
    assert got["val_curve"] and got["val_curve"][-1][0] == 2


def test_a_run_whose_folder_holds_a_checkpoint_resumes_instead_of_refusing(ablation, tmp_path):
    args = argparse.Namespace(config="configs/tiny-test.yaml", out=str(tmp_path), steps=2,
                              validations=1, val_limit=2, test_limit=3)
    first = ablation.run_one("none", "at", 0, args)
    # The folder now holds the step-2 checkpoint, as a run stopped at its end would; the
    # training loop alone refuses such a folder without --resume.
    again = ablation.run_one("none", "at", 0, args)
    for mode in ablation.MODES:
        assert again[mode]["per_sample"] == first[mode]["per_sample"]
    assert again["steps"] == 2
