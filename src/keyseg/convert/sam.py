"""Official segment-anything checkpoints -> transformers ``SamModel`` (via :class:`SamSegmenter`).

The official layout (``sam_vit_h_4b8939.pth``, SPEC §7) has three roots, ``image_encoder.*``,
``prompt_encoder.*`` and ``mask_decoder.*``; transformers names the same tensors
``vision_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*`` and keeps the prompt encoder's
random-Fourier matrix at the top level (``shared_image_embedding``). Every source name is
renamed by exactly one rule of :data:`SAM_KEY_RULES`; no tensor changes shape or value
(both sides keep the fused ``qkv`` projection and the decomposed ``rel_pos_h/w`` tables).

Anything a rule does not match, any model tensor left without a source, and any shape
mismatch is reported (:class:`ConversionReport`), and :func:`load_official_sam` refuses to
build a model from an incomplete conversion: no silent ``strict=False``.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from keyseg.convert.checkpoint_io import read_tensor_file
from keyseg.errors import KeySegCheckpointError
from keyseg.model.sam import SAM_PRESETS, SamSegmenter, sam_config

# (official-name regex, transformers-name template). Patterns are matched in full against a
# source key; the first match wins, and the table is written so at most one can match.
_N = r"(\d+)"
SAM_KEY_RULES: tuple[tuple[str, str], ...] = (
    # --- image encoder (ViT with windowed/global attention) -------------------------------
    (r"image_encoder\.pos_embed", r"vision_encoder.pos_embed"),
    (
        r"image_encoder\.patch_embed\.proj\.(weight|bias)",
        r"vision_encoder.patch_embed.projection.\1",
    ),
    # block norms: norm1/norm2 -> layer_norm1/layer_norm2
    (
        rf"image_encoder\.blocks\.{_N}\.norm([12])\.(weight|bias)",
        r"vision_encoder.layers.\1.layer_norm\2.\3",
    ),
    # fused qkv and output projection keep their layout (3*D x D), only the block is renamed
    (
        rf"image_encoder\.blocks\.{_N}\.attn\.(qkv|proj)\.(weight|bias)",
        r"vision_encoder.layers.\1.attn.\2.\3",
    ),
    # decomposed relative positions: (2*window-1, head_dim) or (2*grid-1, head_dim) for global
    (
        rf"image_encoder\.blocks\.{_N}\.attn\.rel_pos_([hw])",
        r"vision_encoder.layers.\1.attn.rel_pos_\2",
    ),
    (
        rf"image_encoder\.blocks\.{_N}\.mlp\.(lin[12])\.(weight|bias)",
        r"vision_encoder.layers.\1.mlp.\2.\3",
    ),
    # neck = Sequential(conv1x1, LayerNorm2d, conv3x3, LayerNorm2d), convs without bias
    (r"image_encoder\.neck\.0\.weight", r"vision_encoder.neck.conv1.weight"),
    (r"image_encoder\.neck\.1\.(weight|bias)", r"vision_encoder.neck.layer_norm1.\1"),
    (r"image_encoder\.neck\.2\.weight", r"vision_encoder.neck.conv2.weight"),
    (r"image_encoder\.neck\.3\.(weight|bias)", r"vision_encoder.neck.layer_norm2.\1"),
    # --- prompt encoder --------------------------------------------------------------------
    # The Fourier matrix lives at the top of SamModel (shared with the image-wide positional
    # encoding); prompt_encoder.shared_embedding is tied to it (see DERIVED_TARGETS).
    (
        r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
        r"shared_image_embedding.positional_embedding",
    ),
    (rf"prompt_encoder\.point_embeddings\.{_N}\.weight", r"prompt_encoder.point_embed.\1.weight"),
    (r"prompt_encoder\.not_a_point_embed\.weight", r"prompt_encoder.not_a_point_embed.weight"),
    (r"prompt_encoder\.no_mask_embed\.weight", r"prompt_encoder.no_mask_embed.weight"),
    # mask_downscaling = Sequential(conv, LN2d, GELU, conv, LN2d, GELU, conv): 0,1,3,4,6
    (r"prompt_encoder\.mask_downscaling\.0\.(weight|bias)", r"prompt_encoder.mask_embed.conv1.\1"),
    (
        r"prompt_encoder\.mask_downscaling\.1\.(weight|bias)",
        r"prompt_encoder.mask_embed.layer_norm1.\1",
    ),
    (r"prompt_encoder\.mask_downscaling\.3\.(weight|bias)", r"prompt_encoder.mask_embed.conv2.\1"),
    (
        r"prompt_encoder\.mask_downscaling\.4\.(weight|bias)",
        r"prompt_encoder.mask_embed.layer_norm2.\1",
    ),
    (r"prompt_encoder\.mask_downscaling\.6\.(weight|bias)", r"prompt_encoder.mask_embed.conv3.\1"),
    # --- mask decoder: two-way transformer -------------------------------------------------
    (
        rf"mask_decoder\.transformer\.layers\.{_N}\."
        r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
        r"(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.\2.\3.\4",
    ),
    (
        rf"mask_decoder\.transformer\.layers\.{_N}\.norm([1-4])\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.layer_norm\2.\3",
    ),
    (
        rf"mask_decoder\.transformer\.layers\.{_N}\.mlp\.(lin[12])\.(weight|bias)",
        r"mask_decoder.transformer.layers.\1.mlp.\2.\3",
    ),
    (
        r"mask_decoder\.transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|out_proj)\."
        r"(weight|bias)",
        r"mask_decoder.transformer.final_attn_token_to_image.\1.\2",
    ),
    (
        r"mask_decoder\.transformer\.norm_final_attn\.(weight|bias)",
        r"mask_decoder.transformer.layer_norm_final_attn.\1",
    ),
    # --- mask decoder: output tokens, upscaling, hypernetworks, IoU head ------------------
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    # output_upscaling = Sequential(convT, LN2d, GELU, convT, GELU): 0,1,3
    (r"mask_decoder\.output_upscaling\.0\.(weight|bias)", r"mask_decoder.upscale_conv1.\1"),
    (r"mask_decoder\.output_upscaling\.1\.(weight|bias)", r"mask_decoder.upscale_layer_norm.\1"),
    (r"mask_decoder\.output_upscaling\.3\.(weight|bias)", r"mask_decoder.upscale_conv2.\1"),
    # segment-anything's 3-layer MLP is layers.{0,1,2}; transformers' SamFeedForward names the
    # first and last Linear proj_in/proj_out and keeps the middle one as layers.0. SAM builds
    # every such MLP with depth 3 (keyseg.model.sam pins iou_head_depth=3 for that reason).
    (
        rf"mask_decoder\.(output_hypernetworks_mlps\.{_N}|iou_prediction_head)\.layers\.0\."
        r"(weight|bias)",
        r"mask_decoder.\1.proj_in.\3",
    ),
    (
        rf"mask_decoder\.(output_hypernetworks_mlps\.{_N}|iou_prediction_head)\.layers\.1\."
        r"(weight|bias)",
        r"mask_decoder.\1.layers.0.\3",
    ),
    (
        rf"mask_decoder\.(output_hypernetworks_mlps\.{_N}|iou_prediction_head)\.layers\.2\."
        r"(weight|bias)",
        r"mask_decoder.\1.proj_out.\3",
    ),
)

# Model tensors with no source of their own: target -> the target it is copied from, and why.
DERIVED_TARGETS: dict[str, str] = {
    # SamModel ties this parameter to shared_image_embedding (SamModel._tied_weights_keys);
    # segment-anything stores the matrix once, as prompt_encoder.pe_layer.*.
    "prompt_encoder.shared_embedding.positional_embedding": (
        "shared_image_embedding.positional_embedding"
    ),
}

_COMPILED_RULES = tuple((re.compile(pattern), template) for pattern, template in SAM_KEY_RULES)


def official_to_hf_key(name: str) -> str | None:
    """The transformers name of one official segment-anything tensor name, or None if unknown."""
    for pattern, template in _COMPILED_RULES:
        match = pattern.fullmatch(name)
        if match is not None:
            return match.expand(template)
    return None


@dataclass
class ConversionReport:
    """What a conversion did and did not do.

    Attributes:
        mapped: source name -> target name, for every source tensor a rule renamed.
        derived: target name -> target it was copied from (:data:`DERIVED_TARGETS`).
        unused_source: source names no rule matched, or (given a target) whose new name the
            target does not have.
        unset_target: target names (when a target was given) that received no tensor.
        shape_mismatches: ``(source, target, source_shape, target_shape)`` per mismatch.
        duplicates: ``(source, target)`` for a source renamed onto an already-filled target.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    unused_source: list[str] = field(default_factory=list)
    unset_target: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    # Source tensors deliberately left out (SAM 2's video-tracking parts); not a problem.
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every source tensor landed and (given a target) every target was set."""
        return not (
            self.unused_source or self.unset_target or self.shape_mismatches or self.duplicates
        )

    def first_problem(self) -> str | None:
        """One line naming the first offending tensor, or None when :attr:`ok`."""
        if self.shape_mismatches:
            src, dst, src_shape, dst_shape = self.shape_mismatches[0]
            return (
                f"tensor {src!r} has shape {list(src_shape)} but the model's {dst!r} "
                f"expects {list(dst_shape)} (wrong SAM size/preset?)"
            )
        if self.duplicates:
            src, dst = self.duplicates[0]
            return f"tensor {src!r} maps onto {dst!r}, which another tensor already filled"
        if self.unused_source:
            return (
                f"unexpected tensor {self.unused_source[0]!r} "
                f"({len(self.unused_source)} unused; not an official SAM checkpoint?)"
            )
        if self.unset_target:
            return (
                f"missing tensor for the model's {self.unset_target[0]!r} "
                f"({len(self.unset_target)} missing; truncated file or wrong preset?)"
            )
        return None

    def summary(self) -> str:
        return (
            f"{len(self.mapped)} mapped, {len(self.derived)} derived, "
            f"{len(self.unused_source)} unused, {len(self.unset_target)} unset, "
            f"{len(self.shape_mismatches)} shape mismatches, {len(self.duplicates)} duplicates"
            + (f", {len(self.ignored)} ignored (video-only)" if self.ignored else "")
        )


def convert_sam_state_dict(
    src: Mapping[str, Tensor],
    target: Mapping[str, Tensor] | torch.nn.Module | None = None,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename an official segment-anything state dict to transformers ``SamModel`` keys.

    Tensors are passed through unchanged (no copy); meta tensors work, so a whole ViT-H can
    be checked without memory. Nothing is raised here: problems go into the report.

    Args:
        src: official names (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``)
            -> tensors.
        target: a ``SamModel`` (or its state dict / any name -> tensor mapping) to check
            against; when given, the report lists unset targets and shape mismatches.

    Returns:
        ``(converted, report)``: ``converted`` maps ``SamModel`` state-dict names to tensors,
        including :data:`DERIVED_TARGETS` whose origin was converted.
    """
    report = ConversionReport()
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in src.items():
        new_name = official_to_hf_key(name)
        if new_name is None:
            report.unused_source.append(name)
            continue
        if new_name in converted:
            report.duplicates.append((name, new_name))
            continue
        converted[new_name] = tensor
        origin[new_name] = name
        report.mapped[name] = new_name
    for derived_name, from_name in DERIVED_TARGETS.items():
        if from_name in converted:
            converted[derived_name] = converted[from_name]
            origin[derived_name] = origin[from_name]
            report.derived[derived_name] = from_name

    if target is not None:
        check_against_target(converted, origin, target, report)
    return converted, report


