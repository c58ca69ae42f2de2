"""Official SAM 2 / 2.1 checkpoints (``sam2.1_hiera_*.pt``) -> transformers ``Sam2Model``
(via :class:`keyseg.model.sam2.Sam2Segmenter`).

The official file is ``{"model": state_dict}`` of the whole video model (``SAM2Base``):

* ``image_encoder.trunk.*`` (Hiera) and ``image_encoder.neck.convs.N.conv.*`` (FPN),
* ``sam_prompt_encoder.*`` and ``sam_mask_decoder.*`` (SAM's prompt encoder and a mask
  decoder with ``conv_s0`` / ``conv_s1`` for high-resolution features and an object-score
  head),
* ``no_mem_embed`` (the single-image "no memory" token),
* the video-tracking parts: ``memory_attention.*``, ``memory_encoder.*``,
  ``maskmem_tpos_enc``, ``no_mem_pos_enc``, ``no_obj_ptr``, ``obj_ptr_proj.*``,
  ``obj_ptr_tpos_proj.*``, ``mask_downsample.*``, ``no_obj_embed_spatial`` (2.1).

Every image-path tensor is renamed by exactly one rule of :data:`SAM2_KEY_RULES` (no value
changes); the four ``point_embeddings.N`` rows are stacked into ``point_embed.weight``
(:data:`STACKED_TARGETS`); the Fourier matrix fills both of ``Sam2Model``'s copies
(:data:`DERIVED_TARGETS`); video-only tensors are listed in the report as ignored (KeySeg
segments single images), never silently dropped. Anything else is reported and refused,
like :mod:`keyseg.convert.sam`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from keyseg.convert.sam import ConversionReport, check_against_target, load_official
from keyseg.model.sam2 import SAM2_PRESETS, Sam2Segmenter, sam2_config

_N = r"(\d+)"
_MLP3 = (("0", "proj_in"), ("1", "layers.0"), ("2", "proj_out"))  # 3-layer MLP heads

SAM2_KEY_RULES: tuple[tuple[str, str], ...] = (
    # --- Hiera trunk ----------------------------------------------------------------------
    (r"image_encoder\.trunk\.(pos_embed|pos_embed_window)", r"vision_encoder.backbone.\1"),
    (r"image_encoder\.trunk\.patch_embed\.proj\.(weight|bias)",
     r"vision_encoder.backbone.patch_embed.projection.\1"),
    (rf"image_encoder\.trunk\.blocks\.{_N}\.norm([12])\.(weight|bias)",
     r"vision_encoder.backbone.blocks.\1.layer_norm\2.\3"),
    (rf"image_encoder\.trunk\.blocks\.{_N}\.attn\.(qkv|proj)\.(weight|bias)",
     r"vision_encoder.backbone.blocks.\1.attn.\2.\3"),
    (rf"image_encoder\.trunk\.blocks\.{_N}\.mlp\.layers\.0\.(weight|bias)",
     r"vision_encoder.backbone.blocks.\1.mlp.proj_in.\2"),
    (rf"image_encoder\.trunk\.blocks\.{_N}\.mlp\.layers\.1\.(weight|bias)",
     r"vision_encoder.backbone.blocks.\1.mlp.proj_out.\2"),
    # the stage-changing block's skip projection (dim -> dim_out)
    (rf"image_encoder\.trunk\.blocks\.{_N}\.proj\.(weight|bias)",
     r"vision_encoder.backbone.blocks.\1.proj.\2"),
    # --- FPN neck -------------------------------------------------------------------------
    (rf"image_encoder\.neck\.convs\.{_N}\.conv\.(weight|bias)",
     r"vision_encoder.neck.convs.\1.\2"),
    # --- prompt encoder -------------------------------------------------------------------
    (r"sam_prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
     r"prompt_encoder.shared_embedding.positional_embedding"),
    (r"sam_prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight",
     r"prompt_encoder.\1.weight"),
    # mask_downscaling = Sequential(conv, LN2d, GELU, conv, LN2d, GELU, conv): 0,1,3,4,6
    (r"sam_prompt_encoder\.mask_downscaling\.0\.(weight|bias)",
     r"prompt_encoder.mask_embed.conv1.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.1\.(weight|bias)",
     r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.3\.(weight|bias)",
     r"prompt_encoder.mask_embed.conv2.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.4\.(weight|bias)",
     r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (r"sam_prompt_encoder\.mask_downscaling\.6\.(weight|bias)",
     r"prompt_encoder.mask_embed.conv3.\1"),
    # --- mask decoder: two-way transformer (out_proj -> o_proj, MLP layers -> proj_in/out)
    (rf"sam_mask_decoder\.transformer\.layers\.{_N}\."
     r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\."
     r"(q_proj|k_proj|v_proj)\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.\2.\3.\4"),
    (rf"sam_mask_decoder\.transformer\.layers\.{_N}\."
     r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.out_proj\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.\2.o_proj.\3"),
    (rf"sam_mask_decoder\.transformer\.layers\.{_N}\.norm([1-4])\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    (rf"sam_mask_decoder\.transformer\.layers\.{_N}\.mlp\.layers\.0\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2"),
    (rf"sam_mask_decoder\.transformer\.layers\.{_N}\.mlp\.layers\.1\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2"),
    (r"sam_mask_decoder\.transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj)\."
     r"(weight|bias)",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.\2"),
    (r"sam_mask_decoder\.transformer\.final_attn_token_to_image\.out_proj\.(weight|bias)",
     r"mask_decoder.transformer.final_attn_token_to_image.o_proj.\1"),
    (r"sam_mask_decoder\.transformer\.norm_final_attn\.(weight|bias)",
     r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    # --- mask decoder: tokens, upscaling, high-res projections, heads --------------------
    (r"sam_mask_decoder\.(iou_token|mask_tokens|obj_score_token)\.weight",
     r"mask_decoder.\1.weight"),
    # output_upscaling = Sequential(convT, LN2d, GELU, convT, GELU): 0,1,3
    (r"sam_mask_decoder\.output_upscaling\.0\.(weight|bias)", r"mask_decoder.upscale_conv1.\1"),
    (r"sam_mask_decoder\.output_upscaling\.1\.(weight|bias)",
     r"mask_decoder.upscale_layer_norm.\1"),
    (r"sam_mask_decoder\.output_upscaling\.3\.(weight|bias)", r"mask_decoder.upscale_conv2.\1"),
    (r"sam_mask_decoder\.(conv_s0|conv_s1)\.(weight|bias)", r"mask_decoder.\1.\2"),
    *(
        (rf"sam_mask_decoder\.(output_hypernetworks_mlps\.{_N}|iou_prediction_head|"
         rf"pred_obj_score_head)\.layers\.{index}\.(weight|bias)",
         rf"mask_decoder.\1.{name}.\3")
        for index, name in _MLP3
    ),
    # --- single-image memory stand-in -----------------------------------------------------
    (r"no_mem_embed", r"no_memory_embedding"),
)

#: Official tensors of SAM 2's video tracking (memory bank, object pointers), not used on a
#: single image: reported as ignored.
VIDEO_ONLY_PATTERNS: tuple[str, ...] = (
    r"memory_attention\..+",
    r"memory_encoder\..+",
    r"maskmem_tpos_enc",
    r"no_mem_pos_enc",
    r"no_obj_ptr",
    r"obj_ptr_proj\..+",
    r"obj_ptr_tpos_proj\..+",
    r"mask_downsample\..+",
    r"no_obj_embed_spatial",
)

#: target -> official sources, concatenated along dim 0 in this order.
STACKED_TARGETS: dict[str, tuple[str, ...]] = {
    "prompt_encoder.point_embed.weight": tuple(
        f"sam_prompt_encoder.point_embeddings.{i}.weight" for i in range(4)
    ),
}

#: ``Sam2Model`` keeps the random-Fourier matrix twice (untied); the checkpoint has it once.
DERIVED_TARGETS: dict[str, str] = {
    "shared_image_embedding.positional_embedding":
        "prompt_encoder.shared_embedding.positional_embedding",
}

_COMPILED = tuple((re.compile(p), t) for p, t in SAM2_KEY_RULES)
_VIDEO = tuple(re.compile(p) for p in VIDEO_ONLY_PATTERNS)
_STACKED_SOURCES = {src: target for target, srcs in STACKED_TARGETS.items() for src in srcs}


def official_sam2_to_hf_key(name: str) -> str | None:
    """The ``Sam2Model`` name of one official image-path tensor, or None."""
    for pattern, template in _COMPILED:
        match = pattern.fullmatch(name)
        if match is not None:
            return match.expand(template)
    return None


def is_video_only(name: str) -> bool:
    """True for an official tensor of the video-tracking parts (see :data:`VIDEO_ONLY_PATTERNS`)."""
    return any(pattern.fullmatch(name) for pattern in _VIDEO)


def convert_sam2_state_dict(
    src: Mapping[str, Tensor],
    target: Mapping[str, Tensor] | torch.nn.Module | None = None,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Rename an official SAM 2 state dict to ``Sam2Model`` keys.

    Args:
        src: official names -> tensors (meta tensors work).
        target: a ``Sam2Model`` (or a state dict) to check names and shapes against.

    Returns:
        ``(converted, report)``; ``report.ignored`` lists the video-only tensors.
    """
    report = ConversionReport()
    converted: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    stacked: dict[str, dict[str, Tensor]] = {t: {} for t in STACKED_TARGETS}
    for name, tensor in src.items():
        if name in _STACKED_SOURCES:
            stacked[_STACKED_SOURCES[name]][name] = tensor
            report.mapped[name] = _STACKED_SOURCES[name]
            continue
        new_name = official_sam2_to_hf_key(name)
        if new_name is None:
            (report.ignored if is_video_only(name) else report.unused_source).append(name)
            continue
        if new_name in converted:
            report.duplicates.append((name, new_name))
            continue
        converted[new_name] = tensor
        origin[new_name] = name
        report.mapped[name] = new_name
    for target_name, sources in STACKED_TARGETS.items():
        parts = stacked[target_name]
        if len(parts) == len(sources):
            converted[target_name] = torch.cat([parts[s].reshape(1, -1) for s in sources])
            origin[target_name] = sources[0]
        # a partial set leaves the target unset (reported below when a target is given)
    for derived, from_name in DERIVED_TARGETS.items():
        if from_name in converted:
            # a copy: the two are separate parameters in Sam2Model (untied), and shared
            # storage would be refused by safetensors on save
            converted[derived] = converted[from_name].clone()
            origin[derived] = origin[from_name]
            report.derived[derived] = from_name

    if target is not None:
        check_against_target(converted, origin, target, report)
    return converted, report


