"""The [KEY] ablation on the procedural shapes world: does keyword fusion help?

Each *arm* is a fusion variant (``reference``, ``residual``, ``gated``, ``none`` = no [KEY]
at all) with a choice of the state that stands for [SEG] and [KEY] (``model.backbone.hidden_state``:
``before`` = the reference, ``at``; ``none`` keeps the choice for its [SEG]). For each arm and
seed, train the tiny-shapes model for a fixed budget, then score it on the shapes *test*
split (held-out templates) in teacher-forced and generate modes, per query difficulty,
keeping every sample's score. Results go to ``--out/results.json`` as each run finishes
(re-running skips finished runs and resumes an interrupted one from its last checkpoint),
and ``--report`` renders into ``docs/RESULTS.md`` the table of mean ± std over seeds, the
paired bootstrap intervals of the differences that answer the question
(:mod:`paired_bootstrap`), the validation flatness and a validation-curve plot.

    OMP_NUM_THREADS=1 python experiments/ablation.py --steps 800 --seeds 0 1 2 \
        --out runs/ablation --report docs/RESULTS.md

Several processes may share one ``--out`` (e.g. ``--hidden-states before`` and
``--hidden-states at`` on two cores); results are merged under a file lock, and
``--report-only --report docs/RESULTS.md`` re-renders the report from the results alone.

Budget note: every run here is short (a few thousand samples on one CPU core); the numbers
compare arms under equal budgets, they are not the shipped model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from paired_bootstrap import Difference, compact_row, compare
from PIL import Image, ImageDraw

from keyseg.config import load_config
from keyseg.io import atomic_write_json, atomic_write_text

VARIANTS = ("reference", "residual", "gated", "none")
FUSIONS = tuple(v for v in VARIANTS if v != "none")
HIDDEN_STATES = ("before", "at")
MODES = ("teacher", "generate")
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"

Arm = tuple[str, str]  # (variant, hidden_state)


def arm_of(result: dict) -> Arm:
    """A result's arm; entries written before the hidden-state arms have none: ``before``."""
    return result["variant"], result.get("hidden_state", "before")


def arm_name(arm: Arm) -> str:
    return f"{arm[0]}/{arm[1]}"


def run_name(variant: str, hidden_state: str, seed: int) -> str:
    """The run's key and folder under ``--out``, e.g. ``residual-at-seed1``."""
    return f"{variant}-{hidden_state}-seed{seed}"


