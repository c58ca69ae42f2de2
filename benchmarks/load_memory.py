"""Host memory and time to load a 7B-shape KeySeg directory through the pipeline.

1. Build a random directory of the LISA-7B-v1 + SAM ViT-H shapes in bf16 (about 15 GB of
   safetensors shards): the model is built on the meta device for its names, shapes and
   config, and each 2 GB shard is filled with random values and written on its own, so
   building needs about one shard of memory.
2. In a fresh process, load it with ``KeySegPipeline.from_pretrained(DIR, dtype="bf16")``
   (what ``keyseg segment/eval/demo --checkpoint`` do) and report the peak resident memory
   (``ru_maxrss``), its ratio to the directory's size and the load time; on CUDA also the
   peak host memory while loading onto the GPU.

    python benchmarks/load_memory.py                      # build into /tmp, load on CPU
    python benchmarks/load_memory.py --dir /data/ks7b --keep --device cuda
    python benchmarks/load_memory.py --vlm-layers 2 --sam-preset tiny   # quick smoke test

Writes ``benchmarks/results/load_memory-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARD_BYTES = 2 * 1024**3


def build_directory(directory: Path, vlm_layers: int, vision_layers: int,
                    sam_preset: str) -> int:
    """Write a random bf16 7B-shape model directory; returns the weights' bytes."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    from inference import build_7b

    model = build_7b(torch.device("meta"), torch.bfloat16, vlm_layers, vision_layers,
                     sam_preset)
    tied = set(model.all_tied_weights_keys)  # save_pretrained stores one copy of a tie
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            meta = state[name]
            if meta.dtype.is_floating_point:
                values = torch.randn(meta.shape, generator=generator) * 0.02
                tensors[name] = values.to(meta.dtype)
            else:
                tensors[name] = torch.zeros(meta.shape, dtype=meta.dtype)
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        print(f"  wrote {file} ({len(names)} tensors)", flush=True)
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    model.config.lora_applied = False
    model.config.dtype = torch.bfloat16
    model.config.save_pretrained(directory)
    model.processor.save_pretrained(directory)
    return total


def _status_bytes(field: str) -> int:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process from /proc, in bytes. (Not
    ``ru_maxrss``: Linux carries it over from the parent across fork + exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def load_once(directory: Path, device: str) -> dict:
    """Run in a fresh process: load through the pipeline, report memory and time."""
    import keyseg.model.keyseg  # noqa: F401  (imports counted in the baseline)
    from keyseg.pipeline import KeySegPipeline

    # What the process holds before any weight (torch, transformers, keyseg imported).
    baseline = _status_bytes("VmHWM")
    started = time.perf_counter()
    pipe = KeySegPipeline.from_pretrained(directory, device=device, dtype="bf16")
    seconds = time.perf_counter() - started
    after_load = _status_bytes("VmHWM")
    # safetensors shards are memory-mapped: a weight is read (and resident) once it is
    # used. Touch every one, as the first query would, so the peak counts all of them.
    started = time.perf_counter()
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in pipe.model.parameters())
    touch_seconds = time.perf_counter() - started
    record = {"load_s": round(seconds, 2), "touch_all_weights_s": round(touch_seconds, 2),
              "peak_rss_bytes": _status_bytes("VmHWM"), "peak_rss_after_load_bytes": after_load,
              "baseline_rss_bytes": baseline, "checksum_finite": bool(checksum == checksum),
              "parameters": sum(p.numel() for p in pipe.model.parameters()),
              "dtype": str(pipe.dtype), "device": str(pipe.device)}
    if pipe.device.type == "cuda":
        record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the built directory")
    parser.add_argument("--reuse", action="store_true", help="load an existing --dir as is")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vlm-layers", type=int, default=32)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--sam-preset", default="vit_h")
    parser.add_argument("--load-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_only is not None:
        print(json.dumps(load_once(args.load_only, args.device)))
        return

    directory = args.dir or Path(tempfile.mkdtemp(prefix="keyseg-7b-"))
    try:
        if not args.reuse:
            print(f"building {directory} ...", flush=True)
            started = time.perf_counter()
            weights = build_directory(directory, args.vlm_layers, args.vision_layers,
                                      args.sam_preset)
            print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
        weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
        out = subprocess.run([sys.executable, __file__, "--load-only", str(directory),
                              "--device", args.device], capture_output=True, text=True,
                             check=False)
        if out.returncode != 0:
            raise SystemExit(f"load failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        record = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(directory, ignore_errors=True)
    record.update({
        "benchmark": "load_memory", "weights_bytes": weights,
        "peak_rss_over_weights": round(record["peak_rss_bytes"] / weights, 3),
        "loading_rss_over_weights": round(
            (record["peak_rss_bytes"] - record["baseline_rss_bytes"]) / weights, 3),
        "shape": {"vlm_layers": args.vlm_layers, "vision_layers": args.vision_layers,
                  "sam_preset": args.sam_preset},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda")
                    else None},
        "command": " ".join(["python", "benchmarks/load_memory.py", *sys.argv[1:]]),
    })
    print(f"weights {weights / 1e9:.2f} GB  peak RSS {record['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({record['peak_rss_over_weights']:.2f}x; {record['loading_rss_over_weights']:.2f}x "
          f"above the {record['baseline_rss_bytes'] / 1e9:.2f} GB before loading)  "
          f"load {record['load_s']:.1f} s")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    name = "load_memory-" + args.device.split(":")[0]
    if (args.vlm_layers, args.vision_layers, args.sam_preset) != (32, 24, "vit_h"):
        name += "-small"
    (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
