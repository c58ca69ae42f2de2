"""KeySegModel: VLM + ``text_hidden_fcs`` + keyword fusion + SAM, with the KeySeg losses.

Data flow for one conversation row (SPEC §2)::

    ids --VLM--> last hidden (L, H) --gather [SEG]/[KEY]--> text_hidden_fcs --> (n, d), (m, d)
    (n, d), (m, d) --KeywordFusion--> prompts (n, d) --SAM decoder--> (n, 4h, 4w) --post--> masks
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Sam2Config, SamConfig

from keyseg import tokens
from keyseg.batch import Batch
from keyseg.config import ModelConfig, to_dict
from keyseg.errors import KeySegCheckpointError, KeySegConfigError, KeySegInputError
from keyseg.io import atomic_directory
from keyseg.model.backbone import VisionLanguageBackbone, vlm_from_config
from keyseg.model.configuration import MODEL_TYPE, KeySegModelConfig
from keyseg.model.fusion import KeywordFusion
from keyseg.model.losses import dice_loss, keyword_alignment_loss, sigmoid_ce_loss
from keyseg.model.processing import ModelProcessor, load_processor
from keyseg.model.sam import SamSegmenter
from keyseg.model.sam2 import Sam2Segmenter

CONFIG_FILE = "config.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

#: ``SamSettings.family`` -> (transformers config class, segmenter class).
SEGMENTERS: dict[str, tuple[type, type[SamSegmenter]]] = {
    "sam": (SamConfig, SamSegmenter),
    "sam2": (Sam2Config, Sam2Segmenter),
}


def segmenter_from_config(family: str, config) -> SamSegmenter:
    """An untrained segmenter of ``family`` from its transformers config or a saved
    ``config.to_dict()`` (weights are loaded by the caller)."""
    if family not in SEGMENTERS:
        raise KeySegConfigError(
            f"model.sam.family: {family!r} is not one of {', '.join(map(repr, SEGMENTERS))}")
    config_class, segmenter_class = SEGMENTERS[family]
    return segmenter_class(config_class.from_dict(config) if isinstance(config, dict) else config)


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


class KeySegModel(PreTrainedModel):
    """The KeySeg model, a transformers ``PreTrainedModel``.

    Build with :func:`keyseg.build.build_keyseg` (our :class:`~keyseg.config.ModelConfig`;
    random or pretrained parts; :meth:`from_parts` around built ones) or load with
    :meth:`from_pretrained` (a directory or a Hub id; ``dtype``, ``device_map``,
    ``attn_implementation``, ``quantization_config`` and the other transformers options pass
    through). ``model.settings`` is the frozen KeySeg config (source of truth for training),
    ``model.config`` its transformers counterpart, and ``model.processor`` the
    :class:`~keyseg.processor.KeySegProcessor` (tokenizer, image transforms) that every
    loader attaches; the model itself reads only its token ids
    (:class:`~keyseg.model.processing.ModelProcessor`).
    """

    config_class = KeySegModelConfig
    base_model_prefix = "keyseg"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Whole decoder layers / SAM blocks stay on one device under device_map="auto".
    _no_split_modules: ClassVar[list[str]] = [
        "LlamaDecoderLayer", "Qwen2VLDecoderLayer", "CLIPEncoderLayer", "Qwen2VLVisionBlock",
        "SamVisionLayer", "SamTwoWayAttentionBlock",
    ]

    def __init__(
        self,
        config: KeySegModelConfig,
        *,
        vlm: nn.Module | None = None,
        sam: SamSegmenter | None = None,
        processor: ModelProcessor | None = None,
    ) -> None:
        """Build from ``config`` alone (what ``from_pretrained`` does, weights loaded after),
        or around already built ``vlm`` / ``sam`` (:meth:`from_parts`)."""
        super().__init__(config)
        settings = config.settings
        self._settings = settings
        for part in (vlm, sam):
            # Parts handed in are initialised or loaded already (pretrained VLM, official
            # SAM weights): post_init must not re-initialise them.
            for module in part.modules() if part is not None else ():
                module._is_hf_initialized = True
        if vlm is None:
            vlm = vlm_from_config(settings.backbone, config.vlm_config)
        self.backbone = VisionLanguageBackbone(vlm)
        self.sam = sam if sam is not None else segmenter_from_config(settings.sam.family,
                                                                    config.sam_config)
        # keep one object: the sub-configs the parts were built from are the saved ones
        config.vlm_config = self.backbone.base.config
        config.sam_config = self.sam.config
        self.processor = processor
        hidden, dim = self.backbone.hidden_size, settings.fusion.dim
        if self.sam.prompt_dim != dim:
            raise KeySegCheckpointError(
                f"model.fusion.dim={dim} must equal the SAM prompt width {self.sam.prompt_dim}"
            )
        self.text_hidden_fcs = _projection_head(hidden, dim)
        self.keyword_text_proj = (
            _projection_head(hidden, dim) if settings.key_projection == "separate" else None
        )
        self.keyword_fusion = KeywordFusion(settings.fusion)
        self.embedding_table_proj = nn.Linear(hidden, dim)
        if config.lora_applied:
            from keyseg.model.trainable import apply_lora

            apply_lora(self, settings.lora)
        self.post_init()

    def post_init(self) -> None:
        super().post_init()
        # transformers gathers tied weights from direct children only; ours sit one level
        # deeper (backbone.vlm, sam.sam), so name them with their full prefix.
        for name, module in self.named_modules():
            if name and isinstance(module, PreTrainedModel) and not any(
                name.startswith(f"{other}.") for other, m in self.named_modules()
                if other and other != name and isinstance(m, PreTrainedModel)
            ):
                for target, source in (module.all_tied_weights_keys or {}).items():
                    self.all_tied_weights_keys[f"{name}.{target}"] = f"{name}.{source}"

    def _init_weights(self, module: nn.Module) -> None:
        """KeySeg's own heads keep PyTorch's default init (as the reference builds them);
        the VLM and SAM parts are initialised by their own classes."""

    # --- the frozen KeySeg config -----------------------------------------------------------
    @property
    def settings(self) -> ModelConfig:
        """The frozen KeySeg model config; assigning one also updates ``config.keyseg``."""
        return self._settings

    @settings.setter
    def settings(self, value: ModelConfig) -> None:
        self._settings = value
        self.config.keyseg = to_dict(value)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_parts(cls, settings: ModelConfig, vlm: nn.Module, sam: SamSegmenter,
                   processor: ModelProcessor) -> KeySegModel:
        """Assemble a model around built parts (the KeySeg heads are created fresh)."""
        # A new composite config sets its (unset) attention choice on its sub-configs: keep
        # the one each part was built with.
        chosen = vlm.config._attn_implementation, sam.config._attn_implementation
        config = KeySegModelConfig.from_parts(settings, vlm.config, sam.config)
        vlm.config._attn_implementation, sam.config._attn_implementation = chosen
        return cls(config, vlm=vlm, sam=sam, processor=processor)

    # --- persistence ----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike,
                        max_shard_bytes: int | None = None, **kwargs) -> None:
        """transformers' ``save_pretrained`` (config, safetensors shards + index) plus the
        processor files, written atomically: a crash leaves any previous directory intact.
        ``max_shard_bytes`` is ``max_shard_size`` in bytes; other options pass through
        (``push_to_hub``, ``repo_id``, ...)."""
        if kwargs.get("push_to_hub"):
            # push_to_hub saves into a temporary folder through this method, then uploads
            return super().save_pretrained(save_directory, **kwargs)
        self.config.lora_applied = hasattr(self.backbone.vlm, "peft_config")
        self.config.keyseg = to_dict(self.settings)
        shard = max_shard_bytes or kwargs.pop("max_shard_size", None) or DEFAULT_SHARD_BYTES
        with atomic_directory(save_directory) as tmp:
            super().save_pretrained(tmp, max_shard_size=shard, safe_serialization=True,
                                    **kwargs)
            if self.processor is not None:
                self.processor.save_pretrained(tmp)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args,
                        revision: str | None = None, local_files_only: bool | None = None,
                        **kwargs) -> KeySegModel:
        """Load a directory or a Hub id (``revision``; the HF cache; offline with
        ``HF_HUB_OFFLINE=1`` or ``local_files_only``) written by :meth:`save_pretrained`.

        transformers builds the model on the meta device and loads each tensor from the
        safetensors shards (directly in ``dtype`` when given; ``device_map``,
        ``attn_implementation``, ``quantization_config`` pass through), so host memory
        stays about the checkpoint's size. The processor is attached from the same files.
        """
        from keyseg.hub import resolve_model_dir

        directory = resolve_model_dir(pretrained_model_name_or_path, revision=revision,
                                      local_files_only=local_files_only)
        config_file = directory / CONFIG_FILE
        if not config_file.is_file():
            raise KeySegCheckpointError(f"{config_file}: missing (not a KeySeg model directory)")
        if "dtype" in kwargs and kwargs["dtype"] is None:
            kwargs.pop("dtype")
        config = kwargs.pop("config", None) or KeySegModelConfig.from_pretrained(directory)
        if config.model_type != MODEL_TYPE:
            raise KeySegCheckpointError(f"{config_file}: model_type {config.model_type!r} is "
                                        f"not {MODEL_TYPE!r} (not a KeySeg model directory)")
        chosen = config.settings.backbone.attn_implementation
        if chosen is not None and "attn_implementation" not in kwargs:
            kwargs["attn_implementation"] = {"vlm_config": chosen}  # the language side only
        try:
            model = super().from_pretrained(directory, *args, config=config, **kwargs)
        except (OSError, ValueError, RuntimeError) as error:
            raise KeySegCheckpointError(
                f"{directory}: cannot load the weights ({type(error).__name__}: {error})"
                .splitlines()[0]) from error
        model.processor = load_processor(directory, model.settings.backbone)
        model.sam.tie_positional_encoding()
        return model

    def load_checkpoint_state(self, state: dict[str, torch.Tensor], source: str,
                              strict: bool = True) -> None:
        """Load tensors by exact name (trainable weights laid over a model); report the first
        missing / unexpected / misshapen one."""
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
        """``(N, 3, S, S)`` -> ``(N, C, h, w)``; no graph is kept when the encoder is frozen,
        and then ``self.image_embedding_cache`` (an ``ImageEmbeddingCache``, set by
        training) serves images it has seen."""
        encoder = self.sam.sam.vision_encoder
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            cache = getattr(self, "image_embedding_cache", None)
            if frozen and cache is not None:
                return cache(sam_pixel_values, self.sam.encode_images)
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
        choice = self.settings.backbone.hidden_state
        ids = self.processor.ids
        seg_pos = tokens.special_positions(input_ids, ids.seg, choice)
        seg = self.text_hidden_fcs(last_hidden[seg_pos])
        if not self.settings.use_keyword:
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
        ``[SEG]`` tokens as it has target masks (none in a text-only row, which trains the
        cross-entropy only).
        """
        if batch.labels is None or batch.target_masks is None:
            raise KeySegInputError("forward() needs labels and target masks; use predict()")
        loss_cfg = self.settings.loss
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
            pred_masks.append(masks)
            if masks.shape[0] == 0:
                # A text-only (visual QA) row, which the collator lets through without
                # [SEG]: it trains the cross-entropy only.
                continue
            valid = None
            if loss_cfg.ignore_index is not None:
                valid = target != loss_cfg.ignore_index
            binary = (target == 1).float()
            masks32 = masks.float()
            bce = bce + sigmoid_ce_loss(masks32, binary, num_masks, valid)
            dice = dice + dice_loss(masks32, binary, num_masks, valid,
                                    scale=loss_cfg.dice_scale, eps=loss_cfg.dice_eps)
            if key.shape[0]:
                key_rows.append(key)
                keyword_ids.extend(tokens.keyword_token_ids(ids, self.processor.ids))
        if key_rows and self.settings.use_keyword:
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