def run_one(variant: str, hidden_state: str, seed: int, args: argparse.Namespace) -> dict:
    from keyseg.data.eval_sets import resolve_eval_set
    from keyseg.evaluate import run_evaluation
    from keyseg.model.keyseg import KeySegModel
    from keyseg.train import main as train_main
    from keyseg.train.checkpoint import list_checkpoints

    run_dir = Path(args.out) / run_name(variant, hidden_state, seed)
    steps_per_epoch = max(1, args.steps // args.validations)
    overrides = [
        f"model.fusion.variant={variant}",
        f"model.use_keyword={'false' if variant == 'none' else 'true'}",
        f"model.backbone.hidden_state={hidden_state}",
        f"train.seed={seed}",
        f"train.output_dir={run_dir}",
        f"train.epochs={args.validations}",
        f"train.steps_per_epoch={steps_per_epoch}",
        f"train.warmup_steps={min(100, args.steps // 10)}",
        f"train.save_every={steps_per_epoch * args.validations}",
        f"train.val_limit={args.val_limit}",
        "data.num_workers=0",
    ]
    if variant == "none":
        trainable = [c for c in load_config(args.config).model.trainable if c != "fusion"]
        overrides.append(f"model.trainable=[{','.join(trainable)}]")
    cfg = load_config(args.config, overrides)
    # A run stopped part-way (Ctrl-C, SIGTERM, a restart) continues from its last checkpoint
    # instead of refusing the folder: training resumes exactly, so the result is the same.
    train_main(cfg, resume="latest" if list_checkpoints(run_dir) else None)
    model = KeySegModel.from_pretrained(run_dir / "final").eval()
    # The standard test split (one query per image, as `keyseg eval` reads it), whatever the
    # training config asks of the training data.
    test_data = dataclasses.replace(
        cfg.data, shapes=dataclasses.replace(cfg.data.shapes, queries_per_image=1))
    test = resolve_eval_set("shapes:test", cfg.data.dataset_dir, test_data).records
    result = {"variant": variant, "hidden_state": model.settings.backbone.hidden_state,
              "seed": seed, "steps": steps_per_epoch * args.validations}
    for mode in MODES:
        report = run_evaluation(model, test, mode=mode, limit=args.test_limit, progress=False,
                                keep_per_sample=True)
        result[mode] = {**report.metrics,
                        "per_sample": [compact_row(row) for row in report.per_sample]}
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val" in row:
            curve.append((row["step"], row["val"]["giou"]))
    result["val_curve"] = curve
    return result


def read_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def add_result(path: Path, result: dict) -> list[dict]:
    """Append ``result`` to the results file under a lock, so that several processes (e.g.
    one per CPU core) can share one ``--out``; an earlier result of the same arm and seed
    (an old entry without ``hidden_state`` counting as ``before``) is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = (*arm_of(result), result["seed"])
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = [r for r in read_results(path) if (*arm_of(r), r["seed"]) != key]
        results.append(result)
        atomic_write_json(path, results)
    return results


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def arms_in(results: list[dict]) -> list[Arm]:
    """The arms present, in table order (variants, then hidden states)."""
    present = {arm_of(r) for r in results}
    return [(v, h) for v in VARIANTS for h in HIDDEN_STATES if (v, h) in present]


def comparisons(arms: Sequence[Arm]) -> list[tuple[Arm, Arm]]:
    """The ``(a, b)`` pairs whose difference ``a - b`` answers the question, among ``arms``:
    each fusion against no [KEY] and each pair of fusions against each other at each hidden
    state, then ``at`` against ``before`` for each variant."""
    against_none = [(f, "none") for f in FUSIONS]
    pairs = [((a, h), (b, h)) for h in HIDDEN_STATES
             for a, b in against_none + list(itertools.combinations(FUSIONS, 2))]
    pairs += [((v, "at"), (v, "before")) for v in VARIANTS]
    return [(a, b) for a, b in pairs if a in arms and b in arms]


def per_sample_runs(results: list[dict], arm: Arm, mode: str) -> list[list[dict]] | None:
    """Each seed's compact rows of ``arm`` in ``mode``, by seed; ``None`` when a run has
    none (written before per-sample scores were kept)."""
    runs = sorted((r for r in results if arm_of(r) == arm), key=lambda r: r["seed"])
    if not runs or any("per_sample" not in r[mode] for r in runs):
        return None
    return [r[mode]["per_sample"] for r in runs]


def format_difference(d: Difference) -> str:
    """``+0.012 [-0.010, +0.034]``, in bold when the interval excludes 0."""
    text = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
    return f"**{text}**" if d.excludes_zero else text


def difficulties_of(results: list[dict]) -> list[str]:
    return sorted({d for r in results for m in MODES for d in r[m].get("by_difficulty", {})})


def summary_table(results: list[dict], difficulties: list[str]) -> list[str]:
    """Mean ± std over seeds per arm and mode: gIoU, cIoU and gIoU per difficulty."""
    lines = ["| arm | mode | gIoU | cIoU | " + " | ".join(difficulties) + " |",
             "|---|---|---|---|" + "---|" * len(difficulties)]
    for arm in arms_in(results):
        runs = [r for r in results if arm_of(r) == arm]
        for mode in MODES:
            cells = [mean_std([r[mode]["giou"] for r in runs]),
                     mean_std([r[mode]["ciou"] for r in runs])]
            for d in difficulties:
                cells.append(mean_std([r[mode]["by_difficulty"][d]["giou"] for r in runs
                                       if d in r[mode].get("by_difficulty", {})]))
            lines.append(f"| {arm_name(arm)} (n={len(runs)}) | {mode} | "
                         + " | ".join(cells) + " |")
    return lines


def difference_table(results: list[dict], difficulties: list[str], replicates: int,
                     seed: int = 0) -> tuple[list[str], list[str]]:
    """The paired differences with 95% intervals, and one verdict line per comparison
    (generated answers, gIoU over all difficulties)."""
    lines = ["| a - b | mode | gIoU | cIoU | gIoU, seeds resampled too | "
             + " | ".join(difficulties) + " |",
             "|---|---|---|---|---|" + "---|" * len(difficulties)]
    verdicts, missing = [], []
    for a, b in comparisons(arms_in(results)):
        for mode in MODES:
            runs_a, runs_b = per_sample_runs(results, a, mode), per_sample_runs(results, b, mode)
            if runs_a is None or runs_b is None:
                missing.append(f"{arm_name(a)} - {arm_name(b)} ({mode})")
                continue
            options = {"replicates": replicates, "seed": seed}
            overall = compare(runs_a, runs_b, **options)
            cells = [format_difference(overall),
                     format_difference(compare(runs_a, runs_b, metric="ciou", **options)),
                     format_difference(compare(runs_a, runs_b, resample_seeds=True,
                                               **options))]
            labels = {row["difficulty"] for run in runs_a for row in run}
            cells += [format_difference(compare(runs_a, runs_b, difficulty=d, **options))
                      if d in labels else "–" for d in difficulties]
            lines.append(f"| {arm_name(a)} - {arm_name(b)} | {mode} | "
                         + " | ".join(cells) + " |")
            if mode == "generate":
                side = ("excludes 0" if overall.excludes_zero else "includes 0")
                verdicts.append(f"- {arm_name(a)} - {arm_name(b)}: {overall.mean:+.3f} "
                                f"[{overall.low:+.3f}, {overall.high:+.3f}], the interval "
                                f"{side} (n={overall.samples} samples, "
                                f"{len(runs_a)} and {len(runs_b)} seeds)")
    if missing:
        verdicts.append("- no per-sample scores (runs written before they were kept) for: "
                        + ", ".join(missing))
    return lines, verdicts


def val_tail(curve: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """The last validation gIoU and its change over the last quarter of the steps (from the
    last validation at or before 75% of the final step): near 0 when the curve is flat."""
    if not curve:
        return None
    points = sorted((float(s), float(g)) for s, g in curve)
    last_step, last = points[-1]
    earlier = [g for s, g in points if s <= 0.75 * last_step]
    return last, last - (earlier[-1] if earlier else points[0][1])


def flatness_table(results: list[dict]) -> list[str]:
    lines = ["| arm | steps | last val gIoU | change over the last quarter |", "|---|---|---|---|"]
    for arm in arms_in(results):
        runs = [r for r in results if arm_of(r) == arm]
        tails = [t for t in (val_tail(r["val_curve"]) for r in runs) if t is not None]
        steps = ", ".join(str(s) for s in sorted({r["steps"] for r in runs}))
        lines.append(f"| {arm_name(arm)} (n={len(runs)}) | {steps} | "
                     f"{mean_std([t[0] for t in tails])} | {mean_std([t[1] for t in tails])} |")
    return lines


def render_report(results: list[dict], report: Path, plot: Path, replicates: int = 10_000
                  ) -> None:
    """Write the tables (and the plot) between :data:`BEGIN` and :data:`END` in ``report``
    (appended when the markers are missing); the rest of the file is kept."""
    difficulties = difficulties_of(results)
    differences, verdicts = difference_table(results, difficulties, replicates)
    lines = [
        *summary_table(results, difficulties), "",
        f"Paired differences `a - b` (mean over seeds) with 95% bootstrap intervals "
        f"({replicates} replicates of the test samples, the same draw for both arms; bold: "
        "the interval excludes 0). The last column also resamples each arm's seeds.", "",
        *differences, "",
        "Generated answers, gIoU over all difficulties:", "", *verdicts, "",
        "Validation gIoU at the end of training (flat when the change is near 0):", "",
        *flatness_table(results), "",
        f"![validation gIoU]({plot.name})",
    ]
    plot_curves(results, plot)
    text = report.read_text() if report.exists() else ""
    block = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text + "\n" + block + "\n"
    atomic_write_text(report, text)


COLOURS = {"reference": (31, 119, 180), "residual": (44, 160, 44), "gated": (148, 103, 189),
           "none": (214, 39, 40)}


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]],
              fill: tuple[int, int, int], dashed: bool, width: int = 3, dash: float = 8.0
              ) -> None:
    """A polyline, solid or drawn dash on, dash off (PIL has no dashed lines)."""
    if not dashed:
        draw.line(points, fill=fill, width=width)
        return
    on, left = True, dash
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while done < length:
            step = min(left, length - done)
            if on:
                t0, t1 = done / length, (done + step) / length
                draw.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0),
                           (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)], fill=fill, width=width)
            done += step
            left -= step
            if left <= 0:
                on, left = not on, dash


def plot_curves(results: list[dict], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Validation gIoU over steps, one line per arm (mean over seeds), drawn with PIL: one
    colour per variant, solid for ``before``, dashed for ``at``."""
    width, height = size
    margin = 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    max_step = max((s for r in results for s, _ in r["val_curve"]), default=1)
    draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
    for tick in range(0, 11, 2):
        y = height - margin - (height - margin - 10) * tick / 10
        draw.text((5, y - 6), f"{tick / 10:.1f}", fill="black")
    draw.text((width // 2 - 40, height - 30), f"step (max {max_step})", fill="black")
    for index, arm in enumerate(arms_in(results)):
        runs = [r["val_curve"] for r in results if arm_of(r) == arm and r["val_curve"]]
        if not runs:
            continue
        steps = sorted({s for curve in runs for s, _ in curve})
        points = []
        for step in steps:
            values = [g for curve in runs for s, g in curve if s == step]
            x = margin + (width - margin - 10) * step / max_step
            y = height - margin - (height - margin - 10) * statistics.mean(values)
            points.append((x, y))
        colour, dashed = COLOURS[arm[0]], arm[1] != "before"
        if len(points) > 1:
            _polyline(draw, points, colour, dashed)
        key_y = 18 + 14 * index
        _polyline(draw, [(margin + 10, key_y), (margin + 40, key_y)], colour, dashed)
        draw.text((margin + 46, key_y - 6), arm_name(arm), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny-shapes.yaml")
    parser.add_argument("--variants", nargs="+", default=["reference", "residual", "none"],
                        choices=VARIANTS, help="fusion arms (gated is opt-in)")
    parser.add_argument("--hidden-states", nargs="+", default=list(HIDDEN_STATES),
                        choices=HIDDEN_STATES,
                        help="model.backbone.hidden_state of [SEG] and [KEY] (default both)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--validations", type=int, default=5)
    parser.add_argument("--val-limit", type=int, default=40)
    parser.add_argument("--test-limit", type=int, default=150)
    parser.add_argument("--replicates", type=int, default=10_000,
                        help="bootstrap replicates per interval")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--report", default=None, help="markdown file to (re)write the table in")
    parser.add_argument("--plot", default="results_val_giou.png",
                        help="file name of the validation plot, written next to --report")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: render --report from --out's results")
    args = parser.parse_args()
    out = Path(args.out)
    results_file = out / "results.json"
    results = read_results(results_file)
    done = {(*arm_of(r), r["seed"]) for r in results}
    for seed in [] if args.report_only else args.seeds:
        for variant in args.variants:
            for hidden_state in args.hidden_states:
                if (variant, hidden_state, seed) in done:
                    continue
                result = run_one(variant, hidden_state, seed, args)
                results = add_result(results_file, result)
                print(run_name(variant, hidden_state, seed), f"steps {result['steps']}",
                      {m: round(result[m]["giou"], 3) for m in MODES}, flush=True)
    if args.report:
        report = Path(args.report)
        render_report(read_results(results_file), report,
                      report.parent / args.plot, args.replicates)
    assert all(not math.isnan(r["teacher"]["giou"]) for r in results)


if __name__ == "__main__":
    main()
