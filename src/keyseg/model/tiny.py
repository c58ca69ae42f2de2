"""Tiny, locally built components: a BPE tokenizer and a few-hundred-K-parameter LLaVA.

They are the same classes as the 7B path (``LlavaForConditionalGeneration`` with a LLaMA LM
and a CLIP vision tower, a fast tokenizer), only small and random, so tests exercise the real
code in seconds with no download.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PreTrainedTokenizerFast,
)

from keyseg import tokens
from keyseg.config import BackboneConfig, ModelConfig, SamSettings

BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

#: Tokenizer training text when no corpus is given. A preset with its own corpus (``shapes``:
#: the procedural world's queries and answers) has it passed in by ``keyseg.build``.
DEFAULT_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Sure, it is. It is. The segmentation result is. They are.",
    "Can you segment the object in this image? Please segment the thing in this image.",
    "What is it in this image? Please respond with segmentation mask. "
    "Please output segmentation mask and explain why. Please output segmentation mask.",
    "What would you use to eat soup? A spoon. What can roll down a slope? A ball, a circle.",
    "the red blue green yellow purple orange white black shape circle square triangle star "
    "left right top bottom largest smallest man woman dog cat car person table chair cup",
)


def train_byte_level_bpe(corpus: Iterable[str] | None, vocab_size: int,
                         special_tokens: Iterable[str], unk_token: str | None = None) -> Tokenizer:
    """A byte-level BPE trained on ``corpus`` (a default one if None): deterministic, offline.
    Shared by the tiny LLaMA-style and Qwen-style tokenizers."""
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus or DEFAULT_CORPUS), trainer=trainer)
    return tok


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 600
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (a default one if None): deterministic, offline.

    Byte-level BPE decodes exactly, gives character offsets for label masking, and knows
    the LLaMA-style specials ``<s>``, ``</s>``, ``<unk>``, ``<pad>``.
    """
    tok = train_byte_level_bpe(corpus, vocab_size, BASE_SPECIAL_TOKENS, unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokens.add_special_tokens(wrapped)
    return wrapped


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    num_heads: int = 4,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
) -> LlavaConfig:
    """A LLaVA config of a few hundred thousand parameters; ``(image_size/patch)^2`` image
    tokens (16 by default — deliberately not LLaVA's 256). ``vision_feature_layer`` -2 is
    LLaVA's penultimate CLIP layer (the last one then never trains); -1 uses them all."""
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_hidden_size * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessorPil:
    """CLIP preprocessing at ``image_size`` px (resize shortest side, centre crop, normalise)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


# Named local presets for BackboneConfig.preset (used when no name_or_path is given).
VLM_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_layers": 2, "image_size": 32, "patch_size": 8},
    # The embedded default's VLM (procedural shapes world): 96 px, 64 image tokens.
    "shapes": {"hidden_size": 128, "num_layers": 3, "image_size": 96, "patch_size": 12,
               "num_heads": 4, "vision_hidden_size": 64, "vision_layers": 2},
    # The shapes world at its native 192 px, 16 px patches: 144 image tokens, a wider CLIP
    # whose two layers both feed the LM (issue #16: the VLM pretrained on shapes QA).
    "shapes192": {"hidden_size": 128, "num_layers": 3, "image_size": 192, "patch_size": 16,
                  "num_heads": 4, "vision_hidden_size": 96, "vision_layers": 2,
                  "vision_feature_layer": -1},
    # The same at 32 px patches: 36 image tokens, each about one object across (issue #16:
    # does an LM this small find a kind more easily among fewer tokens?).
    "shapes192p32": {"hidden_size": 128, "num_layers": 3, "image_size": 192, "patch_size": 32,
                     "num_heads": 4, "vision_hidden_size": 96, "vision_layers": 2,
                     "vision_feature_layer": -1},
    # shapes192 with a 6-layer LM (issue #16: does a deeper LM learn to look a named kind up
    # among the image tokens?); pretrain_vlm --warm-start fills layers 0-2 from a shapes192
    # VLM and starts layers 3-5 as identities.
    "shapes192deep": {"hidden_size": 128, "num_layers": 6, "image_size": 192, "patch_size": 16,
                      "num_heads": 4, "vision_hidden_size": 96, "vision_layers": 2,
                      "vision_feature_layer": -1},
}


def tiny_model_config(**fusion_overrides) -> ModelConfig:
    """A :class:`ModelConfig` with the tiny VLM and tiny SAM presets (fusion overridable)."""
    from dataclasses import replace

    base = ModelConfig(
        backbone=BackboneConfig(preset="tiny"),
        sam=SamSettings(preset="tiny"),
    )
    return replace(base, fusion=replace(base.fusion, **fusion_overrides))
