"""KeySegModel: VLM + ``text_hidden_fcs`` + keyword fusion + SAM, with the KeySeg losses.

Data flow for one conversation row (SPEC §2)::

    ids --VLM--> last hidden (L, H) --gather [SEG]/[KEY]--> text_hidden_fcs --> (n, d), (m, d)
    (n, d), (m, d) --KeywordFusion--> prompts (n, d) --SAM decoder--> (n, 4h, 4w) --post--> masks
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from keyseg import tokens
from keyseg.batch import Batch
from keyseg.config import ModelConfig, from_dict, to_dict
from keyseg.errors import KeySegCheckpointError, KeySegInputError
from keyseg.io import atomic_directory
from keyseg.model.backbone import (
    VisionLanguageBackbone,
    build_vlm,
    num_image_tokens,
    vlm_from_config_dict,
)
from keyseg.model.fusion import KeywordFusion
from keyseg.model.losses import dice_loss, keyword_alignment_loss, sigmoid_ce_loss
from keyseg.model.sam import SamSegmenter, build_segmenter, segmenter_from_config_dict
from keyseg.processor import KeySegProcessor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # single-file layout, still read; new saves are sharded


@contextlib.contextmanager
def skip_init(dtype: torch.dtype | None = None) -> Iterator[None]:
    """Build modules without running their random init (every tensor is loaded right
    after, strictly) and, given ``dtype``, directly in that dtype — a 7B model then costs
    neither an fp32 copy nor minutes of init. Non-persistent buffers (rotary tables) are
    still computed normally."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: init runs, still correct
        no_init_weights = contextlib.nullcontext
    previous = torch.get_default_dtype()
    try:
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def with_recorded_convention(saved: dict) -> dict:
    """A saved model config (``to_dict`` of :class:`ModelConfig`) with its tokenisation
    convention made explicit: directories written before ``backbone.convention`` existed were
    trained with whitespace kept around the added tokens, so they load as ``"v0"`` and
    tokenise exactly as they did."""
    backbone = dict(saved.get("backbone") or {})
    backbone.setdefault("convention", "v0")
    return {**saved, "backbone": backbone}


@dataclass
class KeySegOutput:
    """Losses are scalars (``loss`` is the weighted sum); ``pred_masks`` holds per row the
    ``(n_seg, H, W)`` mask logits at the original image size."""

    loss: torch.Tensor
    ce: torch.Tensor
    bce: torch.Tensor
    dice: torch.Tensor
    key: torch.Tensor
    pred_masks: list[torch.Tensor] = field(default_factory=list)

    def loss_parts(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "ce", "bce", "dice", "key")}