def check_against_target(converted: Mapping[str, Tensor], origin: Mapping[str, str],
                         target: torch.nn.Module | Mapping[str, Tensor], report) -> None:
    """Fill ``report`` (``unset_target``, ``shape_mismatches``, ``unused_source``) by
    comparing converted tensors with the model's state dict (``target``: a module or its
    state dict); a derived tensor's problem is reported once, under its origin."""
    target_state = target.state_dict() if isinstance(target, torch.nn.Module) else target
    for name, expected in target_state.items():
        if name not in converted:
            report.unset_target.append(name)
        elif (tuple(converted[name].shape) != tuple(expected.shape)
              and name not in report.derived):
            report.shape_mismatches.append(
                (origin[name], name, tuple(converted[name].shape), tuple(expected.shape))
            )
    for name in converted:
        # Renamed fine but the model has no such tensor (e.g. a deeper checkpoint).
        if name not in target_state and name not in report.derived:
            report.unused_source.append(origin[name])


def infer_sam_preset(src: Mapping[str, Tensor]) -> str | None:
    """The preset whose image-encoder width and depth match an official state dict, if any."""
    patch = src.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    depth = 1 + max(
        (int(m.group(1)) for k in src if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))),
        default=-1,
    )
    for name in SAM_PRESETS:
        vision = sam_config(name).vision_config
        if (vision.hidden_size, vision.num_hidden_layers) == (patch.shape[0], depth):
            return name
    return None


