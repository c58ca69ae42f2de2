"""SAM for KeySeg: build transformers' ``SamModel`` by preset, encode images, decode masks.

KeySeg uses SAM the way LISA does (SPEC §2.1, §2.5): the image encoder turns a padded,
normalised ``S x S`` image into a ``(C, h, w)`` embedding once; every fused ``[SEG]``
embedding is then *one sparse prompt token* for the prompt-aware mask decoder, with the
prompt encoder's dense "no mask" embedding and single-mask output. Low-res logits are
mapped back to the original image by :meth:`SamSegmenter.postprocess_masks`.

Sizes are plain builder functions in :data:`SAM_PRESETS` (as segment-anything's
``build_sam``): ``vit_h`` / ``vit_l`` / ``vit_b`` equal the released checkpoints, ``tiny``
is a random-weight model for tests. The prompt width ``prompt_dim`` (256 in every released
SAM) is the width of the ``[SEG]`` embeddings the language side must produce.

Submodules keep transformers' names so that freezing can address them:
``.sam.vision_encoder``, ``.sam.prompt_encoder``, ``.sam.mask_decoder`` and
``.sam.shared_image_embedding`` (the random-Fourier positional encoding, shared with and
tied to ``.sam.prompt_encoder.shared_embedding``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import SamConfig, SamModel

from keyseg.errors import KeySegConfigError

DEFAULT_PROMPT_DIM = 256


def _build_config(
    *,
    encoder_dim: int,
    encoder_depth: int,
    encoder_heads: int,
    global_attn_indexes: Sequence[int],
    image_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    encoder_mlp_dim: int | None = None,
    prompt_dim: int = DEFAULT_PROMPT_DIM,
    decoder_mlp_dim: int = 2048,
    decoder_heads: int = 8,
    decoder_depth: int = 2,
    iou_head_hidden_dim: int = 256,
) -> SamConfig:
    """The one place every preset goes through (segment-anything's ``_build_sam``)."""
    if prompt_dim % 8:
        # The mask decoder upscales to prompt_dim // 8 channels and the Fourier encoding
        # has prompt_dim // 2 features.
        raise KeySegConfigError(f"SAM prompt_dim must be a multiple of 8, got {prompt_dim}")
    vision = {
        "hidden_size": encoder_dim,
        "num_hidden_layers": encoder_depth,
        "num_attention_heads": encoder_heads,
        "global_attn_indexes": list(global_attn_indexes),
        "image_size": image_size,
        "patch_size": patch_size,
        "window_size": window_size,
        "mlp_dim": encoder_mlp_dim if encoder_mlp_dim is not None else 4 * encoder_dim,
        # The neck projects to the prompt width: image embedding and prompts live in one space.
        "output_channels": prompt_dim,
        # Random-Fourier positional encoding: prompt_dim // 2 frequencies -> sin+cos = prompt_dim.
        "num_pos_feats": prompt_dim // 2,
        "use_abs_pos": True,
        "use_rel_pos": True,
        "qkv_bias": True,
        "layer_norm_eps": 1e-6,
    }
    prompt_encoder = {
        "hidden_size": prompt_dim,
        "image_size": image_size,
        "patch_size": patch_size,
        "mask_input_channels": 16,
        "num_point_embeddings": 4,
    }
    mask_decoder = {
        "hidden_size": prompt_dim,
        "mlp_dim": decoder_mlp_dim,
        "num_attention_heads": decoder_heads,
        "num_hidden_layers": decoder_depth,
        "attention_downsample_rate": 2,
        "num_multimask_outputs": 3,
        # Depth 3 is what segment-anything uses and what keyseg.convert.sam's table expects.
        "iou_head_depth": 3,
        "iou_head_hidden_dim": iou_head_hidden_dim,
        # segment-anything's TwoWayAttentionBlock uses nn.LayerNorm's default eps (1e-5);
        # transformers' default (1e-6) would make converted outputs drift slightly.
        "layer_norm_eps": 1e-5,
    }
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=prompt_encoder,
        mask_decoder_config=mask_decoder,
    )


def _vit_h(prompt_dim: int = DEFAULT_PROMPT_DIM) -> SamConfig:
    """The released ViT-H SAM (``sam_vit_h_4b8939.pth``): 1280 wide, 32 blocks, 16 heads."""
    return _build_config(
        encoder_dim=1280,
        encoder_depth=32,
        encoder_heads=16,
        global_attn_indexes=(7, 15, 23, 31),
        prompt_dim=prompt_dim,
    )


