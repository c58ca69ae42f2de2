"""SAM 2 converter: every tensor of the official checkpoint layout lands (or is reported as
video-only), for all four released Hiera sizes; values go where the official modules put them.

The official key list is generated here from the official module tree of SAM 2
(``SAM2Base``: Hiera trunk + FpnNeck, SAM prompt encoder, mask decoder with ``conv_s0/s1``
and an object-score head, memory modules), with each tensor's shape derived from the
architecture numbers of the released configs, independently of the converter's rules.
"""

from __future__ import annotations

import pytest
import torch

from keyseg.convert.sam2 import convert_sam2_state_dict, infer_sam2_preset, load_official_sam2
from keyseg.errors import KeySegCheckpointError
from keyseg.model.sam2 import Sam2Segmenter

# name: (embed dims per stage, blocks per stage, background pos size, first window)
HIERA = {
    "hiera_tiny": ((96, 192, 384, 768), (1, 2, 7, 2), (7, 7), 8),
    "hiera_small": ((96, 192, 384, 768), (1, 2, 11, 2), (7, 7), 8),
    "hiera_base_plus": ((112, 224, 448, 896), (2, 3, 16, 3), (14, 14), 8),
    "hiera_large": ((144, 288, 576, 1152), (2, 6, 36, 4), (7, 7), 8),
    "tiny": ((16, 32, 64, 128), (1, 2, 2, 1), (4, 4), 8),
}