def load_official_sam(path: str | os.PathLike[str], preset: str | None = "vit_h") -> SamSegmenter:
    """Build a :class:`SamSegmenter` from an official segment-anything checkpoint file.

    Args:
        path: ``sam_vit_h_4b8939.pth`` (or a ``.safetensors`` with the same names).
        preset: a key of :data:`keyseg.model.sam.SAM_PRESETS`; ``None`` infers it from the
            encoder's width and depth.

    Raises:
        KeySegCheckpointError: the file is missing or unreadable, or its tensors do not
            match the preset exactly (names the file and the first offending tensor).
    """
    # The official file is a plain state dict; a wrapped one is refused rather than guessed at.
    return load_official(path, preset, family="SAM", unwrap=False, infer=infer_sam_preset,
                         presets=SAM_PRESETS, segmenter=SamSegmenter,
                         convert=convert_sam_state_dict)


def load_official(path: str | os.PathLike[str], preset: str | None, *, family: str,
                  unwrap: bool, infer, presets: Mapping, segmenter, convert):
    """The loading both official layouts share: read the file (``weights_only``: a
    checkpoint from the internet must not be able to run code), infer the preset unless
    given, build the segmenter on the meta device (no random init that would be
    overwritten), convert strictly, install the tensors and re-tie what assign untied.

    Args:
        family: "SAM" / "SAM2", for messages; ``unwrap``: accept ``{"model": state}``.
        infer: state dict -> preset or None; ``presets``: the valid names, for messages.
        segmenter: the segmenter class (``from_preset``); ``convert``: ``(src, target) ->
            (converted, report)``.
    """
    path = Path(path)
    src = read_tensor_file(path, unwrap=unwrap)
    if preset is None:
        preset = infer(src)
        if preset is None:
            raise KeySegCheckpointError(
                f"{path}: cannot tell the {family} size from the tensors; pass a preset "
                f"({', '.join(presets)})"
            )
    with torch.device("meta"):
        built = segmenter.from_preset(preset)
    converted, report = convert(src, built.sam)
    if not report.ok:
        raise KeySegCheckpointError(f"{path}: {report.first_problem()} [preset {preset!r}]")
    built.sam.load_state_dict(converted, strict=True, assign=True)
    # assign=True installs two Parameters for a tied pair; restore the single shared one.
    built.tie_positional_encoding()
    return built