def infer_sam2_preset(src: Mapping[str, Tensor]) -> str | None:
    """The preset whose Hiera width and depth match an official state dict, if any."""
    patch = src.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch is None:
        return None
    depth = 1 + max(
        (int(m.group(1)) for k in src
         if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))),
        default=-1,
    )
    for name in SAM2_PRESETS:
        backbone = sam2_config(name).vision_config.backbone_config
        if (backbone.hidden_size, sum(backbone.blocks_per_stage)) == (patch.shape[0], depth):
            return name
    return None


def load_official_sam2(path: str | os.PathLike[str],
                       preset: str | None = None) -> Sam2Segmenter:
    """A :class:`Sam2Segmenter` from an official ``sam2(.1)_hiera_*.pt`` file.

    Args:
        path: the ``.pt`` (``{"model": state_dict}``, read with ``weights_only=True``) or a
            ``.safetensors`` with the same names.
        preset: a key of :data:`keyseg.model.sam2.SAM2_PRESETS`; None infers it.

    Raises:
        KeySegCheckpointError: unreadable file, unknown size, or any tensor that does not
            land exactly (names the file and the first offending tensor).
    """
    return load_official(path, preset, family="SAM2", unwrap=True, infer=infer_sam2_preset,
                         presets=SAM2_PRESETS, segmenter=Sam2Segmenter,
                         convert=convert_sam2_state_dict)
