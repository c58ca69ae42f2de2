"""KeySegProcessor: everything that turns (image, conversation) into model inputs.

Bundles the tokenizer (with ``[SEG]``/``[KEY]``), the VLM's image processor, the SAM input
transform and the conversation format — the counterpart of an HF processor. Data collation,
the pipeline and evaluation all go through it, so training and inference see identical ids.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from keyseg import tokens
from keyseg.config import BackboneConfig
from keyseg.errors import KeySegCheckpointError
from keyseg.io import atomic_write_json
from keyseg.transforms import SamInput, sam2_preprocess, sam_preprocess

PROCESSOR_FILE = "keyseg_processor.json"


@dataclass
class PreparedImage:
    """One image ready for both encoders.

    Attributes:
        vision_inputs: the VLM image processor's tensors with a leading batch axis of 1,
            e.g. ``pixel_values (1, 3, h, w)``.
        sam: SAM input ``(3, S, S)`` plus resized/original sizes.
        num_image_tokens: image tokens the backbone produces for this image (fixed for
            LLaVA; per image for dynamic-resolution families such as Qwen2-VL).
    """

    vision_inputs: dict[str, torch.Tensor]
    sam: SamInput
    num_image_tokens: int | None = None


class KeySegProcessor:
    """Tokenizer + image processors + conversation format for one KeySeg model."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        backbone: BackboneConfig,
        num_image_tokens: int,
        sam_image_size: int,
        sam_family: str = "sam",
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.backbone = backbone
        self.num_image_tokens = num_image_tokens
        self.sam_image_size = sam_image_size
        self.sam_family = sam_family  # "sam2": SAM 2's square resize, not SAM's resize + pad
        # Tokens this processor added to the tokenizer (their embedding rows need an init).
        self.added_tokens = tokens.add_special_tokens(
            tokenizer, backbone.image_token, backbone.use_im_start_end,
            strip_spaces=backbone.convention == "lisa")
        self.ids = tokens.special_token_ids(
            tokenizer, backbone.image_token, backbone.use_im_start_end
        )

    # --- images ---------------------------------------------------------------------------
    def prepare_image(self, image: Image.Image) -> PreparedImage:
        """``image``: an RGB PIL image (see :func:`keyseg.images.load_image`)."""
        vision = self.image_processor(images=[image], return_tensors="pt")
        vision_inputs = {k: v for k, v in vision.items() if isinstance(v, torch.Tensor)}
        count = self.num_image_tokens
        if "image_grid_thw" in vision_inputs:
            # Dynamic resolution (Qwen2-VL): t*h*w patches, merge_size^2 patches per token.
            merge = int(getattr(self.image_processor, "merge_size", 1))
            count = int(vision_inputs["image_grid_thw"].prod(-1).sum()) // (merge * merge)
        transform = sam2_preprocess if self.sam_family == "sam2" else sam_preprocess
        return PreparedImage(vision_inputs, transform(image, self.sam_image_size), count)

    # --- text -----------------------------------------------------------------------------
    @property
    def template(self) -> str:
        """Conversation format of the backbone family (a key of ``tokens.TEMPLATES``)."""
        return "chatml" if self.backbone.family.startswith("qwen") else "llava_v1"

    def encode(self, turns: Sequence[tokens.Turn],
               num_image_tokens: int | None = None) -> tokens.EncodedConversation:
        """Ids and labels of a conversation (last turn without answer = generation prompt).

        ``num_image_tokens``: the image's count (``PreparedImage.num_image_tokens``); None
        uses the backbone's fixed count (LLaVA).
        """
        count = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        return tokens.encode_conversation(
            self.tokenizer,
            turns,
            self.ids,
            num_image_tokens=count,
            system_prompt=self.backbone.system_prompt,
            image_token=self.backbone.image_token,
            template=self.template,
            convention=self.backbone.convention,
        )

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of generated ids, keeping ``[SEG]``/``[KEY]``; drops end-of-sequence/pad."""
        return tokens.tidy_spacing(self.tokenizer.decode(ids, skip_special_tokens=True))

    # --- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        atomic_write_json(
            directory / PROCESSOR_FILE,
            {"num_image_tokens": self.num_image_tokens, "sam_image_size": self.sam_image_size,
             "sam_family": self.sam_family},
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        backbone: BackboneConfig) -> KeySegProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        directory = Path(directory)
        meta_file = directory / PROCESSOR_FILE
        if not meta_file.is_file():
            raise KeySegCheckpointError(f"{meta_file}: missing (not a KeySeg model directory?)")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if backbone.family.startswith("qwen"):
            from transformers import Qwen2VLImageProcessorPil

            # The PIL variant: no torchvision needed.
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        else:
            image_processor = AutoImageProcessor.from_pretrained(directory)
        return cls(tokenizer, image_processor, backbone, meta["num_image_tokens"],
                   meta["sam_image_size"], meta.get("sam_family", "sam"))