def _projection_head(hidden: int, out: int) -> nn.Sequential:
    """Linear(H,H) -> ReLU -> Linear(H,d) -> Dropout(0), LISA's ``text_hidden_fcs``."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out),
                         nn.Dropout(0.0))


class KeySegModel(nn.Module):
    """The KeySeg model. Build with :meth:`from_config` or :meth:`from_pretrained`."""

    def __init__(
        self,
        config: ModelConfig,
        backbone: VisionLanguageBackbone,
        sam: SamSegmenter,
        processor: KeySegProcessor,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.sam = sam
        self.processor = processor
        hidden, dim = backbone.hidden_size, config.fusion.dim
        if sam.prompt_dim != dim:
            raise KeySegCheckpointError(
                f"model.fusion.dim={dim} must equal the SAM prompt width {sam.prompt_dim}"
            )
        self.text_hidden_fcs = _projection_head(hidden, dim)
        self.keyword_text_proj = (
            _projection_head(hidden, dim) if config.key_projection == "separate" else None
        )
        self.keyword_fusion = KeywordFusion(config.fusion)
        self.embedding_table_proj = nn.Linear(hidden, dim)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer=None,
                    dtype: torch.dtype | None = None) -> KeySegModel:
        """Build from config: pretrained VLM if ``backbone.name_or_path`` is set, else a
        local preset (random); SAM from ``sam.preset`` (+ official checkpoint if given)."""
        vlm, image_processor, tokenizer = build_vlm(config.backbone, tokenizer, dtype)
        sam = build_segmenter(config.sam.family, config.sam.preset, prompt_dim=config.fusion.dim,
                              checkpoint=config.sam.checkpoint)
        processor = KeySegProcessor(
            tokenizer, image_processor, config.backbone,
            num_image_tokens=num_image_tokens(vlm.config), sam_image_size=sam.image_size,
            sam_family=sam.family,
        )
        tokens.resize_embeddings(vlm, tokenizer)
        model = cls(config, VisionLanguageBackbone(vlm), sam, processor)
        return model.to(dtype) if dtype is not None else model

    # --- persistence ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike,
                        max_shard_bytes: int | None = None) -> None:
        """Write config, weights (safetensors shards + ``model.safetensors.index.json``) and
        processor files, atomically (a crash leaves any previous directory intact)."""
        from keyseg.convert.checkpoint_io import DEFAULT_SHARD_BYTES, save_sharded_safetensors

        lora = hasattr(self.backbone.vlm, "peft_config")
        meta = {
            "keyseg": to_dict(self.config),
            "vlm": self.backbone.base.config.to_dict(),
            "sam": self.sam.config.to_dict(),
            "lora_applied": lora,
        }
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))
            save_sharded_safetensors(self.state_dict(), tmp,
                                     max_shard_bytes or DEFAULT_SHARD_BYTES)
            self.processor.save_pretrained(tmp)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        dtype: torch.dtype | None = None) -> KeySegModel:
        """Load a directory written by :meth:`save_pretrained` (no network).

        The model is built without random init (directly in ``dtype`` when given) and every
        tensor is then loaded by exact name.
        """
        from keyseg.convert.checkpoint_io import load_weights_dir

        directory = Path(directory)
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            raise KeySegCheckpointError(f"{config_file}: missing (not a KeySeg model directory)")
        meta = json.loads(config_file.read_text(encoding="utf-8"))
        config = from_dict(ModelConfig, with_recorded_convention(meta["keyseg"]),
                           source=str(config_file))
        processor = KeySegProcessor.from_pretrained(directory, config.backbone)
        with skip_init(dtype):
            vlm = vlm_from_config_dict(config.backbone, meta["vlm"])
            sam = segmenter_from_config_dict(config.sam.family, meta["sam"])
            model = cls(config, VisionLanguageBackbone(vlm), sam, processor)
            if meta.get("lora_applied"):
                from keyseg.model.trainable import apply_lora

                apply_lora(model, config.lora)
        weights = load_weights_dir(directory)
        model.load_checkpoint_state(weights.tensors, source=str(weights.source))
        model.sam.tie_positional_encoding()
        return model.to(dtype) if dtype is not None else model

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str,
                              strict: bool = True) -> None:
        """Load tensors by exact name; report the first missing / unexpected / misshapen one."""
        own = self.state_dict()
        for name, tensor in state.items():
            if name in own and own[name].shape != tensor.shape:
                raise KeySegCheckpointError(
                    f"{source}: {name}: shape {tuple(tensor.shape)} does not match the model's "
                    f"{tuple(own[name].shape)}"
                )
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if unexpected:
            raise KeySegCheckpointError(f"{source}: unexpected tensor {unexpected[0]} "
                                        f"({len(unexpected)} in all)")
        if strict and missing:
            raise KeySegCheckpointError(f"{source}: missing tensor {missing[0]} "
                                        f"({len(missing)} in all)")
        self.load_state_dict(state, strict=False)

    # --- pieces ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embedding_table_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_table_proj.weight.dtype

    def encode_images(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, C, h, w)``; no graph is kept when the encoder is frozen."""
        encoder = self.sam.sam.vision_encoder
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.sam.encode_images(sam_pixel_values)

    def special_embeddings(
        self, input_ids: torch.Tensor, last_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected ``[SEG]`` and ``[KEY]`` embeddings of one row.

        Args:
            input_ids: ``(L,)`` ids as the LM saw them.
            last_hidden: ``(L, H)`` last-layer hidden states of that row.

        Returns:
            ``seg: (n_seg, d)`` and ``key: (n_key, d)``.
        """
        choice = self.config.backbone.hidden_state
        ids = self.processor.ids
        seg_pos = tokens.special_positions(input_ids, ids.seg, choice)
        seg = self.text_hidden_fcs(last_hidden[seg_pos])
        if not self.config.use_keyword:
            return seg, seg.new_zeros((0, seg.shape[-1]))
        key_pos = tokens.special_positions(input_ids, ids.key, choice)
        key_head = self.keyword_text_proj or self.text_hidden_fcs
        return seg, key_head(last_hidden[key_pos])

    def masks_from_hidden(
        self,
        input_ids: torch.Tensor,
        last_hidden: torch.Tensor,
        image_embedding: torch.Tensor,
        resized_size: tuple[int, int],
        original_size: tuple[int, int],
        keys: str = "all",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for one row: ``(n_seg, H, W)`` logits, ``(n_seg,)`` IoU scores, and the
        ``(n_key, d)`` ``[KEY]`` embeddings. A row without ``[SEG]`` gives ``n_seg = 0``.
        ``keys``: which ``[KEY]`` rows are fused (see :meth:`decode_rows`)."""
        (result,) = self.decode_rows(
            input_ids[None], last_hidden[None], image_embedding[None],
            torch.zeros(1, dtype=torch.long), [resized_size], [original_size], keys=keys,
        )
        return result

    def decode_rows(
        self,
        input_ids: torch.Tensor,
        last_hidden: torch.Tensor,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        resized_sizes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
        keys: str = "all",
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Masks for every row of a batch, with one batched SAM decoder call.

        Args:
            input_ids: ``(B, L)``; last_hidden: ``(B, L, H)``.
            image_embeddings: ``(N_img, C, h, w)``; image_index: ``(B,)`` row -> image.
            resized_sizes, original_sizes: per image.
            keys: ``"all"`` fuses every ``[KEY]`` of a row; ``"first"`` only the first (the
                reference's generation, ``FusionConfig.generation_keys``).

        Returns:
            Per row ``(masks (n_seg, H, W) logits, scores (n_seg,), key (n_key, d))``.
        """
        prompts, key_rows = [], []
        for row in range(input_ids.shape[0]):
            seg, key = self.special_embeddings(input_ids[row], last_hidden[row])
            prompts.append(self.keyword_fusion(seg, key[:1] if keys == "first" else key))
            key_rows.append(key)
        counts = [p.shape[0] for p in prompts]
        prompt_image = torch.repeat_interleave(
            image_index.to(image_embeddings.device),
            torch.tensor(counts, device=image_embeddings.device),
        )
        low_res, scores = self.sam.decode_many(image_embeddings, prompt_image, torch.cat(prompts))
        results = []
        for row, (low, score) in enumerate(zip(low_res.split(counts), scores.split(counts),
                                               strict=True)):
            image = int(image_index[row])
            masks = self.sam.postprocess_masks(low, resized_sizes[image], original_sizes[image])
            results.append((masks, score, key_rows[row]))
        return results

    def projected_table(self) -> torch.Tensor:
        """The LM input-embedding table ``(V, H)`` through the keyword projection ->
        ``(V, d)``."""
        return self.embedding_table_proj(self.backbone.input_embeddings().weight)

    @property
    def non_output_ids(self) -> tuple[int, ...]:
        """Vocabulary rows that are not classes: the image placeholder, which LLaVA-v1 and
        LISA never had as a token (they splice the image in by a negative id) and no answer
        ever contains. Left out of CE, the keyword softmax and generation, so a converted
        model has exactly the reference's classes."""
        return (self.processor.ids.image,)

    # --- training forward -----------------------------------------------------------------
    def forward(self, batch: Batch) -> KeySegOutput:
        """Teacher-forced forward with all losses (SPEC §3).

        Requires ``batch.labels`` and ``batch.target_masks``; every row must contain as many
        ``[SEG]`` tokens as it has target masks.
        """
        if batch.labels is None or batch.target_masks is None:
            raise KeySegInputError("forward() needs labels and target masks; use predict()")
        loss_cfg = self.config.loss
        image_embeddings = self.encode_images(batch.sam_pixel_values)
        out = self.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
        logits = out.logits[:, :-1].float()
        not_class = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        not_class[[i for i in self.non_output_ids if i < logits.shape[-1]]] = True
        ce = F.cross_entropy(
            logits.masked_fill(not_class, float("-inf")).flatten(0, 1),
            batch.labels[:, 1:].flatten(),
            ignore_index=tokens.IGNORE_INDEX,
        )
        pred_masks, key_rows, keyword_ids = [], [], []
        bce = dice = out.logits.new_zeros((), dtype=torch.float32)
        num_masks = sum(int(m.shape[0]) for m in batch.target_masks)
        decoded = self.decode_rows(batch.input_ids, out.last_hidden, image_embeddings,
                                   batch.image_index, batch.resized_sizes, batch.original_sizes)
        for row, (masks, _, key) in enumerate(decoded):
            ids = batch.input_ids[row]
            target = batch.target_masks[row].to(masks.device)
            if masks.shape[0] != target.shape[0]:
                raise KeySegInputError(
                    f"{self._row_name(batch, row)}: {masks.shape[0]} {tokens.SEG_TOKEN} in the "
                    f"answer but {target.shape[0]} target masks"
                )
            if masks.shape[0] == 0:
                raise KeySegInputError(
                    f"{self._row_name(batch, row)}: training answer has no {tokens.SEG_TOKEN}"
                )
            valid = None
            if loss_cfg.ignore_index is not None:
                valid = target != loss_cfg.ignore_index
            binary = (target == 1).float()
            masks32 = masks.float()
            bce = bce + sigmoid_ce_loss(masks32, binary, num_masks, valid)
            dice = dice + dice_loss(masks32, binary, num_masks, valid,
                                    scale=loss_cfg.dice_scale, eps=loss_cfg.dice_eps)
            pred_masks.append(masks)
            if key.shape[0]:
                key_rows.append(key)
                keyword_ids.extend(tokens.keyword_token_ids(ids, self.processor.ids))
        if key_rows and self.config.use_keyword:
            key_loss = keyword_alignment_loss(
                torch.cat(key_rows), self.projected_table(), keyword_ids,
                temperature=loss_cfg.key_temperature, target=loss_cfg.key_target,
                ignore_ids=(self.processor.ids.pad,), exclude_ids=self.non_output_ids,
            )
        else:
            key_loss = bce.new_zeros(())
        loss = (loss_cfg.ce_weight * ce + loss_cfg.bce_weight * bce
                + loss_cfg.dice_weight * dice + loss_cfg.key_weight * key_loss)
        return KeySegOutput(loss=loss, ce=ce, bce=bce, dice=dice, key=key_loss,
                            pred_masks=pred_masks)

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[torch.Tensor]:
        """Masks for the ``[SEG]`` tokens already present in ``batch.input_ids``
        (teacher-forced). Returns per row ``(n_seg, H, W)`` logits; a row without ``[SEG]``
        gets an empty ``(0, H, W)`` tensor, not an error."""
        image_embeddings = self.encode_images(batch.sam_pixel_values)
        out = self.backbone(batch.input_ids, batch.attention_mask, batch.vision_inputs)
        decoded = self.decode_rows(batch.input_ids, out.last_hidden, image_embeddings,
                                   batch.image_index, batch.resized_sizes, batch.original_sizes)
        return [masks for masks, _, _ in decoded]

    @staticmethod
    def _row_name(batch: Batch, row: int) -> str:
        return batch.sample_ids[row] if row < len(batch.sample_ids) else f"row {row}"
