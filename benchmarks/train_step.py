"""Training-step throughput and peak memory (not a test).

    python benchmarks/train_step.py                       # tiny config on this machine's CPU
    python benchmarks/train_step.py --model 7b            # LLaVA-7B + SAM ViT-H shapes (GPU)
    python benchmarks/train_step.py --model 7b --llm-layers 2 --vision-layers 2 --sam tiny
                                                          # 7B widths, few layers: a CPU smoke run

``7b`` builds LISA-7B-v1's shapes with random weights directly on the device (no download):
LLaMA-7B (4096 wide, 32 layers, vocabulary 32004), CLIP ViT-L/14 at 224 px (256 image tokens),
a linear projector, SAM ViT-H (1024 px). The step is the real one (``keyseg.train.train_step``:
forward, all losses, backward, clipping, AdamW) with the run's precision; frozen weights are in
the compute dtype as in training. Prints samples/s and peak memory and writes a JSON naming the
device (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_7b(cfg, llm_layers: int, vision_layers: int, sam_preset: str, vocab: int = 32004):
    """A random KeySegModel with LISA-7B-v1's shapes (built in fp32 on the default device)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from keyseg.model.backbone import apply_projector, num_image_tokens
    from keyseg.model.keyseg import KeySegModel
    from keyseg.model.sam import SamSegmenter
    from keyseg.model.tiny import build_tiny_tokenizer
    from keyseg.processor import KeySegProcessor

    tokenizer = build_tiny_tokenizer()
    text = LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=llm_layers, num_attention_heads=32,
                       num_key_value_heads=32, max_position_embeddings=2048,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=vision_layers, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    image_token = tokenizer.convert_tokens_to_ids(cfg.model.backbone.image_token)
    llava = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token,
                        vision_feature_layer=-2, vision_feature_select_strategy="default",
                        image_seq_length=256)
    vlm = apply_projector(LlavaForConditionalGeneration(llava), cfg.model.backbone)
    sam = SamSegmenter.from_preset(sam_preset, prompt_dim=cfg.model.fusion.dim)
    processor = KeySegProcessor(
        tokenizer, CLIPImageProcessor(size={"shortest_edge": 224},
                                      crop_size={"height": 224, "width": 224}),
        cfg.model.backbone, num_image_tokens=num_image_tokens(vlm.config),
        sam_image_size=sam.image_size)
    # The tiny tokenizer's ids all lie below the 7B vocabulary: no embedding resize needed.
    return KeySegModel.from_parts(cfg.model, vlm, sam, processor)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-test.yaml"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: fp32 for tiny, bf16 for 7b")
    parser.add_argument("--llm-layers", type=int, default=32)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--sam", default="vit_h", help="SAM preset for --model 7b")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from keyseg.config import load_config
    from keyseg.data.datasets import build_mixture
    from keyseg.model.trainable import apply_lora, configure_trainable
    from keyseg.train import (
        Hooks,
        MicroBatches,
        TrainState,
        build_model,
        build_optimizer,
        build_scheduler,
        enable_gradient_checkpointing,
        train_step,
    )

    precision = args.precision or ("fp32" if args.model == "tiny" else "bf16")
    cfg = load_config(args.config, [
        f"train.precision={precision}", f"train.batch_size={args.batch_size}",
        "train.grad_accumulation=1", f"train.gradient_checkpointing={not args.no_checkpointing}",
        "data.num_workers=0"])
    if args.model == "7b":
        backbone = dataclasses.replace(cfg.model.backbone, projector="linear")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone),
                                  data=dataclasses.replace(cfg.data, shapes=dataclasses.replace(
                                      cfg.data.shapes, image_size=192)))
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_steps=1)
    device = accelerator.device
    torch.manual_seed(0)
    if args.model == "tiny":
        model = build_model(cfg, accelerator)
    else:
        with device:  # random weights straight on the device
            model = build_7b(cfg, args.llm_layers, args.vision_layers, args.sam)
        apply_lora(model, cfg.model.lora)
        configure_trainable(model, cfg.model.trainable)
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        for param in model.parameters():
            if compute is not None and not param.requires_grad:
                param.data = param.data.to(compute)
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    batches = MicroBatches(build_mixture(cfg.data, seed=0), model.processor, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    micro = batches.loader(0, args.steps + 2)
    state, hooks = TrainState(model, optimizer, scheduler), Hooks()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # warm-up (allocator, kernels)
        train_step(accelerator, state, micro, cfg.train, hooks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, rows0, tokens0 = time.perf_counter(), state.samples_seen, state.tokens_seen
    for _ in range(args.steps):
        train_step(accelerator, state, micro, cfg.train, hooks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = {
        "model": args.model, "device": str(device), "device_name": name,
        "precision": precision, "batch_size": args.batch_size, "steps": args.steps,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "llm_layers": args.llm_layers if args.model == "7b" else None,
        "samples_per_s": (state.samples_seen - rows0) / seconds,
        "tokens_per_s": (state.tokens_seen - tokens0) / seconds,
        "seconds_per_step": seconds / args.steps,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda"
        else "process max RSS",
        "parameters": sum(p.numel() for p in model.parameters()), "trainable": trainable,
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