def _vit_l(prompt_dim: int = DEFAULT_PROMPT_DIM) -> SamConfig:
    """The released ViT-L SAM (``sam_vit_l_0b3195.pth``): 1024 wide, 24 blocks, 16 heads."""
    return _build_config(
        encoder_dim=1024,
        encoder_depth=24,
        encoder_heads=16,
        global_attn_indexes=(5, 11, 17, 23),
        prompt_dim=prompt_dim,
    )


def _vit_b(prompt_dim: int = DEFAULT_PROMPT_DIM) -> SamConfig:
    """The released ViT-B SAM (``sam_vit_b_01ec64.pth``): 768 wide, 12 blocks, 12 heads."""
    return _build_config(
        encoder_dim=768,
        encoder_depth=12,
        encoder_heads=12,
        global_attn_indexes=(2, 5, 8, 11),
        prompt_dim=prompt_dim,
    )


def _tiny(prompt_dim: int = DEFAULT_PROMPT_DIM) -> SamConfig:
    """A random-weight SAM for tests: 256 px input -> 16x16 embedding -> 64x64 masks.

    Same module tree as ViT-H (windowed + global attention, neck, full prompt encoder,
    two-layer two-way transformer), only narrower; ~2M parameters at ``prompt_dim=256``,
    most of them in the mask decoder, whose width is fixed by ``prompt_dim``.
    """
    return _build_config(
        encoder_dim=32,
        encoder_depth=2,
        encoder_heads=2,
        global_attn_indexes=(1,),
        image_size=256,
        patch_size=16,
        window_size=8,
        encoder_mlp_dim=64,
        prompt_dim=prompt_dim,
        decoder_mlp_dim=64,
        decoder_heads=2,
        iou_head_hidden_dim=32,
    )


def _shapes_world_sam(image_size: int, prompt_dim: int) -> SamConfig:
    """The shapes world's SAMs: 64 wide x 3 blocks (the last global), patch 8, prompt width
    128 by default; only the input size differs between the presets."""
    return _build_config(
        encoder_dim=64,
        encoder_depth=3,
        encoder_heads=4,
        global_attn_indexes=(2,),
        image_size=image_size,
        patch_size=8,
        window_size=8,
        encoder_mlp_dim=128,
        prompt_dim=prompt_dim,
        decoder_mlp_dim=256,
        decoder_heads=4,
        iou_head_hidden_dim=64,
    )


def _shapes(prompt_dim: int = 128) -> SamConfig:
    """The first embedded default's SAM: 128 px input (the 192 px shapes images are resized
    down) -> 16x16 embedding -> 64x64 masks; trained from scratch on CPU.

    128 rather than 192 px: with a perfect concept prompt, a 192 px / 24x24 encoder and this
    one reached the same mask quality per step (val gIoU 0.31 vs 0.30 after 600 steps), but
    the global-attention layer over 576 tokens made the 192 px encoder 3x slower per step.
    """
    return _shapes_world_sam(128, prompt_dim)


def _shapes192(prompt_dim: int = 128) -> SamConfig:
    """A SAM at the shapes world's native 192 px: patch 8 -> 24x24 embedding -> 96x96 masks.

    Pretrained class-agnostically with point and box prompts (``experiments/pretrain_sam.py``)
    before KeySeg fine-tuning, the way released SAMs arrive pretrained. Per wall-clock second
    it learns faster than the 128 px ``shapes`` preset, whose 16x16 grid blurs small shapes.
    """
    return _shapes_world_sam(192, prompt_dim)


# Preset name -> config builder (segment-anything's ``sam_model_registry`` idea).
SAM_PRESETS: dict[str, Callable[..., SamConfig]] = {
    "vit_h": _vit_h,
    "vit_l": _vit_l,
    "vit_b": _vit_b,
    "tiny": _tiny,
    "shapes": _shapes,
    "shapes192": _shapes192,
}


