"""SAM 2 as KeySeg's mask decoder: transformers' ``Sam2Model`` behind :class:`SamSegmenter`'s
interface (``model.sam.family: sam2``).

What changes against SAM (and why the rest of KeySeg does not notice):

* the image encoder is a Hiera trunk + FPN neck giving three feature levels: ``(C, 4h, 4w)``,
  ``(C, 2h, 2w)`` and ``(C, h, w)`` (``h = S / 16``; 256/128/64 px for ``S = 1024``). The
  coarsest, plus the learned ``no_memory_embedding`` (SAM 2's single-image stand-in for a
  memory of earlier frames), is what the two-way transformer attends to; the two finer ones
  are the *high-resolution features* that SAM 2's mask decoder adds into its upscaling path
  after projecting them with ``conv_s0`` / ``conv_s1`` (``C/8`` and ``C/4`` channels).
* :meth:`Sam2Segmenter.encode_images` packs the three levels into **one** tensor
  ``(B, 21 C, h, w)`` (finer levels folded into channels with ``pixel_unshuffle``), so the
  embedding cache, batching and ``image_index`` selection of the SAM path work unchanged;
  :meth:`Sam2Segmenter.decode_many` unfolds it. ``conv_s0`` / ``conv_s1`` run in the decoder
  call, not at encoding time, so they train with the mask decoder while the encoder is frozen.
* every fused ``[SEG]`` row is one sparse prompt token (as with SAM), dense prompt = the
  prompt encoder's ``no_mask_embed``, single-mask output (token 0). SAM 2's object-score head
  is computed by the decoder but not used to blank masks (KeySeg trains on masks only), and
  the "dynamic multimask via stability" fallback is off in every preset, so inference uses
  the same output token as training.
* the input transform is SAM 2's: resize to ``S x S`` (aspect not kept), ImageNet
  normalisation (:func:`keyseg.transforms.sam2_preprocess`).

Presets (:data:`SAM2_PRESETS`): the four released Hiera sizes (``hiera_tiny``,
``hiera_small``, ``hiera_base_plus``, ``hiera_large``; SAM 2 and 2.1 share the image-path
architecture) and ``tiny`` (random, 128 px, for tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Sam2Config, Sam2Model

from keyseg.errors import KeySegConfigError
from keyseg.model.sam import DEFAULT_PROMPT_DIM, SamSegmenter

#: Channels of the packed embedding per prompt-width channel: C + 4C (2h level) + 16C (4h).
PACKED_CHANNELS = 1 + 4 + 16


def _sam2_config(
    *,
    embed_dims: Sequence[int],
    heads: Sequence[int],
    blocks: Sequence[int],
    global_blocks: Sequence[int],
    window_sizes: Sequence[int] = (8, 4, 14, 7),
    background: Sequence[int] = (7, 7),
    image_size: int = 1024,
    prompt_dim: int = DEFAULT_PROMPT_DIM,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    iou_head_hidden_dim: int = 256,
) -> Sam2Config:
    """The one place every SAM 2 preset goes through (Hiera trunk -> FPN -> decoder)."""
    if prompt_dim % 8:
        raise KeySegConfigError(f"SAM2 prompt_dim must be a multiple of 8, got {prompt_dim}")
    if image_size % 32:
        raise KeySegConfigError(f"SAM2 image size must be a multiple of 32, got {image_size}")
    stride = 4  # the patch embedding's stride: stage 1 runs at S / 4
    sizes = [[image_size // (stride * 2**level)] * 2 for level in range(3)]
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": embed_dims[0],
        "num_attention_heads": heads[0],
        "image_size": [image_size, image_size],
        "embed_dim_per_stage": list(embed_dims),
        "num_attention_heads_per_stage": list(heads),
        "blocks_per_stage": list(blocks),
        "global_attention_blocks": list(global_blocks),
        "window_size_per_stage": list(window_sizes),
        "window_positional_embedding_background_size": list(background),
    }
    vision = {
        "backbone_config": backbone,
        "backbone_channel_list": list(reversed(embed_dims)),
        "backbone_feature_sizes": sizes,
        "fpn_hidden_size": prompt_dim,
        "fpn_top_down_levels": [2, 3],
        "num_feature_levels": 3,
    }
    prompt_encoder = {"hidden_size": prompt_dim, "image_size": image_size, "patch_size": 16}
    mask_decoder = {
        "hidden_size": prompt_dim,
        "mlp_dim": decoder_mlp_dim,
        "num_attention_heads": decoder_heads,
        "iou_head_hidden_dim": iou_head_hidden_dim,
        # Train and infer with the same single-mask token (see the module docstring).
        "dynamic_multimask_via_stability": False,
    }
    return Sam2Config(vision_config=vision, prompt_encoder_config=prompt_encoder,
                      mask_decoder_config=mask_decoder)


def _hiera_tiny(prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Config:
    """``sam2(.1)_hiera_tiny.pt``: 96 wide, blocks 1-2-7-2, global attention at 5, 7, 9."""
    return _sam2_config(embed_dims=(96, 192, 384, 768), heads=(1, 2, 4, 8), blocks=(1, 2, 7, 2),
                        global_blocks=(5, 7, 9), prompt_dim=prompt_dim)


def _hiera_small(prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Config:
    """``sam2(.1)_hiera_small.pt``: 96 wide, blocks 1-2-11-2, global at 7, 10, 13."""
    return _sam2_config(embed_dims=(96, 192, 384, 768), heads=(1, 2, 4, 8),
                        blocks=(1, 2, 11, 2), global_blocks=(7, 10, 13), prompt_dim=prompt_dim)


def _hiera_base_plus(prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Config:
    """``sam2(.1)_hiera_base_plus.pt``: 112 wide, blocks 2-3-16-3, global at 12, 16, 20,
    a 14x14 background position grid."""
    return _sam2_config(embed_dims=(112, 224, 448, 896), heads=(2, 4, 8, 16),
                        blocks=(2, 3, 16, 3), global_blocks=(12, 16, 20), background=(14, 14),
                        prompt_dim=prompt_dim)


def _hiera_large(prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Config:
    """``sam2(.1)_hiera_large.pt``: 144 wide, blocks 2-6-36-4, global at 23, 33, 43,
    windows 8-4-16-8."""
    return _sam2_config(embed_dims=(144, 288, 576, 1152), heads=(2, 4, 8, 16),
                        blocks=(2, 6, 36, 4), global_blocks=(23, 33, 43),
                        window_sizes=(8, 4, 16, 8), prompt_dim=prompt_dim)


def _tiny(prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Config:
    """A random SAM 2 for tests: 128 px -> levels 32/16/8 px -> 32x32 low-res masks; the same
    module tree as the released sizes (four Hiera stages, FPN, full decoder), only narrow."""
    return _sam2_config(embed_dims=(16, 32, 64, 128), heads=(1, 1, 2, 2), blocks=(1, 2, 2, 1),
                        global_blocks=(4,), window_sizes=(8, 4, 4, 2), background=(4, 4),
                        image_size=128, prompt_dim=prompt_dim, decoder_mlp_dim=64,
                        decoder_heads=2, iou_head_hidden_dim=32)


SAM2_PRESETS: dict[str, Callable[..., Sam2Config]] = {
    "hiera_tiny": _hiera_tiny,
    "hiera_small": _hiera_small,
    "hiera_base_plus": _hiera_base_plus,
    "hiera_large": _hiera_large,
    "tiny": _tiny,
}


def sam2_config(preset: str, *, prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Config:
    """The ``Sam2Config`` of a named preset (see :data:`SAM2_PRESETS`)."""
    try:
        builder = SAM2_PRESETS[preset]
    except KeyError:
        known = ", ".join(SAM2_PRESETS)
        raise KeySegConfigError(
            f"model.sam.preset: unknown SAM2 preset {preset!r} (known: {known})"
        ) from None
    return builder(prompt_dim=prompt_dim)


def pack_levels(levels: Sequence[Tensor]) -> Tensor:
    """``[(B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w)]`` -> ``(B, 21 C, h, w)``: the finer
    levels' pixels folded into channels (``pixel_unshuffle``), coarsest level first."""
    fine, middle, coarse = levels
    return torch.cat([coarse, F.pixel_unshuffle(middle, 2), F.pixel_unshuffle(fine, 4)], dim=1)


