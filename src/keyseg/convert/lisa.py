"""LISA HF checkpoints (LLaVA-v1 LLaMA layout) -> a KeySeg model directory.

Source layout (SPEC §7; e.g. ``LISA-7B-v1``)::

    model.embed_tokens.weight                      (V, H)  V from the file, never assumed
    model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight
    model.layers.N.{input,post_attention}_layernorm.weight
    model.layers.N.self_attn.rotary_emb.inv_freq   (old transformers; ignored, recomputed)
    model.norm.weight, lm_head.weight              (V, H)
    model.mm_projector.{weight,bias}               LLaVA-v1's single Linear(1024, H)
    model.vision_tower[.vision_tower].vision_model.*   usually absent: LISA's export drops it;
                                                   then CLIP comes from ``mm_vision_tower``
    model.visual_model.{image_encoder,prompt_encoder,mask_decoder}.*   SAM, official names
    model.text_hidden_fcs.0.{0,2}.{weight,bias}    Linear(H,H), Linear(H,256)

Targets are :class:`keyseg.model.keyseg.KeySegModel` state-dict names; the renames are the
explicit rules of :data:`LISA_KEY_RULES` (SAM goes through
:func:`keyseg.convert.sam.convert_sam_state_dict` after the prefix is stripped). Tensors in
:data:`LISA_IGNORED` are listed as ignored with the reason; KeySeg's own heads, which LISA
does not have (:data:`FRESH_TARGETS`), keep their initialisation and are listed as such. The
embeddings keep every LISA row (so ``[SEG]`` keeps its trained row and id from the saved
tokenizer); ``[KEY]`` (and ``<image>``, which LLaVA-v1 never stored as a token) get new rows
initialised to the mean row.

The LLaVA-v1 behaviour is reproduced by the config written beside the weights: projector
``linear``, ``use_im_start_end`` from ``mm_use_im_start_end``, image features from
``mm_vision_select_layer`` (-2) with CLS dropped (strategy ``default``), llava_v1 template.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import torch
from torch import Tensor

from keyseg import tokens
from keyseg.config import ModelConfig
from keyseg.convert.checkpoint_io import Checkpoint, read_checkpoint
from keyseg.errors import KeySegCheckpointError

LM = "backbone.vlm.model.language_model."
VISION = "backbone.vlm.model.vision_tower."
SAM_PREFIX = "model.visual_model."
_N = r"(\d+)"

# (LISA-name regex, KeySeg-name template); full match, first wins.
LISA_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"model\.embed_tokens\.weight", LM + "embed_tokens.weight"),
    (rf"model\.layers\.{_N}\.self_attn\.([qkvo]_proj)\.weight",
     LM + r"layers.\1.self_attn.\2.weight"),
    (rf"model\.layers\.{_N}\.mlp\.(gate_proj|up_proj|down_proj)\.weight",
     LM + r"layers.\1.mlp.\2.weight"),
    (rf"model\.layers\.{_N}\.(input_layernorm|post_attention_layernorm)\.weight",
     LM + r"layers.\1.\2.weight"),
    (r"model\.norm\.weight", LM + "norm.weight"),
    (r"lm_head\.weight", "backbone.vlm.lm_head.weight"),
    # LLaVA-v1: one Linear; keyseg.model.backbone.LinearProjector names it .linear
    (r"model\.mm_projector\.(weight|bias)", r"backbone.vlm.model.multi_modal_projector.linear.\1"),
    # LLaVA's CLIPVisionTower wraps CLIPVisionModel (.vision_tower.vision_model.*)
    (r"model\.vision_tower\.(?:vision_tower\.)?vision_model\.(.+)", VISION + r"\1"),
    (r"model\.text_hidden_fcs\.0\.([02])\.(weight|bias)", r"text_hidden_fcs.\1.\2"),
)

# Source tensors deliberately not used: regex -> reason.
LISA_IGNORED: dict[str, str] = {
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq": "rotary table, recomputed from config",
    r"model\.vision_tower\.(?:vision_tower\.)?vision_model\.embeddings\.position_ids":
        "index buffer, recomputed",
}

# A CLIP tower directory (HF CLIPVisionModel or CLIPModel) -> our vision tower.
CLIP_KEY_RULES: tuple[tuple[str, str], ...] = (
    (r"vision_model\.(.+)", VISION + r"\1"),  # hub CLIPModel / older CLIPVisionModel files
    (r"((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..+)", VISION + r"\1"),  # v5 files
)
CLIP_IGNORED: dict[str, str] = {
    r"text_model\..*": "CLIP text encoder, not part of LLaVA",
    r"(text|visual)_projection\.weight": "CLIP contrastive heads, not used by LLaVA",
    r"logit_scale": "CLIP contrastive temperature",
    r"(vision_model\.)?embeddings\.position_ids": "index buffer, recomputed",
}

# KeySeg heads a LISA checkpoint does not have: they keep their fresh initialisation.
FRESH_TARGETS: tuple[str, ...] = ("keyword_fusion.", "embedding_table_proj.",
                                  "keyword_text_proj.")

EMBEDDING_TARGETS = (LM + "embed_tokens.weight", "backbone.vlm.lm_head.weight")


def _compile(rules):
    return tuple((re.compile(p), t) for p, t in rules)


_LISA = _compile(LISA_KEY_RULES)
_CLIP = _compile(CLIP_KEY_RULES)


def rename(name: str, rules) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match is not None:
            return match.expand(template)
    return None


def _ignored(name: str, table: Mapping[str, str]) -> str | None:
    for pattern, reason in table.items():
        if re.fullmatch(pattern, name):
            return reason
    return None


@dataclass
class LisaConversionReport:
    """What a LISA/KeySeg-reference conversion did.

    Attributes:
        mapped: source -> target for every renamed tensor.
        ignored: source -> reason, for tensors deliberately left out.
        fresh: targets kept at their initialisation (KeySeg heads LISA does not have).
        new_token_rows: token -> id, embedding rows initialised to the mean row.
        unused_source: source names no rule or ignore entry covers.
        unset_target: targets that received nothing (and are not fresh).
        shape_mismatches: ``(source, target, source_shape, target_shape)``.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    new_token_rows: dict[str, int] = field(default_factory=dict)
    unused_source: list[str] = field(default_factory=list)
    unset_target: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )

    @property
    def ok(self) -> bool:
        return not (self.unused_source or self.unset_target or self.shape_mismatches)

    def summary(self) -> str:
        return (f"{len(self.mapped)} mapped, {len(self.ignored)} ignored, {len(self.fresh)} "
                f"fresh, {len(self.new_token_rows)} new token rows, "
                f"{len(self.unused_source)} unused, {len(self.unset_target)} unset, "
                f"{len(self.shape_mismatches)} shape mismatches")