def official_sam2_layout(preset: str, d: int = 256, decoder_mlp: int = 2048,
                         iou_hidden: int = 256) -> dict[str, tuple[int, ...]]:
    """Names and shapes of an official ``sam2.1_hiera_*.pt`` state dict."""
    dims, blocks, background, window = HIERA[preset]
    keys: dict[str, tuple[int, ...]] = {}
    t = "image_encoder.trunk."
    keys[t + "patch_embed.proj.weight"] = (dims[0], 3, 7, 7)
    keys[t + "patch_embed.proj.bias"] = (dims[0],)
    keys[t + "pos_embed"] = (1, dims[0], *background)
    keys[t + "pos_embed_window"] = (1, dims[0], window, window)
    index, previous = 0, dims[0]
    for stage, count in enumerate(blocks):
        for _ in range(count):
            dim, out = previous, dims[stage]
            b = f"{t}blocks.{index}."
            keys |= {b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * out, dim), b + "attn.qkv.bias": (3 * out,),
                     b + "attn.proj.weight": (out, out), b + "attn.proj.bias": (out,),
                     b + "norm2.weight": (out,), b + "norm2.bias": (out,),
                     b + "mlp.layers.0.weight": (4 * out, out), b + "mlp.layers.0.bias": (4 * out,),
                     b + "mlp.layers.1.weight": (out, 4 * out), b + "mlp.layers.1.bias": (out,)}
            if dim != out:
                keys |= {b + "proj.weight": (out, dim), b + "proj.bias": (out,)}
            index, previous = index + 1, out
    for i, channels in enumerate(reversed(dims)):
        keys[f"image_encoder.neck.convs.{i}.conv.weight"] = (d, channels, 1, 1)
        keys[f"image_encoder.neck.convs.{i}.conv.bias"] = (d,)
    p = "sam_prompt_encoder."
    keys[p + "pe_layer.positional_encoding_gaussian_matrix"] = (2, d // 2)
    for i in range(4):
        keys[f"{p}point_embeddings.{i}.weight"] = (1, d)
    keys[p + "not_a_point_embed.weight"] = (1, d)
    keys[p + "no_mask_embed.weight"] = (1, d)
    for index, shape in (("0", (4, 1, 2, 2)), ("3", (16, 4, 2, 2)), ("6", (d, 16, 1, 1))):
        keys[f"{p}mask_downscaling.{index}.weight"] = shape
        keys[f"{p}mask_downscaling.{index}.bias"] = (shape[0],)
    for index, width in (("1", 4), ("4", 16)):
        keys[f"{p}mask_downscaling.{index}.weight"] = (width,)
        keys[f"{p}mask_downscaling.{index}.bias"] = (width,)
    m = "sam_mask_decoder."

    def attention(prefix: str, inner: int) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            keys[f"{prefix}.{proj}.weight"] = (inner, d)
            keys[f"{prefix}.{proj}.bias"] = (inner,)
        keys[f"{prefix}.out_proj.weight"] = (d, inner)
        keys[f"{prefix}.out_proj.bias"] = (d,)

    for layer in range(2):
        lp = f"{m}transformer.layers.{layer}"
        attention(f"{lp}.self_attn", d)
        attention(f"{lp}.cross_attn_token_to_image", d // 2)
        attention(f"{lp}.cross_attn_image_to_token", d // 2)
        for n in range(1, 5):
            keys[f"{lp}.norm{n}.weight"] = keys[f"{lp}.norm{n}.bias"] = (d,)
        keys |= {f"{lp}.mlp.layers.0.weight": (decoder_mlp, d),
                 f"{lp}.mlp.layers.0.bias": (decoder_mlp,),
                 f"{lp}.mlp.layers.1.weight": (d, decoder_mlp), f"{lp}.mlp.layers.1.bias": (d,)}
    attention(f"{m}transformer.final_attn_token_to_image", d // 2)
    keys[f"{m}transformer.norm_final_attn.weight"] = (d,)
    keys[f"{m}transformer.norm_final_attn.bias"] = (d,)
    keys |= {m + "iou_token.weight": (1, d), m + "mask_tokens.weight": (4, d),
             m + "obj_score_token.weight": (1, d),
             m + "output_upscaling.0.weight": (d, d // 4, 2, 2),
             m + "output_upscaling.0.bias": (d // 4,),
             m + "output_upscaling.1.weight": (d // 4,), m + "output_upscaling.1.bias": (d // 4,),
             m + "output_upscaling.3.weight": (d // 4, d // 8, 2, 2),
             m + "output_upscaling.3.bias": (d // 8,),
             m + "conv_s0.weight": (d // 8, d, 1, 1), m + "conv_s0.bias": (d // 8,),
             m + "conv_s1.weight": (d // 4, d, 1, 1), m + "conv_s1.bias": (d // 4,)}

    def mlp3(prefix: str, hidden: int, out: int) -> None:
        for layer, shape in enumerate(((hidden, d), (hidden, hidden), (out, hidden))):
            keys[f"{prefix}.layers.{layer}.weight"] = shape
            keys[f"{prefix}.layers.{layer}.bias"] = (shape[0],)

    for i in range(4):
        mlp3(f"{m}output_hypernetworks_mlps.{i}", d, d // 8)
    mlp3(f"{m}iou_prediction_head", iou_hidden, 4)
    mlp3(f"{m}pred_obj_score_head", d, 1)
    keys["no_mem_embed"] = (1, 1, d)
    return keys


VIDEO_ONLY = {
    "no_mem_pos_enc": (1, 1, 256), "maskmem_tpos_enc": (7, 1, 1, 64), "no_obj_ptr": (1, 256),
    "no_obj_embed_spatial": (1, 64),
    "memory_attention.layers.0.self_attn.q_proj.weight": (256, 256),
    "memory_attention.layers.3.cross_attn_image.k_proj.weight": (256, 64),
    "memory_attention.norm.weight": (256,),
    "memory_encoder.mask_downsampler.encoder.0.weight": (4, 1, 3, 3),
    "memory_encoder.pix_feat_proj.weight": (256, 256, 1, 1),
    "memory_encoder.fuser.layers.0.dwconv.weight": (256, 1, 7, 7),
    "memory_encoder.out_proj.weight": (64, 256, 1, 1),
    "obj_ptr_proj.layers.0.weight": (256, 256), "obj_ptr_tpos_proj.weight": (64, 256),
    "mask_downsample.weight": (1, 1, 4, 4), "mask_downsample.bias": (1,),
}


def meta_tensors(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in layout.items()}


@pytest.mark.parametrize("preset", ["hiera_tiny", "hiera_small", "hiera_base_plus",
                                    "hiera_large"])
def test_every_official_tensor_lands_on_sam2model_for_each_released_size(preset):
    layout = official_sam2_layout(preset)
    with torch.device("meta"):
        segmenter = Sam2Segmenter.from_preset(preset)
    converted, report = convert_sam2_state_dict(meta_tensors({**layout, **VIDEO_ONLY}),
                                                segmenter.sam)
    assert report.ok, report.first_problem()
    assert set(report.mapped) == set(layout)  # every image-path tensor renamed
    assert sorted(report.ignored) == sorted(VIDEO_ONLY)  # video parts reported, not lost
    assert set(converted) == set(segmenter.sam.state_dict())  # and nothing left unset
    assert infer_sam2_preset(meta_tensors(layout)) == preset  # tiny/small: depth 12 vs 16


def test_wrong_size_and_unknown_tensor_are_reported_by_name():
    layout = official_sam2_layout("hiera_tiny")
    with torch.device("meta"):
        small = Sam2Segmenter.from_preset("hiera_small")
    _, report = convert_sam2_state_dict(meta_tensors(layout), small.sam)
    # hiera_small's stage 3 starts 4 blocks later: shapes disagree, and blocks 12-15 are unset
    assert not report.ok and "wrong SAM size" in report.first_problem()
    assert "vision_encoder.backbone.blocks.15.attn.qkv.weight" in report.unset_target
    _, report = convert_sam2_state_dict(meta_tensors({**layout, "extra.weight": (1,)}))
    assert report.unused_source == ["extra.weight"]


def test_load_official_file_puts_values_where_the_official_modules_had_them(tmp_path):
    torch.manual_seed(0)
    layout = official_sam2_layout("tiny", decoder_mlp=64, iou_hidden=32)
    state = {name: torch.randn(shape) for name, shape in layout.items()}
    state |= {name: torch.randn(shape) for name, shape in VIDEO_ONLY.items()}
    path = tmp_path / "sam2.1_hiera_tiny_test.pt"
    torch.save({"model": state}, path)  # the official file wraps the state dict
    segmenter = load_official_sam2(path, preset="tiny")
    sam = segmenter.sam
    for i in range(4):
        torch.testing.assert_close(sam.prompt_encoder.point_embed.weight[i],
                                   state[f"sam_prompt_encoder.point_embeddings.{i}.weight"][0])
    gaussian = state["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    torch.testing.assert_close(sam.shared_image_embedding.positional_embedding, gaussian)
    torch.testing.assert_close(sam.prompt_encoder.shared_embedding.positional_embedding, gaussian)
    torch.testing.assert_close(
        sam.mask_decoder.transformer.layers[1].cross_attn_image_to_token.o_proj.weight,
        state["sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight"])
    torch.testing.assert_close(sam.vision_encoder.neck.convs[3].weight,
                               state["image_encoder.neck.convs.3.conv.weight"])
    torch.testing.assert_close(sam.mask_decoder.iou_prediction_head.layers[0].weight,
                               state["sam_mask_decoder.iou_prediction_head.layers.1.weight"])
    torch.testing.assert_close(sam.no_memory_embedding, state["no_mem_embed"])
    # the loaded model runs: one prompt -> one 32x32 low-res mask for the 128 px preset
    with torch.no_grad():
        embedding = segmenter.encode_images(torch.randn(1, 3, 128, 128))
        masks, scores = segmenter.decode(embedding[0], torch.randn(2, 256))
    assert masks.shape == (2, 32, 32) and scores.shape == (2,)


def test_truncated_checkpoint_is_refused_naming_the_tensor(tmp_path):
    layout = official_sam2_layout("tiny", decoder_mlp=64, iou_hidden=32)
    del layout["sam_mask_decoder.conv_s1.weight"]
    path = tmp_path / "cut.pt"
    torch.save({"model": {k: torch.zeros(s) for k, s in layout.items()}}, path)
    with pytest.raises(KeySegCheckpointError, match=r"cut\.pt: missing tensor.*conv_s1\.weight"):
        load_official_sam2(path, preset="tiny")


def test_cli_convert_sam2_writes_a_loadable_directory(tmp_path, capsys):
    from transformers import Sam2Model

    from keyseg.cli import main

    layout = official_sam2_layout("tiny", decoder_mlp=64, iou_hidden=32)
    state = {name: torch.randn(shape) for name, shape in layout.items()}
    torch.save({"model": {**state, "no_mem_pos_enc": torch.zeros(1, 1, 256)}},
               tmp_path / "in.pt")
    assert main(["convert", "sam2", str(tmp_path / "in.pt"), str(tmp_path / "out"),
                 "--preset", "tiny"]) == 0
    assert "video-memory tensors left out" in capsys.readouterr().out
    loaded = Sam2Model.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(loaded.mask_decoder.conv_s0.weight,
                               state["sam_mask_decoder.conv_s0.weight"])


def test_model_config_sam2_checkpoint_builds_keyseg_on_the_converted_weights(tmp_path):
    from keyseg.build import build_keyseg
    from keyseg.config import BackboneConfig, ModelConfig, SamSettings
    from keyseg.errors import KeySegConfigError

    layout = official_sam2_layout("tiny", decoder_mlp=64, iou_hidden=32)
    state = {name: torch.randn(shape) for name, shape in layout.items()}
    torch.save({"model": state}, tmp_path / "sam2.pt")
    config = ModelConfig(backbone=BackboneConfig(preset="tiny"),
                         sam=SamSettings(family="sam2", preset="tiny",
                                         checkpoint=str(tmp_path / "sam2.pt")))
    model = build_keyseg(config)
    assert isinstance(model.sam, Sam2Segmenter)
    torch.testing.assert_close(model.sam.sam.mask_decoder.obj_score_token.weight,
                               state["sam_mask_decoder.obj_score_token.weight"])
    with pytest.raises(KeySegConfigError, match=r"model\.sam\.preset: unknown SAM2 preset 'vit_h'"):
        build_keyseg(ModelConfig(backbone=BackboneConfig(preset="tiny"),
                                            sam=SamSettings(family="sam2")))
