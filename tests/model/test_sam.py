"""SamSegmenter on the tiny preset: shapes, gradients, dtype handling and post-processing."""

from __future__ import annotations

import pytest
import torch

from keyseg.errors import KeySegConfigError
from keyseg.model.sam import SAM_PRESETS, SamSegmenter, sam_config


@pytest.fixture(scope="module")
def tiny() -> SamSegmenter:
    torch.manual_seed(0)
    return SamSegmenter.from_preset("tiny").eval()


@pytest.fixture(scope="module")
def embedding(tiny: SamSegmenter) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return tiny.encode_images(torch.randn(1, 3, tiny.image_size, tiny.image_size))[0]


def test_presets_cover_released_sizes_and_tiny() -> None:
    assert {"vit_h", "vit_l", "vit_b", "tiny", "shapes"} <= set(SAM_PRESETS)
    vision = sam_config("vit_h").vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        1280,
        32,
        16,
    )
    assert list(vision.global_attn_indexes) == [7, 15, 23, 31]
    for name in SAM_PRESETS:
        config = sam_config(name)
        assert config.mask_decoder_config.hidden_size == 256
        assert config.vision_config.output_channels == 256


def test_unknown_preset_is_a_config_error() -> None:
    with pytest.raises(KeySegConfigError, match="vit_q"):
        sam_config("vit_q")


def test_tiny_properties_and_size(tiny: SamSegmenter) -> None:
    assert tiny.image_size == 256
    assert tiny.embedding_size == 16
    assert tiny.prompt_dim == 256
    assert sum(p.numel() for p in tiny.parameters()) < 4_000_000


def test_vit_h_properties_on_meta() -> None:
    with torch.device("meta"):
        vit_h = SamSegmenter.from_preset("vit_h")
    assert (vit_h.image_size, vit_h.embedding_size, vit_h.prompt_dim) == (1024, 64, 256)


def test_encode_images_shape(tiny: SamSegmenter) -> None:
    with torch.no_grad():
        out = tiny.encode_images(torch.randn(2, 3, 256, 256))
    assert out.shape == (2, 256, 16, 16)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_decode_shapes(tiny: SamSegmenter, embedding: torch.Tensor, n: int) -> None:
    with torch.no_grad():
        masks, iou = tiny.decode(embedding, torch.randn(n, 256))
    assert masks.shape == (n, 64, 64)
    assert iou.shape == (n,)
    assert masks.dtype == iou.dtype == torch.float32


def test_decode_treats_each_prompt_independently(
    tiny: SamSegmenter, embedding: torch.Tensor
) -> None:
    prompts = torch.randn(3, 256)
    with torch.no_grad():
        together, iou_together = tiny.decode(embedding, prompts)
        alone, iou_alone = tiny.decode(embedding, prompts[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou_together[1:2], iou_alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[0], together[1])


def test_decode_rejects_wrong_prompt_width(tiny: SamSegmenter, embedding: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="prompts must be"):
        tiny.decode(embedding, torch.randn(2, 32))


def test_gradient_reaches_prompts_and_mask_decoder(
    tiny: SamSegmenter, embedding: torch.Tensor
) -> None:
    tiny.zero_grad()
    prompts = torch.randn(2, 256, requires_grad=True)
    masks, iou = tiny.decode(embedding, prompts)
    (masks.square().mean() + iou.sum()).backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    decoder = tiny.sam.mask_decoder
    for param in (
        decoder.transformer.layers[0].self_attn.q_proj.weight,
        decoder.transformer.final_attn_token_to_image.v_proj.weight,
        decoder.upscale_conv1.weight,
        decoder.output_hypernetworks_mlps[0].proj_out.weight,  # single-mask output token
        decoder.iou_prediction_head.proj_in.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0
    tiny.zero_grad()


def test_decode_follows_parameter_dtype() -> None:
    torch.manual_seed(0)
    model = SamSegmenter.from_preset("tiny", prompt_dim=64).to(torch.float64)
    with torch.no_grad():
        image = model.encode_images(torch.randn(1, 3, 256, 256))  # float32 in, cast
        masks, iou = model.decode(image[0], torch.randn(2, 64))  # float32 prompts, cast
    assert image.dtype == masks.dtype == iou.dtype == torch.float64
    assert masks.shape == (2, 64, 64)


def test_postprocess_crops_padding_before_resizing(tiny: SamSegmenter) -> None:
    # A 300x200 (H x W) image resized to longest side 256 is 256x171, padded right to 256.
    original, resized = (300, 200), (256, 171)
    low_res = torch.full((2, 64, 64), -1.0)
    low_res[0, :, 48:] = 10.0  # positive only under the padding (x >= 192 > 171)
    low_res[1, :, :21] = 10.0  # positive on the left half of the real image (x < ~85)
    out = tiny.postprocess_masks(low_res, resized, original)
    assert out.shape == (2, 300, 200)
    assert (out[0] < 0).all()
    # Left half of the resized image is the left half of the original.
    assert (out[1, :, :95] > 0).all()
    assert (out[1, :, 106:] < 0).all()


def test_postprocess_uses_the_model_image_size(tiny: SamSegmenter) -> None:
    # Without padding a constant mask stays constant at any target size, square or not.
    out = tiny.postprocess_masks(torch.full((1, 64, 64), 3.0), (256, 256), (37, 91))
    assert out.shape == (1, 37, 91)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


def test_postprocess_empty(tiny: SamSegmenter) -> None:
    out = tiny.postprocess_masks(torch.zeros(0, 64, 64), (256, 171), (300, 200))
    assert out.shape == (0, 300, 200)


def test_decode_many_equals_per_image_decode(tiny: SamSegmenter) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        images = tiny.encode_images(torch.randn(2, 3, tiny.image_size, tiny.image_size))
        prompts = torch.randn(5, tiny.prompt_dim)
        index = torch.tensor([0, 1, 1, 0, 1])
        low, iou = tiny.decode_many(images, index, prompts)
        for i in range(5):
            one_low, one_iou = tiny.decode(images[int(index[i])], prompts[i : i + 1])
            torch.testing.assert_close(low[i], one_low[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i], one_iou[0], rtol=1e-4, atol=1e-4)
        empty_low, _ = tiny.decode_many(images, index[:0], prompts[:0])
        assert empty_low.shape == (0, 4 * tiny.embedding_size, 4 * tiny.embedding_size)