@dataclass
class SourceTensors:
    """Source tensors from one or more checkpoints, with where each came from."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)

    def add(self, checkpoint: Checkpoint, rename_fn: Callable[[str], str] = lambda n: n) -> None:
        for name, tensor in checkpoint.tensors.items():
            self.tensors[rename_fn(name)] = tensor
            self.where[rename_fn(name)] = checkpoint.where(name)


def map_state(
    source: SourceTensors,
    target: Mapping[str, Tensor],
    rules,
    ignored: Mapping[str, str],
    fresh_prefixes: tuple[str, ...],
    report: LisaConversionReport,
) -> dict[str, Tensor]:
    """Rename ``source`` onto ``target`` names (SAM handled separately by the caller).

    Embedding tables may have fewer rows than the target (new tokens); everything else
    must match exactly. Problems go into ``report``; nothing is raised here.
    """
    from keyseg.convert.sam import convert_sam_state_dict

    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    derived: set[str] = set()  # tied SAM copies: a mismatch is reported under the origin
    sam_src = {}
    for name, tensor in source.tensors.items():
        if name.startswith(SAM_PREFIX):
            sam_src[name[len(SAM_PREFIX):]] = tensor
            continue
        reason = _ignored(name, ignored)
        if reason is not None:
            report.ignored[name] = reason
            continue
        new = rename(name, rules)
        if new is None or new not in target:
            report.unused_source.append(name)
            continue
        converted[new] = tensor
        origin[new] = name
        report.mapped[name] = new
    if sam_src:
        sam_target = {k[len("sam.sam."):]: v for k, v in target.items() if k.startswith("sam.sam.")}
        sam_converted, sam_report = convert_sam_state_dict(sam_src, sam_target)
        report.unused_source += [SAM_PREFIX + n for n in sam_report.unused_source]
        for src, dst, s_shape, t_shape in sam_report.shape_mismatches:
            report.shape_mismatches.append((SAM_PREFIX + src, "sam.sam." + dst, s_shape, t_shape))
        for src, dst in sam_report.mapped.items():
            report.mapped[SAM_PREFIX + src] = "sam.sam." + dst
        derived = {"sam.sam." + name for name in sam_report.derived}
        # Their mismatches are all in sam_report (same targets), so no origin is needed.
        for name, tensor in sam_converted.items():
            converted["sam.sam." + name] = tensor
    for name, expected in target.items():
        if name not in converted:
            if name.startswith(fresh_prefixes):
                report.fresh.append(name)
            else:
                report.unset_target.append(name)
            continue
        got = tuple(converted[name].shape)
        want = tuple(expected.shape)
        ok = got == want or (name in EMBEDDING_TARGETS and len(got) == 2
                             and got[1] == want[1] and got[0] <= want[0])
        if not ok and name not in derived and not any(
                m[1] == name for m in report.shape_mismatches):
            report.shape_mismatches.append((origin[name], name, got, want))
    return converted


def first_problem(report: LisaConversionReport, source: SourceTensors) -> str | None:
    """One line naming the file and first offending tensor, or None when ``report.ok``."""
    if report.shape_mismatches:
        src, dst, got, want = report.shape_mismatches[0]
        return (f"{source.where.get(src, src)}: shape {list(got)} does not fit the model's "
                f"{dst} {list(want)} (config.json and weights disagree?)")
    if report.unused_source:
        name = report.unused_source[0]
        return (f"{source.where.get(name, name)}: unexpected tensor "
                f"({len(report.unused_source)} unused; not a LISA/KeySeg checkpoint?)")
    if report.unset_target:
        return (f"no source tensor for the model's {report.unset_target[0]} "
                f"({len(report.unset_target)} missing; truncated checkpoint or missing shard?)")
    return None


# --- config -------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeySegCheckpointError(f"{path}: missing") from None
    except ValueError as error:
        raise KeySegCheckpointError(f"{path}: not valid JSON ({error})") from error


def llama_text_config(cfg: dict, vocab_size: int, pad_token_id: int | None):
    """LlamaConfig from a LLaVA-LLaMA ``config.json`` (vocabulary from the embedding shape)."""
    from transformers import LlamaConfig

    heads = cfg["num_attention_heads"]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        hidden_act=cfg.get("hidden_act", "silu"),
        rope_parameters={"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)},
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def clip_vision_config(tower_dir: Path | None, vision_state: Mapping[str, Tensor]):
    """CLIPVisionConfig from the tower directory's config.json (CLIPModel or
    CLIPVisionModel), else inferred from the tensor shapes (64-dim heads, as every CLIP
    ViT)."""
    from transformers import CLIPVisionConfig

    if tower_dir is not None and (tower_dir / "config.json").is_file():
        data = read_json(tower_dir / "config.json")
        data = data.get("vision_config", data)
        data = {k: v for k, v in data.items() if k not in ("model_type", "architectures")}
        return CLIPVisionConfig(**data)
    patch = vision_state.get(VISION + "embeddings.patch_embedding.weight")
    positions = vision_state.get(VISION + "embeddings.position_embedding.weight")
    fc1 = vision_state.get(VISION + "encoder.layers.0.mlp.fc1.weight")
    if patch is None or positions is None or fc1 is None:
        raise KeySegCheckpointError("cannot infer the CLIP vision config: no tower config.json "
                                    "and the tower tensors are incomplete")
    layers = 1 + max(int(m.group(1)) for k in vision_state
                     if (m := re.match(re.escape(VISION) + r"encoder\.layers\.(\d+)\.", k)))
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = round((positions.shape[0] - 1) ** 0.5)
    return CLIPVisionConfig(hidden_size=width, intermediate_size=fc1.shape[0],
                            num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
                            image_size=grid * patch_size, patch_size=patch_size,
                            hidden_act="quick_gelu")


def clip_image_processor(tower_dir: Path | None, image_size: int):
    """CLIP preprocessing (PIL, no torchvision): the tower's preprocessor_config.json if
    present, else CLIP defaults at ``image_size`` (resize shortest side, centre crop)."""
    from transformers import CLIPImageProcessorPil

    if tower_dir is not None and (tower_dir / "preprocessor_config.json").is_file():
        data = read_json(tower_dir / "preprocessor_config.json")
        keep = ("size", "crop_size", "image_mean", "image_std", "do_center_crop", "do_resize",
                "do_normalize", "do_rescale", "rescale_factor", "do_convert_rgb")
        kwargs = {k: data[k] for k in keep if k in data}
        if isinstance(kwargs.get("crop_size"), int):
            kwargs["crop_size"] = {"height": kwargs["crop_size"], "width": kwargs["crop_size"]}
        if isinstance(kwargs.get("size"), int):
            kwargs["size"] = {"shortest_edge": kwargs["size"]}
        return CLIPImageProcessorPil(**kwargs)
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def find_vision_tower(src: Path, cfg: dict, vision_tower: str | os.PathLike | None) -> Path | None:
    """The local CLIP directory: ``--vision-tower``, else ``mm_vision_tower`` if it is a local
    directory (absolute or relative to SRC), else ``SRC/vision_tower``; None if none exists."""
    candidates = []
    if vision_tower is not None:
        path = Path(vision_tower)
        if not path.is_dir():
            raise KeySegCheckpointError(f"{path}: vision tower directory not found")
        return path
    named = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if named:
        candidates += [Path(named), src / named]
    candidates.append(src / "vision_tower")
    for path in candidates:
        if path.is_dir():
            return path
    return None


def load_saved_tokenizer(directory: Path):
    """The tokenizer saved in ``directory``. LISA-7B-v1 ships only a SentencePiece
    ``tokenizer.model`` (no ``tokenizer.json``), which transformers converts with the
    sentencepiece and protobuf packages: a missing one is named in one line."""
    from transformers import AutoTokenizer

    if (directory / "tokenizer.model").is_file() and not (directory / "tokenizer.json").is_file():
        missing = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
        if missing:
            names = " and ".join(m.split(".")[-1] for m in missing)
            raise KeySegCheckpointError(
                f"{directory / 'tokenizer.model'}: reading a SentencePiece tokenizer needs "
                f"{names} (pip install sentencepiece protobuf)")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as error:
        raise KeySegCheckpointError(
            f"{directory}: cannot load the saved tokenizer ({type(error).__name__}: {error})"
            .splitlines()[0]) from error


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --- conversion ---------------------------------------------------------------------------


def convert_lisa(
    src: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    extra_rules: tuple[tuple[str, str], ...] = (),
    extra_ignored: Mapping[str, str] | None = None,
    fresh_targets: tuple[str, ...] = FRESH_TARGETS,
    checkpoint: Checkpoint | None = None,
    config_dir: str | os.PathLike | None = None,
    progress: bool = False,
    configure: Callable[[ModelConfig], ModelConfig] | None = None,
):
    """Build a :class:`KeySegModel` from a LISA checkpoint directory.

    Args:
        src: the LISA directory (``config.json``, tokenizer files, weights sharded or not).
        vision_tower: local CLIP directory when the checkpoint lacks the tower's weights
            (default: ``mm_vision_tower`` from the config if it is a local directory).
        dtype: dtype of the built model (default: fp32).
        extra_rules / extra_ignored / fresh_targets: used by the KeySeg-reference converter.
        checkpoint: already-read tensors (else read from ``src``).
        config_dir: where ``config.json`` and the tokenizer live (default: ``src``).
        configure: adjusts the model config read from the checkpoint before the model is
            built (the KeySeg-reference converter sets the fusion's inner width there).

    Returns:
        ``(model, report)``.

    Raises:
        KeySegCheckpointError: unreadable/missing files, unknown layout, a tensor of the
            wrong shape, a source tensor no rule covers or a model tensor left unset — naming
            the file and the first offending tensor.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from keyseg.config import BackboneConfig, SamSettings
    from keyseg.convert.sam import infer_sam_preset
    from keyseg.model.backbone import apply_projector, num_image_tokens
    from keyseg.model.keyseg import KeySegModel, skip_init
    from keyseg.model.sam import SamSegmenter
    from keyseg.processor import KeySegProcessor

    src = Path(src)
    config_dir = Path(config_dir) if config_dir is not None else src
    cfg = read_json(config_dir / "config.json")
    if "hidden_size" not in cfg or "num_hidden_layers" not in cfg:
        raise KeySegCheckpointError(
            f"{config_dir / 'config.json'}: not a LLaVA-LLaMA config (no hidden_size / "
            "num_hidden_layers)")
    ckpt = checkpoint or read_checkpoint(src, progress=progress)
    source = SourceTensors()
    source.add(ckpt)
    ckpt.tensors = {}  # `source` holds them now, and lets each go once it is loaded
    embed = source.tensors.get("model.embed_tokens.weight")
    if embed is None or "lm_head.weight" not in source.tensors:
        raise KeySegCheckpointError(
            f"{ckpt.source}: unknown layout: no model.embed_tokens.weight / lm_head.weight "
            "(expected a LISA / LLaVA-v1 LLaMA checkpoint)")
    if not any(k.startswith(SAM_PREFIX) for k in source.tensors):
        raise KeySegCheckpointError(
            f"{ckpt.source}: no SAM tensors under {SAM_PREFIX}* (not a LISA checkpoint?)")

    # --- tokenizer: [SEG] keeps its id; [KEY] (and <image>) are added --------------------
    tokenizer = load_saved_tokenizer(config_dir)
    if tokens.SEG_TOKEN not in tokenizer.get_vocab():
        raise KeySegCheckpointError(
            f"{config_dir}: the saved tokenizer has no {tokens.SEG_TOKEN} token "
            "(not a LISA tokenizer)")
    use_im = bool(cfg.get("mm_use_im_start_end", True))
    source_rows = embed.shape[0]
    new_tokens = tokens.add_special_tokens(tokenizer, "<image>", use_im)
    vocab = tokenizer.get_vocab()
    vocab_size = max(source_rows, len(tokenizer))

    # --- vision tower --------------------------------------------------------------------
    has_tower = any(rename(k, _LISA) and rename(k, _LISA).startswith(VISION)
                    for k in source.tensors if not _ignored(k, LISA_IGNORED))
    tower_dir = find_vision_tower(config_dir, cfg, vision_tower)
    if not has_tower:
        if tower_dir is None:
            named = cfg.get("mm_vision_tower", "openai/clip-vit-large-patch14")
            raise KeySegCheckpointError(
                f"{ckpt.source}: the checkpoint has no vision-tower weights (LISA's export drops "
                f"them) and mm_vision_tower={named!r} is not a local directory: download "
                f"{named} (CLIPVisionModel or CLIPModel files) into {config_dir / 'vision_tower'} "
                "or pass --vision-tower DIR")
        clip = read_checkpoint(tower_dir, progress=progress)
        for name, tensor in clip.tensors.items():
            reason = _ignored(name, CLIP_IGNORED)
            if reason is not None:
                source.tensors[f"[{tower_dir.name}] {name}"] = tensor
                source.where[f"[{tower_dir.name}] {name}"] = clip.where(name)
                continue
            new = rename(name, _CLIP)
            if new is None:
                raise KeySegCheckpointError(
                    f"{clip.where(name)}: unexpected tensor in the CLIP tower directory")
            # Give the tower tensor its LISA name so one rule table covers both sources.
            lisa_name = "model.vision_tower.vision_tower.vision_model." + new[len(VISION):]
            source.tensors[lisa_name] = tensor
            source.where[lisa_name] = clip.where(name)
    vision_state = {rename(k, _LISA): v for k, v in source.tensors.items()
                    if (rename(k, _LISA) or "").startswith(VISION)}
    vision_config = clip_vision_config(tower_dir, vision_state)
    del vision_state

    # --- target model (built without random init; KeySeg heads initialised) -------------
    sam_src = {k[len(SAM_PREFIX):]: v for k, v in source.tensors.items()
               if k.startswith(SAM_PREFIX)}
    sam_preset = infer_sam_preset(sam_src)
    del sam_src  # only references: the tensors are released as they are loaded below
    if sam_preset is None:
        raise KeySegCheckpointError(f"{ckpt.source}: cannot tell the SAM size from "
                                    f"{SAM_PREFIX}image_encoder.* (truncated checkpoint?)")
    out_dim = source.tensors.get("model.text_hidden_fcs.0.2.weight")
    prompt_dim = int(out_dim.shape[0]) if out_dim is not None else 256
    text_config = llama_text_config(cfg, vocab_size, tokenizer.pad_token_id)
    layer = cfg.get("mm_vision_select_layer", -2)
    llava_config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=vocab["<image>"],
        vision_feature_layer=layer,
        # LLaVA-v1 "patch" features: the CLS token is dropped
        vision_feature_select_strategy="default",
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
    )
    backbone_cfg = BackboneConfig(family="llava", preset="converted", use_im_start_end=use_im,
                                  projector="linear")
    model_cfg = ModelConfig(backbone=backbone_cfg, sam=SamSettings(preset=sam_preset))
    from dataclasses import replace

    model_cfg = replace(model_cfg, fusion=replace(model_cfg.fusion, dim=prompt_dim))
    if configure is not None:
        model_cfg = configure(model_cfg)
    with skip_init(dtype):
        vlm = apply_projector(LlavaForConditionalGeneration(llava_config), backbone_cfg)
        sam = SamSegmenter.from_preset(sam_preset, prompt_dim=prompt_dim)
    image_processor = clip_image_processor(tower_dir, vision_config.image_size)
    processor = KeySegProcessor(tokenizer, image_processor, backbone_cfg,
                                num_image_tokens(llava_config), sam.image_size)
    model = KeySegModel.from_parts(model_cfg, vlm, sam, processor)
    if dtype is not None:
        model = model.to(dtype)

    # --- map, check, load ----------------------------------------------------------------
    report = LisaConversionReport()
    ignored = {**LISA_IGNORED, **CLIP_IGNORED, **(extra_ignored or {})}
    ignored_named = {rf"\[[^\]]+\] {p}": r for p, r in CLIP_IGNORED.items()}
    target = model.state_dict()
    converted = map_state(source, target, _compile(extra_rules) + _LISA,
                          {**ignored, **ignored_named}, fresh_targets, report)
    problem = first_problem(report, source)
    if problem is not None:
        raise KeySegCheckpointError(problem)
    with torch.no_grad():
        for name in EMBEDDING_TARGETS:
            rows = converted.pop(name)
            table = target[name]
            table[: rows.shape[0]].copy_(rows)
            mean = rows.float().mean(0).to(table.dtype)
            for token in new_tokens:
                table[vocab[token]] = mean
            table[rows.shape[0]:] = mean
        # assign: the model's (never written) storage is dropped for the source tensors
        # themselves, in the model's dtype, so a 7B conversion holds one copy of the
        # weights, not two; each tensor is cast and then released one at a time.
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        origin_of = {target_name: name for name, target_name in report.mapped.items()}
        for name in list(converted):
            tensor = converted.pop(name)
            if name in own:
                tensor = tensor.to(own[name].dtype)
            model.load_state_dict({name: tensor}, strict=False, assign=True)
            source.tensors.pop(origin_of.get(name, ""), None)
    model.sam.tie_positional_encoding()  # assign replaced one side of the tie
    report.new_token_rows = {t: vocab[t] for t in new_tokens}
    return model, report
