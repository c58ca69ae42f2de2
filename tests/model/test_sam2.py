"""SAM 2 as the mask decoder: multi-scale features as SAM 2 itself feeds them, one sparse
token per [SEG], frozen image encoder, SAM 2's input transform, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from keyseg.model.sam2 import Sam2Segmenter, pack_levels, unpack_levels
from keyseg.transforms import sam2_preprocess


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    seg = Sam2Segmenter.from_preset("tiny").eval()
    with torch.no_grad():  # random init leaves these zero; make them matter in the tests
        seg.sam.no_memory_embedding.normal_()
    return seg


def test_pack_and_unpack_are_inverse():
    levels = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    packed = pack_levels(levels)
    assert packed.shape == (2, 21 * 8, 4, 4)
    for a, b in zip(unpack_levels(packed), levels, strict=True):
        assert torch.equal(a, b)


def test_decode_equals_sam2s_own_image_path_with_a_sparse_prompt(segmenter):
    pixels = torch.randn(2, 3, 128, 128)
    prompts = torch.randn(3, 256)
    image_index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        packed = segmenter.encode_images(pixels)
        assert packed.shape == (2, 21 * 256, 8, 8)
        masks, scores = segmenter.decode_many(packed, image_index, prompts)
        # transformers' own single-image path: conv_s0/s1 + no-memory token at encoding
        sam = segmenter.sam
        fine, middle, coarse = sam.get_image_embeddings(pixels)
        reference = []
        for row, image in enumerate(image_index.tolist()):
            ref_masks, ref_iou, _, _ = sam.mask_decoder(
                image_embeddings=coarse[image : image + 1],
                image_positional_embeddings=sam.get_image_wide_positional_embeddings(),
                sparse_prompt_embeddings=prompts[row].reshape(1, 1, 1, 256),
                dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(
                    1, 256, 1, 1).expand(1, 256, 8, 8),
                multimask_output=False,
                high_resolution_features=[fine[image : image + 1], middle[image : image + 1]],
            )
            reference.append((ref_masks[0, 0, 0], ref_iou[0, 0, 0]))
    assert masks.shape == (3, 32, 32) and scores.shape == (3,)
    for row, (ref_mask, ref_iou) in enumerate(reference):
        torch.testing.assert_close(masks[row], ref_mask, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scores[row], ref_iou, atol=1e-5, rtol=1e-5)
    # no prompt: empty outputs of the right shape
    empty, no_scores = segmenter.decode(packed[0], torch.zeros(0, 256))
    assert empty.shape == (0, 32, 32) and no_scores.shape == (0,)


def test_sam2_transform_resizes_to_a_square_and_masks_return_to_the_original_size(segmenter):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 90, 3), np.uint8))
    prepared = sam2_preprocess(image, 128)
    assert prepared.pixel_values.shape == (3, 128, 128)
    assert prepared.resized_size == (128, 128) and prepared.original_size == (30, 90)
    # ImageNet statistics: a mid-grey 124 maps near 0 in every channel
    grey = sam2_preprocess(Image.new("RGB", (10, 10), (124, 116, 104)), 32).pixel_values
    assert grey.abs().max() < 0.05
    low = torch.full((1, 32, 32), -5.0)
    low[0, :, 16:] = 5.0  # right half of the square -> right half of the original
    mask = segmenter.postprocess_masks(low, prepared.resized_size, prepared.original_size)
    assert mask.shape == (1, 30, 90)
    assert (mask[0, :, :40] < 0).all() and (mask[0, :, 50:] > 0).all()


def test_keyseg_with_sam2_freezes_the_image_encoder_and_trains_the_decoder_projections():
    import random

    from helpers import make_record
    from keyseg.build import build_keyseg
    from keyseg.config import BackboneConfig, ModelConfig, SamSettings
    from keyseg.data.collate import Collator, record_to_example
    from keyseg.model.trainable import apply_lora, configure_trainable

    torch.manual_seed(0)
    config = ModelConfig(backbone=BackboneConfig(preset="tiny"),
                         sam=SamSettings(family="sam2", preset="tiny"))
    model = build_keyseg(config)
    apply_lora(model, config.lora)
    counts = configure_trainable(model, config.trainable)
    assert counts["sam_image_encoder"].trainable == 0 and counts["sam_image_encoder"].frozen
    assert not model.sam.sam.no_memory_embedding.requires_grad
    assert model.processor.sam_family == "sam2"
    batch = Collator(model.processor)([record_to_example(make_record(40, 60),
                                                         random.Random(0))])
    assert batch.sam_pixel_values.shape == (1, 3, 128, 128)
    output = model(batch)
    output.loss.backward()
    decoder = model.sam.sam.mask_decoder
    assert decoder.conv_s0.weight.grad is not None and decoder.conv_s1.weight.grad is not None
    assert decoder.conv_s0.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.sam.sam.vision_encoder.parameters())
    assert [tuple(m.shape) for m in output.pred_masks] == [(1, 40, 60), (2, 40, 60)]
