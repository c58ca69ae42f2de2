"""The official-SAM converter: the full ViT-H manifest, a tiny round trip, and bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import shared_path
from keyseg.cli import main as cli_main
from keyseg.commands import convert as convert_command
from keyseg.convert.sam import (
    DERIVED_TARGETS,
    SAM_KEY_RULES,
    convert_sam_state_dict,
    load_official_sam,
    load_sam,
    official_to_hf_key,
    save_sam,
)
from keyseg.errors import KeySegCheckpointError
from keyseg.model.sam import SAM_PRESETS, SamSegmenter

# CI checks out shared/ beside the repository, as on the development machines; without it
# the manifest tests skip (helpers.shared_path).
MANIFEST = "data/sam_vit_h_4b8939.keys.json"
TIED = "prompt_encoder.shared_embedding.positional_embedding"


def _manifest() -> dict[str, list[int]]:
    return json.loads(shared_path(MANIFEST).read_text())["tensors"]


def test_manifest_maps_all_594_vit_h_tensors_onto_a_meta_model() -> None:
    manifest = _manifest()
    assert len(manifest) == 594
    with torch.device("meta"):
        segmenter = SamSegmenter.from_preset("vit_h")
        src = {name: torch.empty(shape) for name, shape in manifest.items()}
    target = segmenter.sam.state_dict()

    converted, report = convert_sam_state_dict(src, segmenter.sam)

    assert report.unused_source == []
    assert report.unset_target == []
    assert report.shape_mismatches == []
    assert report.duplicates == []
    assert report.ok
    assert len(report.mapped) == 594
    assert len(set(report.mapped.values())) == 594  # injective
    # The only model tensor without its own source is the tied copy of the Fourier matrix.
    assert (
        report.derived == DERIVED_TARGETS == {TIED: "shared_image_embedding.positional_embedding"}
    )
    assert set(converted) == set(target)
    for name, tensor in converted.items():
        assert tuple(tensor.shape) == tuple(target[name].shape), name
    # SamModel has parameters only (no buffers to derive), and it really ties the pair.
    assert [name for name, _ in segmenter.sam.named_buffers()] == []
    assert TIED in segmenter.sam._tied_weights_keys


def test_every_rule_is_used_by_the_real_checkpoint() -> None:
    used = set()
    for name in _manifest():
        for index, (pattern, _) in enumerate(SAM_KEY_RULES):
            if re.fullmatch(pattern, name):
                used.add(index)
    assert used == set(range(len(SAM_KEY_RULES)))


def test_special_case_names() -> None:
    expected = {
        "image_encoder.blocks.31.attn.qkv.weight": "vision_encoder.layers.31.attn.qkv.weight",
        "image_encoder.blocks.7.attn.rel_pos_h": "vision_encoder.layers.7.attn.rel_pos_h",
        "image_encoder.blocks.0.norm2.bias": "vision_encoder.layers.0.layer_norm2.bias",
        "image_encoder.neck.2.weight": "vision_encoder.neck.conv2.weight",
        "image_encoder.neck.3.bias": "vision_encoder.neck.layer_norm2.bias",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (
            "shared_image_embedding.positional_embedding"
        ),
        "prompt_encoder.point_embeddings.3.weight": "prompt_encoder.point_embed.3.weight",
        "prompt_encoder.mask_downscaling.4.weight": "prompt_encoder.mask_embed.layer_norm2.weight",
        "prompt_encoder.mask_downscaling.6.bias": "prompt_encoder.mask_embed.conv3.bias",
        "mask_decoder.transformer.layers.1.norm4.weight": (
            "mask_decoder.transformer.layers.1.layer_norm4.weight"
        ),
        "mask_decoder.transformer.norm_final_attn.bias": (
            "mask_decoder.transformer.layer_norm_final_attn.bias"
        ),
        "mask_decoder.output_upscaling.1.weight": "mask_decoder.upscale_layer_norm.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.1.weight": (
            "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight"
        ),
        "mask_decoder.iou_prediction_head.layers.2.bias": (
            "mask_decoder.iou_prediction_head.proj_out.bias"
        ),
    }
    for official, hf in expected.items():
        assert official_to_hf_key(official) == hf
    assert official_to_hf_key("image_encoder.blocks.0.attn.qkv.scale") is None


# --- tiny round trip --------------------------------------------------------------------


def _hf_to_official(name: str) -> str | None:
    """Independent restatement of the naming, written the other way round (HF -> official)."""
    if name == TIED:
        return None
    if name == "shared_image_embedding.positional_embedding":
        return "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    if name.startswith("vision_encoder."):
        name = "image_encoder." + name.removeprefix("vision_encoder.")
        name = re.sub(r"^image_encoder\.layers\.", "image_encoder.blocks.", name)
        name = name.replace("patch_embed.projection.", "patch_embed.proj.")
        name = re.sub(r"\.layer_norm([12])\.", r".norm\1.", name)
        for old, new in (("conv1", "0"), ("norm1", "1"), ("conv2", "2"), ("norm2", "3")):
            name = name.replace(f"neck.{old}.", f"neck.{new}.")
        return name
    if name.startswith("prompt_encoder."):
        name = name.replace(".point_embed.", ".point_embeddings.")
        for old, new in (
            ("conv1", "0"),
            ("layer_norm1", "1"),
            ("conv2", "3"),
            ("layer_norm2", "4"),
            ("conv3", "6"),
        ):
            name = name.replace(f".mask_embed.{old}.", f".mask_downscaling.{new}.")
        return name
    name = re.sub(r"(transformer\.layers\.\d+)\.layer_norm(\d)", r"\1.norm\2", name)
    name = name.replace("layer_norm_final_attn", "norm_final_attn")
    name = name.replace("upscale_conv1.", "output_upscaling.0.")
    name = name.replace("upscale_layer_norm.", "output_upscaling.1.")
    name = name.replace("upscale_conv2.", "output_upscaling.3.")
    if "hypernetworks_mlps" in name or "iou_prediction_head" in name:
        name = name.replace(".layers.0.", ".layers.1.")  # middle layer first
        name = name.replace(".proj_in.", ".layers.0.").replace(".proj_out.", ".layers.2.")
    return name


@pytest.fixture(scope="module")
def tiny_official() -> tuple[SamSegmenter, dict[str, torch.Tensor]]:
    """A tiny SAM with every tensor random, and the same weights in the official layout."""
    torch.manual_seed(0)
    model = SamSegmenter.from_preset("tiny").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))  # rel_pos/pos_embed start at zero otherwise
    official = {}
    for name, tensor in model.sam.state_dict().items():
        official_name = _hf_to_official(name)
        if official_name is not None:
            official[official_name] = tensor.detach().clone()
    return model, official


def test_tiny_round_trip_puts_every_value_back(tiny_official) -> None:
    model, official = tiny_official
    target = model.sam.state_dict()
    assert len(official) == len(target) - 1
    converted, report = convert_sam_state_dict(official, model.sam)
    assert report.ok, report.summary()
    assert set(converted) == set(target)
    for name, tensor in converted.items():
        torch.testing.assert_close(tensor, target[name], rtol=0, atol=0, msg=name)


def test_loaded_tiny_checkpoint_matches_by_value(tiny_official, tmp_path: Path) -> None:
    model, official = tiny_official
    path = tmp_path / "sam_tiny.pth"
    torch.save(official, path)
    loaded = load_official_sam(path, preset="tiny").eval()
    sam = loaded.sam
    spot = {
        "image_encoder.neck.2.weight": sam.vision_encoder.neck.conv2.weight,
        "image_encoder.blocks.1.attn.rel_pos_w": sam.vision_encoder.layers[1].attn.rel_pos_w,
        "prompt_encoder.mask_downscaling.3.bias": sam.prompt_encoder.mask_embed.conv2.bias,
        "mask_decoder.iou_prediction_head.layers.2.weight": (
            sam.mask_decoder.iou_prediction_head.proj_out.weight
        ),
        "mask_decoder.output_hypernetworks_mlps.0.layers.1.bias": (
            sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].bias
        ),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (
            sam.shared_image_embedding.positional_embedding
        ),
    }
    for official_name, param in spot.items():
        assert torch.equal(param, official[official_name]), official_name
    # One shared Fourier matrix, trainable parameters, real (non-meta) tensors.
    assert (
        sam.prompt_encoder.shared_embedding.positional_embedding
        is sam.shared_image_embedding.positional_embedding
    )
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    # Same weights, same function.
    torch.manual_seed(3)
    pixels, prompts = torch.randn(1, 3, 256, 256), torch.randn(2, 256)
    with torch.no_grad():
        expected = model.decode(model.encode_images(pixels)[0], prompts)
        got = loaded.decode(loaded.encode_images(pixels)[0], prompts)
    torch.testing.assert_close(got, expected)


def test_safetensors_source_and_preset_inference(tiny_official, tmp_path: Path) -> None:
    model, official = tiny_official
    path = tmp_path / "sam_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, str(path))
    loaded = load_official_sam(path, preset=None)
    assert loaded.image_size == 256
    # the preset is inferred from the tensors, and every value is the file's
    state = loaded.sam.state_dict()
    for name, tensor in model.sam.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(loaded.sam.vision_encoder.neck.conv2.weight,
                       official["image_encoder.neck.2.weight"])


def test_save_and_load_directory(tiny_official, tmp_path: Path) -> None:
    model, _ = tiny_official
    dst = save_sam(model, tmp_path / "out")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # temp dir cleaned up
    again = load_sam(dst)
    for name, tensor in model.sam.state_dict().items():
        assert torch.equal(again.sam.state_dict()[name], tensor), name


def test_cli_converts_sam(tiny_official, tmp_path: Path, capsys) -> None:
    model, official = tiny_official
    src = tmp_path / "sam_tiny.pth"
    torch.save(official, src)
    assert cli_main(["convert", "sam", str(src), str(tmp_path / "out")]) == 0
    loaded = load_sam(tmp_path / "out")
    assert torch.equal(
        loaded.sam.mask_decoder.mask_tokens.weight, model.sam.mask_decoder.mask_tokens.weight
    )
    assert cli_main(["convert", "sam", str(tmp_path / "nope.pth"), str(tmp_path / "o2")]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_cli_preset_choices_match_the_registry() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    convert_command.add_arguments(parser)
    args = parser.parse_args(["sam", "a.pth", "out", "--preset", "vit_b"])
    assert args.preset == "vit_b"
    # the --preset choices are exactly the registry's presets, plus "auto" (inferred)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sam_parser = subparsers.choices["sam"]
    preset = next(a for a in sam_parser._actions if "--preset" in a.option_strings)
    assert set(preset.choices) == {"auto", *SAM_PRESETS}
    with pytest.raises(SystemExit):
        parser.parse_args(["sam", "a.pth", "out", "--preset", "vit_x"])


# --- bad files ---------------------------------------------------------------------------


def test_corrupted_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(KeySegCheckpointError, match=r"broken\.pth"):
        load_official_sam(path, preset="tiny")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "hook": Path("x")}, path)
    with pytest.raises(KeySegCheckpointError, match=r"evil\.pth"):
        load_official_sam(path, preset="tiny")


def test_wrapped_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, path)
    with pytest.raises(KeySegCheckpointError, match=r"wrapped\.pth.*'model'"):
        load_official_sam(path, preset="tiny")


def test_wrong_shape_names_file_and_tensor(tiny_official, tmp_path: Path) -> None:
    _, official = tiny_official
    bad = dict(official)
    bad["mask_decoder.output_upscaling.3.weight"] = torch.zeros(3, 3)
    path = tmp_path / "shape.pth"
    torch.save(bad, path)
    with pytest.raises(KeySegCheckpointError, match=r"shape\.pth.*output_upscaling\.3\.weight"):
        load_official_sam(path, preset="tiny")


def test_missing_and_unknown_tensors_are_named(tiny_official, tmp_path: Path) -> None:
    _, official = tiny_official
    missing = {k: v for k, v in official.items() if k != "prompt_encoder.no_mask_embed.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(KeySegCheckpointError, match=r"missing\.pth.*no_mask_embed"):
        load_official_sam(tmp_path / "missing.pth", preset="tiny")
    extra = {**official, "image_encoder.blocks.0.attn.scale": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(KeySegCheckpointError, match=r"extra\.pth.*attn\.scale"):
        load_official_sam(tmp_path / "extra.pth", preset="tiny")


def test_wrong_preset_is_refused(tiny_official, tmp_path: Path) -> None:
    _, official = tiny_official
    torch.save(official, tmp_path / "tiny.pth")
    with pytest.raises(KeySegCheckpointError, match=r"tiny\.pth.*vit_b"):
        load_official_sam(tmp_path / "tiny.pth", preset="vit_b")


def test_report_against_a_hand_made_target() -> None:
    """A mismatched Fourier matrix is reported once (under its origin) and the check goes
    on past its tied copy; a renamed tensor the model lacks is unused under its source name;
    a target nothing maps to is unset."""
    z = torch.zeros
    fourier = "shared_image_embedding.positional_embedding"
    src = {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": z(2, 8),
           "image_encoder.neck.2.weight": z(4, 4),
           "image_encoder.blocks.9.norm1.bias": z(4)}
    target = {TIED: z(2, 16), fourier: z(2, 16),
              "vision_encoder.neck.conv2.weight": z(4, 4),
              "vision_encoder.neck.conv1.weight": z(4, 4)}
    converted, report = convert_sam_state_dict(src, target)
    assert report.shape_mismatches == [
        ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", fourier, (2, 8), (2, 16))]
    assert report.unset_target == ["vision_encoder.neck.conv1.weight"]
    assert report.unused_source == ["image_encoder.blocks.9.norm1.bias"]
    assert report.derived == {TIED: fourier} and converted[TIED] is converted[fourier]
    assert report.duplicates == [] and not report.ok


def test_an_unknown_name_does_not_stop_the_conversion() -> None:
    z = torch.zeros
    src = {"image_encoder.blocks.0.attn.scale": z(1), "image_encoder.neck.2.weight": z(4, 4),
           "mask_decoder.iou_token.weight": z(1, 4)}
    converted, report = convert_sam_state_dict(src)
    assert report.unused_source == ["image_encoder.blocks.0.attn.scale"]
    assert set(report.mapped) == {"image_encoder.neck.2.weight", "mask_decoder.iou_token.weight"}
    assert set(converted) == set(report.mapped.values())


def test_a_pretrained_sam_directory_is_a_sam_checkpoint_of_its_preset(tmp_path):
    """model.sam.checkpoint may name a SamModel directory (the lab's pretrained SAM): its
    weights are used as they are, and a directory of another size is refused in one line."""
    from keyseg.build import build_segmenter

    torch.manual_seed(3)
    trained = SamSegmenter.from_preset("tiny", prompt_dim=64)
    trained.sam.save_pretrained(tmp_path / "sam")
    loaded = build_segmenter("sam", "tiny", prompt_dim=64, checkpoint=str(tmp_path / "sam"))
    want = trained.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the prompt encoder reads the one shared positional matrix
    assert (loaded.sam.prompt_encoder.shared_embedding.positional_embedding
            is loaded.sam.shared_image_embedding.positional_embedding)
    with pytest.raises(KeySegCheckpointError, match=r"sam: .*output_channels: 64, expected 128"):
        build_segmenter("sam", "tiny", prompt_dim=128, checkpoint=str(tmp_path / "sam"))
    with pytest.raises(KeySegCheckpointError, match=r"vision_config.hidden_size: 32, expected 64"):
        build_segmenter("sam", "shapes", prompt_dim=64, checkpoint=str(tmp_path / "sam"))
