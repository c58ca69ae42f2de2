"""Evaluation memory over a split: peak RSS for a short and a 10x longer split.

Each size runs in a fresh interpreter (so one run's peak cannot hide the other's): the tiny
random model (``keyseg.build.build_tiny_model``) scores the shapes world's test split
with :func:`keyseg.evaluate.run_evaluation` as ``keyseg eval`` calls it - rows streamed to a
JSONL file, overlay candidates kept (``--overlays`` worst and best), merged at the end. A
thread samples the process RSS with psutil every 20 ms; the peak and the RSS when 10% / 50% /
100% of the rows were on disk are reported. Flat memory means the long split's peak is within
10% of the short one's.

    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py                  # 200 and 2000
    python benchmarks/eval_memory.py --sizes 200 2000 --image-size 128 \\
        --out benchmarks/results/eval_memory-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def worker(size: int, image_size: int, batch_size: int, overlays: int) -> dict:
    """Evaluate ``size`` records in this process; RSS figures in MB."""
    import psutil
    import torch

    from keyseg.build import build_tiny_model
    from keyseg.data.shapes import ShapesConfig, ShapesDataset
    from keyseg.evaluate import run_evaluation

    process = psutil.Process()
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), process.memory_info().rss))
            stop.wait(0.02)

    records = ShapesDataset("test", ShapesConfig(image_size=image_size, test_size=size))
    model = build_tiny_model(seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        jsonl = Path(scratch) / "rows.jsonl"
        part = jsonl.with_name(f".{jsonl.name}.part0")
        marks: list[tuple[float, int]] = []  # (time, rows on disk)

        def watch() -> None:
            rows, offset = 0, 0
            while not stop.is_set():
                if part.exists():  # count new rows only: no growing read of the file
                    with open(part, "rb") as handle:
                        handle.seek(offset)
                        chunk = handle.read()
                    offset += len(chunk)
                    rows += chunk.count(b'{"id"')
                marks.append((time.perf_counter(), rows))
                stop.wait(0.2)

        threads = [threading.Thread(target=sample, daemon=True),
                   threading.Thread(target=watch, daemon=True)]
        for thread in threads:
            thread.start()
        rss_start = process.memory_info().rss
        start = time.perf_counter()
        result = run_evaluation(model, records, batch_size=batch_size, jsonl_path=jsonl,
                                keep_overlays=overlays, progress=False)
        wall = time.perf_counter() - start
        stop.set()
        for thread in threads:
            thread.join()
        with open(jsonl, encoding="utf-8") as handle:
            rows_written = sum(1 for _ in handle)

    def rss_at(fraction: float) -> float | None:
        """RSS (MB) at the first moment ``fraction`` of the rows were on disk."""
        for moment, rows in marks:
            if rows >= fraction * size:
                before = [r for t, r in samples if t <= moment]
                return round(before[-1] / 2**20, 1) if before else None
        return None

    peak = max(r for _, r in samples)
    return {
        "size": size, "rows": rows_written, "samples_scored": result.metrics["samples"],
        "wall_s": round(wall, 1), "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_10pct_mb": rss_at(0.1), "rss_50pct_mb": rss_at(0.5),
        "rss_end_mb": round(samples[-1][1] / 2**20, 1), "peak_rss_mb": round(peak / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--overlays", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the record here (JSON)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.image_size, args.batch_size, args.overlays)))
        return

    runs = []
    for size in args.sizes:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(size), "--image-size",
             str(args.image_size), "--batch-size", str(args.batch_size), "--overlays",
             str(args.overlays)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"worker {size} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    short, long = runs[0], runs[-1]
    ratio = long["peak_rss_mb"] / short["peak_rss_mb"]
    record = {
        "benchmark": "eval_memory", "command": " ".join(sys.argv),
        "device": f"{platform.machine()} CPU", "platform": platform.platform(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg(), "image_size": args.image_size,
        "batch_size": args.batch_size, "overlays": args.overlays, "runs": runs,
        "peak_ratio_long_over_short": round(ratio, 4), "flat": ratio <= 1.10,
    }
    print(f"peak RSS {short['size']}: {short['peak_rss_mb']} MB, {long['size']}: "
          f"{long['peak_rss_mb']} MB (x{ratio:.3f}; flat = within 10%: {ratio <= 1.10})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
