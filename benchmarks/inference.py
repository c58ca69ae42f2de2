"""Inference latency and memory: per stage, end to end, cached vs naive.

Stages of one query (SPEC §2): SAM image encode, VLM prefill (prompt + image tokens),
decode (the remaining generated tokens), fusion + SAM mask decode, post-processing (masks
to the original size, threshold, to CPU). End to end, ``Q`` queries about one image run
through :class:`keyseg.pipeline.KeySegPipeline` two ways in the same process:

* cached: KV cache on, the SAM embedding computed once per image (what the pipeline does);
* naive: ``use_cache=False`` and the SAM embedding recomputed for every query.

Every answer is forced to start with ``[SEG] [KEY]`` and to run exactly ``--new-tokens``
tokens, so both paths do the same work on random weights.

Models: ``tiny`` (the test model, CPU-friendly) and ``7b`` (LLaMA-7B + CLIP ViT-L/14-224 +
SAM ViT-H shapes, random weights built directly on the device; no download). Default: tiny
on CPU, both on CUDA.

    python benchmarks/inference.py                       # CPU, tiny
    python benchmarks/inference.py --device cuda         # tiny and 7b on the GPU
    python benchmarks/inference.py --preset 7b --vlm-layers 1 --vision-layers 1 \\
        --sam-preset tiny --device cpu                   # smoke-test the 7b code path
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from keyseg.pipeline import KeySegPipeline
from keyseg.runtime import resolve_device, resolve_dtype


class ForcePrefix(LogitsProcessor):
    """Force the first generated tokens (``[SEG] [KEY]``), never end-of-sequence."""

    def __init__(self, prefix: list[int], eos: int) -> None:
        self.prefix, self.eos, self.start = prefix, eos, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        scores[:, self.eos] = -1e9
        if step < len(self.prefix):
            scores = torch.full_like(scores, -1e9)
            scores[:, self.prefix[step]] = 0.0
        return scores


def build_7b(device: torch.device, dtype: torch.dtype, vlm_layers: int, vision_layers: int,
             sam_preset: str):
    """A KeySegModel with LISA-7B-v1 shapes and random weights, built on ``device``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from keyseg.config import ModelConfig
    from keyseg.model.keyseg import KeySegModel
    from keyseg.model.sam import SamSegmenter
    from keyseg.model.tiny import build_tiny_tokenizer, tiny_image_processor
    from keyseg.processor import KeySegProcessor

    tokenizer = build_tiny_tokenizer()  # ids are all < its size; the table is 7B-sized
    vocab = tokenizer.get_vocab()
    text = LlamaConfig(vocab_size=32004, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=vlm_layers, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=vision_layers, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    llava = LlavaConfig(text_config=text, vision_config=vision,
                        image_token_index=vocab["<image>"], vision_feature_layer=-2,
                        vision_feature_select_strategy="default", image_seq_length=256)
    config = ModelConfig()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target precision (no fp32 copy)
    try:
        with torch.device(device):
            vlm = LlavaForConditionalGeneration(llava)
            sam = SamSegmenter.from_preset(sam_preset, prompt_dim=config.fusion.dim)
            processor = KeySegProcessor(tokenizer, tiny_image_processor(224), config.backbone,
                                        num_image_tokens=256, sam_image_size=sam.image_size)
            model = KeySegModel.from_parts(config, vlm, sam, processor)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def build(preset: str, device: torch.device, dtype: torch.dtype, args) -> torch.nn.Module:
    if preset == "tiny":
        from keyseg.build import build_tiny_model

        return build_tiny_model(seed=0).to(device=device, dtype=dtype).eval()
    return build_7b(device, dtype, args.vlm_layers, args.vision_layers, args.sam_preset)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.inference_mode()
def stage_times(pipe: KeySegPipeline, image: np.ndarray, args) -> dict[str, float]:
    """Per-stage median seconds for one query (see the module docstring)."""
    model, device = pipe.model, pipe.device
    ids = pipe.processor.ids
    rgb = pipe.load(image)
    entry = pipe._encoded([rgb])[0]
    pixels = entry.prepared.sam.pixel_values[None].to(device=device, dtype=pipe.dtype)
    encode, embedding = timed(lambda: model.encode_images(pixels), device, args.repeats)
    batch, _ = pipe._prompt_batch([entry], ["What is the red shape?"], [[]])
    common = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  eos_token_id=ids.eos, pad_token_id=ids.pad, do_sample=False,
                  output_hidden_states=True, return_dict_in_generate=True, use_cache=True,
                  **batch.vision_inputs)

    def gen(n: int):
        processors = LogitsProcessorList([ForcePrefix([ids.seg, ids.key], ids.eos)])
        return model.backbone.generate(max_new_tokens=n, min_new_tokens=n,
                                       logits_processor=processors, **common)

    prefill, _ = timed(lambda: gen(1), device, args.repeats)
    total, out = timed(lambda: gen(args.new_tokens), device, args.repeats)
    hidden = torch.cat([out.hidden_states[0][-1],
                        *(s[-1][:, -1:] for s in out.hidden_states[1:])], dim=1)[0]
    sequence = out.sequences[0, : hidden.shape[0]]

    def fuse_decode():
        seg, key = model.special_embeddings(sequence, hidden)
        return model.sam.decode(embedding[0], model.keyword_fusion(seg, key))

    fusion, (low_res, _) = timed(fuse_decode, device, args.repeats)

    def post():
        masks = model.sam.postprocess_masks(low_res, batch.resized_sizes[0],
                                            batch.original_sizes[0])
        return (masks > 0).cpu().numpy()

    post_time, _ = timed(post, device, args.repeats)
    return {"sam_encode": encode, "vlm_prefill": prefill,
            "decode": max(total - prefill, 0.0), "decode_per_token": max(total - prefill, 0.0)
            / max(args.new_tokens - 1, 1), "fusion_mask_decode": fusion,
            "post_process": post_time}


