"""KeySegProcessor on its own: image token counts, template, decode, save / load."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from keyseg import tokens
from keyseg.config import BackboneConfig
from keyseg.errors import KeySegCheckpointError
from keyseg.model.tiny import build_tiny_tokenizer, tiny_image_processor
from keyseg.processor import PROCESSOR_FILE, KeySegProcessor


@pytest.fixture
def processor():
    return KeySegProcessor(build_tiny_tokenizer(), tiny_image_processor(32), BackboneConfig(),
                           num_image_tokens=16, sam_image_size=64)


class _GridProcessor:
    """A Qwen2-VL-like image processor: a (t, h, w) patch grid per image, 2x2 merge (no
    ``merge_size`` attribute at all when ``merge_size=None``)."""

    def __init__(self, merge_size: int | None = 2) -> None:
        if merge_size is not None:
            self.merge_size = merge_size

    def __call__(self, images, return_tensors):
        width, height = images[0].size
        return {"pixel_values": torch.zeros(1, 3), "image_grid_thw":
                torch.tensor([[1, height // 14, width // 14]]), "note": "not a tensor"}


def test_prepared_image_has_both_encoders_inputs_and_the_fixed_count(processor):
    prepared = processor.prepare_image(Image.new("RGB", (50, 20)))
    assert prepared.num_image_tokens == 16
    assert tuple(prepared.vision_inputs["pixel_values"].shape) == (1, 3, 32, 32)
    assert prepared.sam.pixel_values.shape == (3, 64, 64)
    assert prepared.sam.original_size == (20, 50) and prepared.sam.resized_size == (26, 64)


def test_dynamic_resolution_counts_merged_patches(processor):
    processor.image_processor = _GridProcessor()
    prepared = processor.prepare_image(Image.new("RGB", (14 * 8, 14 * 6)))
    assert prepared.num_image_tokens == 6 * 8 // 4
    assert set(prepared.vision_inputs) == {"pixel_values", "image_grid_thw"}
    processor.image_processor.merge_size = 1
    assert processor.prepare_image(Image.new("RGB", (28, 28))).num_image_tokens == 4


def test_template_follows_the_backbone_family(processor):
    assert processor.template == "llava_v1"
    processor.backbone = BackboneConfig(family="qwen2_vl")
    assert processor.template == "chatml"


def test_encode_uses_the_given_image_token_count(processor):
    turns = [tokens.Turn("what?", "It is [SEG].")]
    image = processor.ids.image
    assert int((processor.encode(turns).input_ids == image).sum()) == 16
    assert int((processor.encode(turns, 5).input_ids == image).sum()) == 5


def test_decode_keeps_seg_and_key_and_drops_end_of_sequence(processor):
    ids = processor.tokenizer("It is", add_special_tokens=False)["input_ids"]
    text = processor.decode([*ids, processor.ids.seg, processor.ids.key, processor.ids.eos])
    assert text == "It is [SEG] [KEY]"


def test_save_and_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    assert meta == {"num_image_tokens": 16, "sam_image_size": 64, "sam_family": "sam"}
    loaded = KeySegProcessor.from_pretrained(tmp_path, BackboneConfig())
    assert loaded.num_image_tokens == 16 and loaded.sam_image_size == 64
    assert loaded.ids == processor.ids
    turns = [tokens.Turn("where?", "It is [SEG]. [KEY] cup")]
    assert torch.equal(loaded.encode(turns).input_ids, processor.encode(turns).input_ids)
    picture = Image.new("RGB", (40, 30), (200, 10, 10))
    torch.testing.assert_close(loaded.prepare_image(picture).vision_inputs["pixel_values"],
                               processor.prepare_image(picture).vision_inputs["pixel_values"])


def test_loading_a_directory_without_the_processor_file_names_it(tmp_path):
    with pytest.raises(KeySegCheckpointError, match=rf"{PROCESSOR_FILE}: missing"):
        KeySegProcessor.from_pretrained(tmp_path, BackboneConfig())


def test_dynamic_resolution_without_a_merge_size_counts_every_patch(processor):
    processor.image_processor = _GridProcessor(merge_size=None)  # does not merge patches
    prepared = processor.prepare_image(Image.new("RGB", (14 * 4, 14 * 3)))
    assert prepared.num_image_tokens == 12 and type(prepared.num_image_tokens) is int
    processor.image_processor = _GridProcessor()
    merged = processor.prepare_image(Image.new("RGB", (14 * 4, 14 * 3))).num_image_tokens
    assert merged == 3 and type(merged) is int


def test_encode_follows_the_backbone_image_token_and_template():
    turns = [tokens.Turn("what?", "It is [SEG].")]
    custom = KeySegProcessor(build_tiny_tokenizer(), tiny_image_processor(32),
                             BackboneConfig(image_token="<picture>"), 4, 64)
    assert int((custom.encode(turns).input_ids == custom.ids.image).sum()) == 4
    chat = KeySegProcessor(build_tiny_tokenizer(), tiny_image_processor(32),
                           BackboneConfig(family="qwen2_vl"), 4, 64)
    text = chat.tokenizer.decode(chat.encode(turns).input_ids)
    assert text.removeprefix(chat.tokenizer.bos_token or "").startswith("<|im_start|>system")


def test_qwen_family_directory_loads_the_qwen_image_processor(tmp_path):
    from transformers import Qwen2VLImageProcessorPil

    backbone = BackboneConfig(family="qwen2_vl")
    saved = KeySegProcessor(build_tiny_tokenizer(), Qwen2VLImageProcessorPil(), backbone,
                            num_image_tokens=0, sam_image_size=64)
    saved.save_pretrained(tmp_path)
    loaded = KeySegProcessor.from_pretrained(tmp_path, backbone)
    assert type(loaded.image_processor) is Qwen2VLImageProcessorPil
    picture = Image.new("RGB", (56, 84))
    assert loaded.prepare_image(picture).num_image_tokens == (
        saved.prepare_image(picture).num_image_tokens) > 0


def _raw_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from keyseg.model.tiny import BASE_SPECIAL_TOKENS, train_byte_level_bpe

    raw = train_byte_level_bpe(None, 600, BASE_SPECIAL_TOKENS, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


@pytest.mark.parametrize("convention", ["lisa", "v0"])
def test_the_processor_registers_the_backbone_tokens(convention):
    backbone = BackboneConfig(image_token="<picture>", use_im_start_end=True,
                              convention=convention)
    processor = KeySegProcessor(_raw_tokenizer(), tiny_image_processor(32), backbone, 4, 64)
    vocab = processor.tokenizer.get_vocab()
    assert processor.ids.image == vocab["<picture>"] and "<image>" not in vocab
    assert (processor.ids.im_start, processor.ids.im_end) == (vocab["<im_start>"],
                                                              vocab["<im_end>"])
    seg = next(t for t in processor.tokenizer.added_tokens_decoder.values()
               if str(t) == "[SEG]")
    assert seg.lstrip is seg.rstrip is (convention == "lisa")
    plain = KeySegProcessor(_raw_tokenizer(), tiny_image_processor(32), BackboneConfig(), 4, 64)
    assert plain.ids.im_start is None and "<im_start>" not in plain.tokenizer.get_vocab()
