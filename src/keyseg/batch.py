"""The one batch type that flows from collation to the model to the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    """A batch of conversations about one or more images.

    Rows (``B``) are conversations; several rows may share an image (``image_index``), whose
    SAM embedding is then computed once.

    Attributes:
        input_ids: ``(B, L)`` long, image tokens expanded.
        attention_mask: ``(B, L)`` long.
        labels: ``(B, L)`` long with ``-100`` on non-assistant tokens; None for prompts.
        vision_inputs: the VLM image processor's tensors per row, e.g.
            ``pixel_values (B, 3, h, w)``.
        sam_pixel_values: ``(N_img, 3, S, S)`` SAM-normalised, padded images.
        image_index: ``(B,)`` long, row -> image in ``sam_pixel_values``.
        resized_sizes: ``N_img`` ``(h, w)`` sizes after the SAM resize (before padding).
        original_sizes: ``N_img`` ``(H, W)`` original image sizes.
        target_masks: per row, ``(n_seg, H, W)`` uint8 in {0, 1, 255} (one per ``[SEG]`` in
            the row's answer, in order), or None at inference.
        sample_ids: per row, an identifier for reports and error messages.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision_inputs: dict[str, torch.Tensor]
    sam_pixel_values: torch.Tensor
    image_index: torch.Tensor
    resized_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]
    labels: torch.Tensor | None = None
    target_masks: list[torch.Tensor] | None = None
    sample_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; floating image tensors are cast to ``dtype`` if given
        (ids, masks and targets keep their dtypes)."""

        def move(value):
            if isinstance(value, torch.Tensor):
                if dtype is not None and value.is_floating_point():
                    return value.to(device=device, dtype=dtype)
                return value.to(device)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                return [v.to(device) for v in value]
            return value

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})