def end_to_end(pipe: KeySegPipeline, image: np.ndarray, args, naive: bool) -> float:
    """Mean seconds per query over ``--queries`` queries about one image."""
    ids = pipe.processor.ids
    queries = [f"Question {i}: which shape is red?" for i in range(args.queries)]
    pipe._cache.clear()
    sync(pipe.device)
    start = time.perf_counter()
    for query in queries:
        if naive:
            pipe._cache.clear()  # re-encode the image for every query
        pipe(image, query, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
             use_cache=not naive,
             logits_processor=LogitsProcessorList([ForcePrefix([ids.seg, ids.key], ids.eos)]))
    sync(pipe.device)
    return (time.perf_counter() - start) / len(queries)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    out = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_preset(preset: str, device: torch.device, dtype: torch.dtype, args) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build(preset, device, dtype, args)
    built = time.perf_counter() - start
    pipe = KeySegPipeline(model, max_new_tokens=args.new_tokens)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8)
    stages = stage_times(pipe, image, args)
    end_to_end(pipe, image, args, naive=False)  # warm-up
    cached = end_to_end(pipe, image, args, naive=False)
    naive = end_to_end(pipe, image, args, naive=True)
    result = {
        "preset": preset,
        "dtype": str(dtype).replace("torch.", ""),
        "build_s": round(built, 2),
        "stages_ms": {k: round(v * 1e3, 2) for k, v in stages.items()},
        "end_to_end_ms_per_query": {"cached": round(cached * 1e3, 1),
                                    "naive": round(naive * 1e3, 1),
                                    "naive_over_cached": round(naive / cached, 2)},
        "peak_memory": {k: round(v, 1) for k, v in peak_memory_mb(device).items()},
    }
    del pipe, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda > mps > cpu")
    parser.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default per device)")
    parser.add_argument("--preset", action="append", choices=["tiny", "7b"],
                        help="repeatable; default tiny on CPU, tiny and 7b on CUDA")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--queries", type=int, default=4, help="queries per image")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per stage")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--vlm-layers", type=int, default=32, help="7b: LLaMA layers")
    parser.add_argument("--vision-layers", type=int, default=24, help="7b: CLIP layers")
    parser.add_argument("--sam-preset", default="vit_h", help="7b: SAM preset")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/inference-DEVICE.json)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    presets = args.preset or (["tiny", "7b"] if device.type == "cuda" else ["tiny"])
    report = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "command": " ".join(["python", "benchmarks/inference.py", *(argv or sys.argv[1:])]),
        "image": [args.height, args.width],
        "new_tokens": args.new_tokens,
        "queries_per_image": args.queries,
        "results": [],
    }
    for preset in presets:
        result = run_preset(preset, device, dtype, args)
        report["results"].append(result)
        e2e = result["end_to_end_ms_per_query"]
        print(f"[{report['device']}] {preset} ({result['dtype']}):")
        for stage, ms in result["stages_ms"].items():
            print(f"  {stage:<20} {ms:10.2f} ms")
        print(f"  end-to-end/query     cached {e2e['cached']:.1f} ms   naive {e2e['naive']:.1f} "
              f"ms   naive/cached x{e2e['naive_over_cached']}")
        print("  peak memory          " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                    result["peak_memory"].items()))
    out = args.out or Path("benchmarks/results") / f"inference-{device.type}.json"
    from keyseg.io import atomic_write_json

    atomic_write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