def save_sam(segmenter: SamSegmenter, dst_dir: str | os.PathLike[str]) -> Path:
    """Write a segmenter as an HF directory (``config.json`` + ``model.safetensors``).

    Files are written to a temporary directory next to ``dst_dir`` and moved in one by one
    with ``os.replace``, so a crash never leaves a half-written file under ``dst_dir``.
    The result loads with :func:`load_sam` (or ``SamModel.from_pretrained``).
    """
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        segmenter.sam.save_pretrained(tmp, safe_serialization=True)
        for item in sorted(tmp.iterdir()):
            os.replace(item, dst / item.name)
    finally:
        for item in tmp.iterdir():
            item.unlink()
        tmp.rmdir()
    return dst


#: The config fields that fix a SAM's tensor shapes, by sub-config: a pretrained SAM
#: directory must agree with ``model.sam.preset`` (at ``fusion.dim``) on all of them.
STRUCTURAL_FIELDS: dict[str, tuple[str, ...]] = {
    "vision_config": ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "window_size", "mlp_dim", "output_channels",
                      "global_attn_indexes"),
    "prompt_encoder_config": ("hidden_size", "image_size", "patch_size"),
    "mask_decoder_config": ("hidden_size", "num_hidden_layers", "num_attention_heads",
                            "mlp_dim", "iou_head_hidden_dim"),
}


def _plain(value):
    """JSON round trips turn tuples into lists: compare them as lists."""
    return list(value) if isinstance(value, tuple) else value


def config_mismatch(found, expected) -> str | None:
    """The first structural field on which two SAM configs differ, as
    ``"vision_config.image_size: 128, expected 192"``; None when they agree."""
    for sub, names in STRUCTURAL_FIELDS.items():
        for name in names:
            have, want = (_plain(getattr(getattr(config, sub), name, None))
                          for config in (found, expected))
            if have != want:
                return f"{sub}.{name}: {have}, expected {want}"
    return None


def load_sam(src_dir: str | os.PathLike[str], expected=None) -> SamSegmenter:
    """Load a SAM directory (``config.json`` + safetensors: :func:`save_sam`, or
    ``SamModel.save_pretrained`` as ``experiments/pretrain_sam.py`` writes it); local files
    only, no downloads.

    Args:
        expected: a ``SamConfig`` (e.g. ``sam_config(preset, prompt_dim=fusion.dim)``) the
            directory's must match on every shape-fixing field (:data:`STRUCTURAL_FIELDS`).

    Raises:
        KeySegCheckpointError: no config.json, an unreadable directory, or a SAM of another
            size than ``expected`` (one line naming the directory and the field).
    """
    from transformers import SamConfig, SamModel

    path = Path(src_dir)
    if not (path / "config.json").is_file():
        raise KeySegCheckpointError(f"{path}: not a converted SAM directory (no config.json)")
    try:
        if expected is not None:
            problem = config_mismatch(SamConfig.from_pretrained(path), expected)
            if problem:
                raise KeySegCheckpointError(
                    f"{path}: this SAM does not have the configured size ({problem})")
        model = SamModel.from_pretrained(path, local_files_only=True)
    except KeySegCheckpointError:
        raise
    except Exception as error:
        raise KeySegCheckpointError(
            f"{path}: cannot load SAM ({type(error).__name__}: {error})".splitlines()[0]
        ) from error
    segmenter = SamSegmenter(model)
    segmenter.tie_positional_encoding()
    return segmenter
