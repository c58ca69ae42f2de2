"""The [KEY] ablation on the procedural shapes world: does keyword fusion help?

For each fusion variant (``reference``, ``residual``, ``none`` = no [KEY] at all) and seed,
train the tiny-shapes model for a fixed budget, then score it on the shapes *test* split
(held-out templates) in teacher-forced and generate modes, per query difficulty. Results go
to ``--out/results.json`` as each run finishes (re-running skips finished runs), and
``--report`` renders the table (``docs/RESULTS.md``) and a validation-curve plot.

    OMP_NUM_THREADS=1 python experiments/ablation.py --steps 800 --seeds 0 1 2 \
        --out runs/ablation --report docs/RESULTS.md

Several processes may share one ``--out`` (e.g. ``--seeds 0 1`` and ``--seeds 2`` on two
cores); results are merged under a file lock, and ``--report`` alone re-renders the table.

Budget note: every run here is short (a few thousand samples on one CPU core); the numbers
compare variants under equal budgets, they are not the shipped model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import statistics
from pathlib import Path

from PIL import Image, ImageDraw

from keyseg.config import load_config
from keyseg.io import atomic_write_json, atomic_write_text

VARIANTS = ("reference", "residual", "none")
MODES = ("teacher", "generate")


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    from keyseg.data.eval_sets import resolve_eval_set
    from keyseg.evaluate import run_evaluation
    from keyseg.model.keyseg import KeySegModel
    from keyseg.train import main as train_main

    run_dir = Path(args.out) / f"{variant}-seed{seed}"
    steps_per_epoch = max(1, args.steps // args.validations)
    overrides = [
        f"model.fusion.variant={variant}",
        f"model.use_keyword={'false' if variant == 'none' else 'true'}",
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
    train_main(cfg)
    model = KeySegModel.from_pretrained(run_dir / "final").eval()
    # The standard test split (one query per image, as `keyseg eval` reads it), whatever the
    # training config asks of the training data.
    test_data = dataclasses.replace(
        cfg.data, shapes=dataclasses.replace(cfg.data.shapes, queries_per_image=1))
    test = resolve_eval_set("shapes:test", cfg.data.dataset_dir, test_data).records
    result = {"variant": variant, "seed": seed, "steps": steps_per_epoch * args.validations}
    for mode in MODES:
        report = run_evaluation(model, test, mode=mode, limit=args.test_limit, progress=False)
        result[mode] = report.metrics
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
    one per seed, one per CPU core) can share one ``--out``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = [r for r in read_results(path)
                   if (r["variant"], r["seed"]) != (result["variant"], result["seed"])]
        results.append(result)
        atomic_write_json(path, results)
    return results


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def render_report(results: list[dict], report: Path, plot: Path) -> None:
    difficulties = sorted({d for r in results for m in MODES
                           for d in r[m].get("by_difficulty", {})})
    lines = ["| variant | mode | gIoU | cIoU | " + " | ".join(difficulties) + " |",
             "|---|---|---|---|" + "---|" * len(difficulties)]
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        for mode in MODES:
            cells = [mean_std([r[mode]["giou"] for r in runs]),
                     mean_std([r[mode]["ciou"] for r in runs])]
            for d in difficulties:
                cells.append(mean_std([r[mode]["by_difficulty"][d]["giou"] for r in runs
                                       if d in r[mode].get("by_difficulty", {})]))
            lines.append(f"| {variant} (n={len(runs)}) | {mode} | " + " | ".join(cells) + " |")
    plot_curves(results, plot)
    text = report.read_text() if report.exists() else ""
    start, end = "<!-- ablation:begin -->", "<!-- ablation:end -->"
    table = "\n".join([start, *lines, "", f"![validation gIoU]({plot.name})", end])
    if start in text and end in text:
        text = text[: text.index(start)] + table + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + table + "\n"
    atomic_write_text(report, text)


def plot_curves(results: list[dict], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Validation gIoU over steps, one colour per variant (mean over seeds), drawn with PIL."""
    colours = {"reference": (31, 119, 180), "residual": (44, 160, 44), "none": (214, 39, 40)}
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
    for index, variant in enumerate(VARIANTS):
        runs = [r["val_curve"] for r in results if r["variant"] == variant and r["val_curve"]]
        if not runs:
            continue
        steps = sorted({s for curve in runs for s, _ in curve})
        points = []
        for step in steps:
            values = [g for curve in runs for s, g in curve if s == step]
            x = margin + (width - margin - 10) * step / max_step
            y = height - margin - (height - margin - 10) * statistics.mean(values)
            points.append((x, y))
        if len(points) > 1:
            draw.line(points, fill=colours[variant], width=3)
        draw.text((margin + 10, 15 + 14 * index), variant, fill=colours[variant])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny-shapes.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--validations", type=int, default=5)
    parser.add_argument("--val-limit", type=int, default=40)
    parser.add_argument("--test-limit", type=int, default=150)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--report", default=None, help="markdown file to (re)write the table in")
    args = parser.parse_args()
    out = Path(args.out)
    results_file = out / "results.json"
    results = read_results(results_file)
    done = {(r["variant"], r["seed"]) for r in results}
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            result = run_one(variant, seed, args)
            results = add_result(results_file, result)
            print(json.dumps({k: result[k] for k in ("variant", "seed", "steps")}),
                  {m: round(result[m]["giou"], 3) for m in MODES}, flush=True)
    if args.report:
        report = Path(args.report)
        render_report(results, report, report.parent / "results_val_giou.png")
    assert all(not math.isnan(r["teacher"]["giou"]) for r in results)


if __name__ == "__main__":
    main()