def unpack_levels(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_levels`: ``(B, 21 C, h, w)`` -> ``(fine, middle, coarse)``."""
    channels = packed.shape[1] // PACKED_CHANNELS
    coarse, middle, fine = packed.split([channels, 4 * channels, 16 * channels], dim=1)
    return F.pixel_shuffle(fine, 4), F.pixel_shuffle(middle, 2), coarse


class Sam2Segmenter(SamSegmenter):
    """SAM 2 with :class:`SamSegmenter`'s calls: encode once, decode prompt rows, postprocess.

    ``.sam`` is the ``Sam2Model`` (``vision_encoder``, ``prompt_encoder``, ``mask_decoder``,
    ``shared_image_embedding``, ``no_memory_embedding``), named as transformers names them so
    converted checkpoints load by name.
    """

    family = "sam2"

    def __init__(self, config: Sam2Config | Sam2Model) -> None:
        """Build a random ``Sam2Model`` from ``config``, or wrap a built one."""
        nn.Module.__init__(self)
        self.sam = config if isinstance(config, Sam2Model) else Sam2Model(config)

    @classmethod
    def from_preset(cls, name: str, *, prompt_dim: int = DEFAULT_PROMPT_DIM) -> Sam2Segmenter:
        return cls(sam2_config(name, prompt_dim=prompt_dim))

    @property
    def image_size(self) -> int:
        return int(self.sam.config.prompt_encoder_config.image_size)

    @property
    def embedding_size(self) -> int:
        return int(self.sam.prompt_encoder.image_embedding_size[0])

    @property
    def embedding_channels(self) -> int:
        """Channels of one packed embedding (``21 C``)."""
        return PACKED_CHANNELS * self.prompt_dim

    def tie_positional_encoding(self) -> None:
        """Nothing to tie: ``Sam2Model`` keeps two Fourier matrices (the converter fills both
        from the checkpoint's one)."""

    def component_modules(self) -> dict[str, list[nn.Module]]:
        """The ``model.trainable`` groups; ``no_memory_embedding`` (added to every image's
        coarse features) counts as part of the image encoder."""
        sam = self.sam
        return {
            "sam_image_encoder": [sam.vision_encoder, nn.ParameterList([sam.no_memory_embedding])],
            "sam_prompt_encoder": [sam.prompt_encoder, sam.shared_image_embedding],
            "sam_mask_decoder": [sam.mask_decoder],
        }

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Run the Hiera encoder and FPN neck.

        Args:
            pixel_values: ``(B, 3, S, S)`` resized, normalised images.

        Returns:
            ``(B, 21 C, h, w)`` packed levels (see :func:`pack_levels`); ``(B, 5376, 64, 64)``
            for ``S = 1024``, ``C = 256``.
        """
        encoder = self.sam.vision_encoder
        weight = encoder.backbone.patch_embed.projection.weight
        out = encoder(pixel_values.to(weight.dtype))
        fine, middle, coarse = out.fpn_hidden_states
        # SAM 2 on a single image: the coarse level gets the "no memory" embedding.
        coarse = coarse + self.sam.no_memory_embedding.reshape(1, -1, 1, 1).to(coarse.dtype)
        return pack_levels([fine, middle, coarse])

    def decode(self, image_embedding: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """One mask per prompt row for one image: ``(C', h, w)`` packed embedding, ``(n, C)``
        prompts -> ``(n, 4h, 4w)`` logits and ``(n,)`` IoU scores."""
        return self.decode_many(image_embedding[None],
                                torch.zeros(prompts.shape[0], dtype=torch.long,
                                            device=prompts.device), prompts)

    def decode_many(self, image_embeddings: Tensor, image_index: Tensor,
                    prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Decode prompts of different images in one mask-decoder call.

        Args:
            image_embeddings: ``(N_img, 21 C, h, w)`` from :meth:`encode_images`.
            image_index: ``(n,)`` long, the image of each prompt.
            prompts: ``(n, C)`` prompt embeddings (fused ``[SEG]`` rows).

        Returns:
            ``(n, 4h, 4w)`` low-res logits and ``(n,)`` IoU scores.
        """
        channels = self.prompt_dim
        _, packed, height, width = image_embeddings.shape
        if prompts.ndim != 2 or prompts.shape[1] != channels:
            raise ValueError(f"prompts must be (n, {channels}), got {tuple(prompts.shape)}")
        dtype = self.dtype
        num_prompts = prompts.shape[0]
        if num_prompts == 0:
            empty = image_embeddings.new_zeros((0, 4 * height, 4 * width), dtype=dtype)
            return empty, image_embeddings.new_zeros((0,), dtype=dtype)
        if packed != self.embedding_channels or (height, width) != (self.embedding_size,) * 2:
            raise ValueError(
                f"image embedding {packed}x{height}x{width} does not match this SAM2 "
                f"({self.embedding_channels}x{self.embedding_size}x{self.embedding_size})"
            )
        decoder = self.sam.mask_decoder
        fine, middle, coarse = unpack_levels(image_embeddings.to(dtype))
        # Projected once per image, then gathered per prompt (SAM 2's conv_s0 / conv_s1).
        index = image_index.to(coarse.device)
        high_res = [decoder.conv_s0(fine)[index], decoder.conv_s1(middle)[index]]
        positional = self.sam.get_image_wide_positional_embeddings().to(dtype)
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight
        dense = no_mask.reshape(1, channels, 1, 1).expand(num_prompts, channels, height, width)
        masks, iou, _, _ = decoder(
            image_embeddings=coarse[index],
            image_positional_embeddings=positional.expand(num_prompts, -1, -1, -1),
            sparse_prompt_embeddings=prompts.to(dtype).reshape(num_prompts, 1, 1, channels),
            dense_prompt_embeddings=dense,
            multimask_output=False,
            high_resolution_features=high_res,
        )
        # masks: (n, 1, 1, 4h, 4w), iou: (n, 1, 1)
        return masks[:, 0, 0], iou[:, 0, 0]