def sam_config(preset: str, *, prompt_dim: int = DEFAULT_PROMPT_DIM) -> SamConfig:
    """The ``SamConfig`` of a named preset (see :data:`SAM_PRESETS`).

    Args:
        preset: ``"vit_h"``, ``"vit_l"``, ``"vit_b"`` or ``"tiny"``.
        prompt_dim: width of prompts, image embedding and mask decoder (256 in released SAMs).
    """
    try:
        builder = SAM_PRESETS[preset]
    except KeyError:
        known = ", ".join(sorted(SAM_PRESETS))
        raise KeySegConfigError(f"unknown SAM preset {preset!r} (known: {known})") from None
    return builder(prompt_dim=prompt_dim)


class SamSegmenter(torch.nn.Module):
    """SAM as KeySeg uses it: image -> embedding once, then prompt embeddings -> masks.

    Follows the device and dtype of its parameters: inputs are cast to the parameter dtype,
    nothing is moved to a hard-coded device.
    """

    #: ``SamSettings.family`` of this segmenter (``keyseg.model.sam2.Sam2Segmenter``: "sam2").
    family = "sam"

    def __init__(self, config: SamConfig | SamModel) -> None:
        """Build a randomly initialised ``SamModel`` from ``config``, or wrap a built one."""
        super().__init__()
        self.sam = config if isinstance(config, SamModel) else SamModel(config)

    def component_modules(self) -> dict[str, list[torch.nn.Module]]:
        """The ``model.trainable`` groups of this segmenter (see ``keyseg.model.trainable``)."""
        sam = self.sam
        return {
            "sam_image_encoder": [sam.vision_encoder],
            "sam_prompt_encoder": [sam.prompt_encoder, sam.shared_image_embedding],
            "sam_mask_decoder": [sam.mask_decoder],
        }

    @classmethod
    def from_preset(cls, name: str, *, prompt_dim: int = DEFAULT_PROMPT_DIM) -> SamSegmenter:
        """A randomly initialised segmenter of a named preset (weights come from a loader)."""
        return cls(sam_config(name, prompt_dim=prompt_dim))

    @property
    def config(self) -> SamConfig:
        return self.sam.config

    @property
    def image_size(self) -> int:
        """Side ``S`` of the square, padded encoder input (1024 for released SAMs)."""
        return int(self.sam.config.vision_config.image_size)

    @property
    def embedding_size(self) -> int:
        """Side ``h = w`` of the image embedding grid (``S // patch_size``; 64 for ViT-H)."""
        return int(self.sam.config.prompt_encoder_config.image_embedding_size)

    @property
    def prompt_dim(self) -> int:
        """Width ``C`` of prompt tokens and image embeddings (256 for released SAMs)."""
        return int(self.sam.config.mask_decoder_config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.sam.mask_decoder.iou_token.weight.dtype

    def tie_positional_encoding(self) -> None:
        """Make the prompt encoder share the image-wide random-Fourier matrix again.

        ``SamModel`` ties the two; loaders that build without init (meta device, ``assign``)
        end up with two separate copies, which would then train apart.
        """
        shared = self.sam.shared_image_embedding.positional_embedding
        self.sam.prompt_encoder.shared_embedding.positional_embedding = shared

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Run the image encoder.

        Args:
            pixel_values: ``(B, 3, S, S)`` normalised, zero-padded images, ``S = image_size``.

        Returns:
            ``(B, C, h, w)`` image embeddings (``(B, 256, 64, 64)`` for ViT-H).
        """
        encoder = self.sam.vision_encoder
        pixel_values = pixel_values.to(encoder.patch_embed.projection.weight.dtype)
        # Not SamModel.get_image_embeddings: that one is wrapped in no_grad; whether the
        # encoder gets gradients is the caller's (freezing) decision.
        return encoder(pixel_values).last_hidden_state

    def decode(self, image_embedding: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Predict one mask per prompt token for one image.

        Each row of ``prompts`` is a single sparse prompt token (LISA's ``text_embeds``), so
        the decoder sees a point batch of ``n`` prompts of one token each; dense prompt =
        the "no mask" embedding; ``multimask_output=False``.

        Args:
            image_embedding: ``(C, h, w)`` one image's embedding from :meth:`encode_images`.
            prompts: ``(n, C)`` prompt embeddings (fused ``[SEG]`` rows); ``n`` may be 0.

        Returns:
            ``low_res_masks``: ``(n, 4h, 4w)`` logits (``(n, 256, 256)`` for ViT-H) and
            ``iou_scores``: ``(n,)`` predicted mask quality.
        """
        channels, height, width = image_embedding.shape
        if prompts.ndim != 2 or prompts.shape[1] != channels:
            raise ValueError(
                f"prompts must be (n, {channels}) to match the image embedding "
                f"(C={channels}), got {tuple(prompts.shape)}"
            )
        dtype = self.dtype
        num_prompts = prompts.shape[0]
        if num_prompts == 0:
            # The decoder cannot run an empty point batch; shapes still follow the contract.
            empty = image_embedding.new_zeros((0, 4 * height, 4 * width), dtype=dtype)
            return empty, image_embedding.new_zeros((0,), dtype=dtype)
        if (height, width) != (self.embedding_size, self.embedding_size):
            raise ValueError(
                f"image embedding grid {height}x{width} does not match this SAM "
                f"({self.embedding_size}x{self.embedding_size})"
            )

        image = image_embedding.to(dtype).unsqueeze(0)  # (1, C, h, w)
        positional = self.sam.get_image_wide_positional_embeddings().to(dtype)  # (1, C, h, w)
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight  # (1, C)
        dense = no_mask.reshape(1, channels, 1, 1).expand(1, channels, height, width)
        # (batch=1, point_batch=n, tokens_per_prompt=1, C): n independent one-token prompts.
        sparse = prompts.to(dtype).reshape(1, num_prompts, 1, channels)
        masks, iou = self.sam.mask_decoder(
            image_embeddings=image,
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        # masks: (1, n, 1, 4h, 4w), iou: (1, n, 1)
        return masks[0, :, 0], iou[0, :, 0]

    def decode_many(
        self, image_embeddings: Tensor, image_index: Tensor, prompts: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Decode prompts that belong to different images in one decoder call.

        Same result as :meth:`decode` per image (every prompt is decoded independently), but
        one batched call instead of a Python loop over rows — the loop dominated small models.

        Args:
            image_embeddings: ``(N_img, C, h, w)`` from :meth:`encode_images`.
            image_index: ``(n,)`` long, the image of each prompt.
            prompts: ``(n, C)`` prompt embeddings.

        Returns:
            ``(n, 4h, 4w)`` low-res logits and ``(n,)`` IoU scores.
        """
        _, channels, height, width = image_embeddings.shape
        num_prompts = prompts.shape[0]
        if num_prompts == 0:
            return self.decode(image_embeddings[0], prompts)
        dtype = self.dtype
        image = image_embeddings.to(dtype)[image_index]  # (n, C, h, w)
        positional = self.sam.get_image_wide_positional_embeddings().to(dtype)
        no_mask = self.sam.prompt_encoder.no_mask_embed.weight
        dense = no_mask.reshape(1, channels, 1, 1).expand(num_prompts, channels, height, width)
        # batch = n prompts, each a point batch of one one-token prompt.
        masks, iou = self.sam.mask_decoder(
            image_embeddings=image,
            image_positional_embeddings=positional.expand(num_prompts, -1, -1, -1),
            sparse_prompt_embeddings=prompts.to(dtype).reshape(num_prompts, 1, 1, channels),
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[:, 0, 0], iou[:, 0, 0]

    def postprocess_masks(
        self,
        low_res_masks: Tensor,
        resized_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Tensor:
        """Undo the SAM input transform on mask logits (segment-anything's ``postprocess_masks``).

        Args:
            low_res_masks: ``(n, h', w')`` logits from :meth:`decode`.
            resized_size: ``(h, w)`` of the image after the longest-side resize, before padding.
            original_size: ``(H, W)`` of the image as loaded.

        Returns:
            ``(n, H, W)`` logits: upsampled to ``S x S``, padding cropped, resized to ``(H, W)``.
        """
        size = self.image_size
        resized_h, resized_w = (int(v) for v in resized_size)
        original_h, original_w = (int(v) for v in original_size)
        if low_res_masks.shape[0] == 0:
            return low_res_masks.new_zeros((0, original_h, original_w))
        masks = F.interpolate(
            low_res_masks.unsqueeze(1), (size, size), mode="bilinear", align_corners=False
        )
        masks = masks[..., :resized_h, :resized_w]  # drop the bottom/right zero padding
        masks = F.interpolate(masks, (original_h, original_w), mode="bilinear", align_corners=False)
        return masks.squeeze(1)
