"""Typed, frozen configuration for model, data and training, with strict YAML round-trip.

Defaults equal the reference recipe (SPEC §3-§4). Sizes are named presets (``tiny``,
``7b``) chosen by :class:`BackboneConfig.preset` / :class:`SamSettings.preset`; YAML files
in ``configs/`` only say what differs.

Loading rejects unknown keys and wrong types with a :class:`KeySegConfigError` that names
the key path and the file, e.g.::

    configs/x.yaml: train.lr: expected float, got str ('fast')
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from keyseg.errors import KeySegConfigError
from keyseg.io import atomic_write_text

HiddenStateChoice = Literal["before", "at"]
FusionVariant = Literal["reference", "residual", "none"]
KeywordTarget = Literal["first", "all"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class BackboneConfig:
    """The multimodal LLM that reads image + query.

    ``hidden_state`` chooses which last-layer state represents a special token:
    ``"before"`` (default) takes the state of the token *preceding* ``[SEG]``/``[KEY]`` —
    the state whose next-token prediction is that special token. This is the reference
    (LISA/KeySeg) behaviour, so imported LISA weights (``text_hidden_fcs`` and the SAM
    decoder were trained on these states) work unchanged, and during generation the state
    exists as soon as the model decides to emit ``[SEG]``, with no extra forward step.
    ``"at"`` takes the state at the special token itself.
    """

    # "llava": HF LLaVA (LLaMA + CLIP, llava_v1 template); "qwen2_vl" / "qwen2_5_vl" /
    # "qwen3_vl": Qwen-VL (ChatML, dynamic image-token counts; set
    # image_token="<|image_pad|>" and a Qwen system prompt).
    family: Literal["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "llava"
    preset: str = "tiny"  # used when name_or_path is None: "tiny" builds a random few-MB VLM
    name_or_path: str | None = None  # HF directory or hub name of the VLM
    hidden_state: HiddenStateChoice = "before"
    image_token: str = "<image>"
    # LLaVA-v1 (LISA-7B-v1) wraps the image tokens in <im_start>/<im_end>.
    use_im_start_end: bool = False
    # LLaVA's image->text projector: "mlp2x_gelu" (HF LLaVA-1.5) or "linear" (LLaVA-v1 /
    # LISA-7B-v1: one Linear(vision_hidden, text_hidden)).
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    # How the added tokens ([SEG], [KEY] and LLaVA-v1's <im_start>/<im_end>) meet the text
    # around them. "lisa": they absorb the whitespace on both sides, as the slow LLaMA
    # tokenizer (transformers 4.31) did for LISA and the KeySeg reference, so "it is [SEG]."
    # gives "▁is [SEG] ▁." and the "\n" after <im_end> disappears; <im_start><image><im_end>
    # is written into the prompt text. "v0": the whitespace is kept (a SentencePiece tokenizer
    # then emits a lone "▁" before each added token) and the image markers are inserted as
    # ids; the convention of KeySeg directories written before this field existed, which
    # load as "v0".
    convention: Literal["lisa", "v0"] = "lisa"
    # The language model's attention kernel: None = transformers' default (sdpa), "eager",
    # "sdpa", "flash_attention_2" (needs flash-attn), ... Applied when the VLM is built or
    # loaded (KeySegModel.from_pretrained also takes attn_implementation directly).
    attn_implementation: str | None = None
    # LLaVA's llava_v1 template as LISA and the KeySeg reference run it ("human", not the
    # "user" of the LLaVA paper's text): imported checkpoints were trained on exactly this.
    system_prompt: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )


@dataclass(frozen=True)
class SamSettings:
    """The mask decoder. ``family`` ``sam``: SAM, ``preset`` in {vit_h, vit_l, vit_b, tiny};
    ``sam2``: SAM 2 (Hiera), ``preset`` in {hiera_tiny, hiera_small, hiera_base_plus,
    hiera_large, tiny}. ``checkpoint`` is an official ``sam_vit_*.pth`` /
    ``sam2.1_hiera_*.pt`` (or converted safetensors) loaded with ``weights_only=True``."""

    family: Literal["sam", "sam2"] = "sam"
    preset: str = "vit_h"
    checkpoint: str | None = None


@dataclass(frozen=True)
class FusionConfig:
    """Keyword fusion of ``[KEY]`` into ``[SEG]`` (SPEC §2.4)."""

    dim: int = 256  # width of [SEG]/[KEY] embeddings after text_hidden_fcs (= SAM prompt width)
    num_queries: int = 12  # [SEG] rows are resampled to this many before attention
    variant: FusionVariant = "reference"
    mlp_ratio: float = 4.0  # residual variant only
    dropout: float = 0.0
    # Inner width of the cross-attention (q/k/v: dim -> inner_dim, out: inner_dim -> dim;
    # scale 1/sqrt(inner_dim)); None = dim. The reference fixes it at 256 whatever its
    # fusion_dim, so a reference checkpoint at another width converts with inner_dim=256.
    inner_dim: int | None = None
    # Which [KEY] rows of a generated answer are fused: "all" (as in training), or "first"
    # (the reference's evaluate(), which uses only a sample's first [KEY]).
    generation_keys: Literal["all", "first"] = "all"


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (KeySeg reference defaults; LISA used ce_weight=1.0)."""

    ce_weight: float = 1e-4
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    key_weight: float = 1.0
    key_temperature: float = 0.07
    key_target: KeywordTarget = "first"  # "all": multi-positive over every keyword token
    dice_scale: float = 1000.0
    dice_eps: float = 1e-6
    # Pixels labelled 255 ("ignore" shapes) are left out of BCE/Dice. The reference treated
    # them as background; set to None to reproduce that.
    ignore_index: int | None = 255


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the language model only (not the fusion's own projections)."""

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


TRAINABLE_DEFAULT: tuple[str, ...] = (
    "lora",
    "embed_tokens",
    "lm_head",
    "sam_mask_decoder",
    "text_hidden_fcs",
    "fusion",
    "table_projection",
)


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    sam: SamSettings = field(default_factory=SamSettings)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    use_keyword: bool = True  # False: no [KEY] in targets and no keyword loss (ablation)
    # [KEY] goes through text_hidden_fcs like [SEG] (SPEC §2.3), or its own projection.
    key_projection: Literal["shared", "separate"] = "shared"
    trainable: tuple[str, ...] = TRAINABLE_DEFAULT


@dataclass(frozen=True)
class ShapesSettings:
    """Options of the procedural ``shapes`` dataset (``keyseg.data.shapes.ShapesConfig``)."""

    image_size: int = 192
    train_size: int = 20000
    val_size: int = 200
    test_size: int = 500
    min_objects: int = 2
    max_objects: int = 6
    queries_per_image: int = 1
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    dataset_dir: str = "./dataset"
    # "name||name" with matching sample_rates, as in the reference.
    datasets: str = "refer_seg||reason_seg"
    sample_rates: tuple[float, ...] = (9.0, 3.0)
    refer_seg_data: str = "refcoco||refcoco+||refcocog"
    reason_seg_split: str = "train"
    # "auto": the first keyword_outputs.json found in the usual places; null: none.
    keyword_file: str | None = "auto"
    refer_keyword: Literal["sentence", "head-noun"] = "sentence"
    max_referents_per_image: int = 3
    explanatory: float = 1.0
    val_dataset: str = "reason_seg:val"
    max_image_pixels: int = 64_000_000
    num_workers: int = 2
    shapes: ShapesSettings = field(default_factory=ShapesSettings)  # used by "shapes" data


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/keyseg"
    # A KeySeg model directory (save_pretrained / `keyseg convert lisa`) to start from; its
    # architecture wins, while model.lora / model.loss / model.trainable come from this config.
    init_from: str | None = None
    seed: int = 42
    epochs: int = 20
    steps_per_epoch: int = 200
    batch_size: int = 2
    grad_accumulation: int = 10
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = 1.0
    precision: Precision = "bf16"
    gradient_checkpointing: bool = True
    save_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    validate_every_epoch: bool = True
    val_limit: int | None = None
    early_stopping_patience: int | None = None
    max_consecutive_nonfinite: int = 10


@dataclass(frozen=True)
class KeySegConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# dict <-> dataclass, strict


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        return value

    return convert(config)


def from_dict(cls: type[T], data: dict[str, Any] | None, *, source: str = "<dict>") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    return _build(cls, data or {}, path="", source=source)


def _build(cls: type[T], data: Any, *, path: str, source: str) -> T:
    if not isinstance(data, dict):
        raise KeySegConfigError(
            f"{source}: {path or '<root>'}: expected a mapping, got {type(data).__name__}"
        )
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise KeySegConfigError(
            f"{source}: unknown key '{where}{unknown[0]}' (valid keys: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in data.items():
        key_path = f"{path}.{name}" if path else name
        kwargs[name] = _coerce(hints[name], value, path=key_path, source=source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, *, path: str, source: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path=path, source=source)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path=path, source=source)
            except KeySegConfigError as error:
                errors.append(str(error))
        raise KeySegConfigError(errors[0])
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise KeySegConfigError(
                f"{source}: {path}: {value!r} is not one of {', '.join(map(repr, choices))}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _type_error(path, source, "a list", value)
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, path=f"{path}[{i}]", source=source)
                         for i, v in enumerate(value))
        if len(args) != len(value):
            raise KeySegConfigError(
                f"{source}: {path}: expected {len(args)} values, got {len(value)}"
            )
        return tuple(_coerce(a, v, path=f"{path}[{i}]", source=source)
                     for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                raise _type_error(path, source, "float", value) from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(path, source, "float", value)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, source, "int", value)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(path, source, "bool", value)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(path, source, "str", value)
        return value
    raise KeySegConfigError(f"{source}: {path}: unsupported config type {hint!r}")


def _type_error(path: str, source: str, expected: str, value: Any) -> KeySegConfigError:
    return KeySegConfigError(
        f"{source}: {path}: expected {expected}, got {type(value).__name__} ({value!r})"
    )


# ---------------------------------------------------------------------------------------
# YAML files and --key=value overrides


def load_config(
    path: str | os.PathLike | None = None,
    overrides: typing.Sequence[str] = (),
    cls: type[T] = KeySegConfig,  # type: ignore[assignment]
) -> T:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Overrides are ``section.key=value`` strings (a leading ``--`` is allowed); values are
    parsed as YAML, so ``train.lr=1e-4``, ``model.lora.target_modules=[q_proj,k_proj]``.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise KeySegConfigError(f"{file}: config file not found")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise KeySegConfigError(f"{file}: not valid YAML: {error}") from error
        data = loaded or {}
        if not isinstance(data, dict):
            raise KeySegConfigError(f"{file}: top level must be a mapping")
    for override in overrides:
        _apply_override(data, override)
    return from_dict(cls, data, source=source)


def _apply_override(data: dict[str, Any], override: str) -> None:
    text = override.removeprefix("--")
    if "=" not in text:
        raise KeySegConfigError(f"override {override!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise KeySegConfigError(f"override {override!r}: value is not valid YAML") from error
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise KeySegConfigError(f"override {override!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML atomically (temp file + rename)."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


# ---------------------------------------------------------------------------------------
# evaluation

EvalMode = Literal["teacher", "generate"]
EvalProtocol = Literal["lisa", "lisa-bugs"]


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`keyseg.evaluate.run_evaluation` scores one split in one mode.

    ``keyseg eval`` builds one from its arguments per ``--mode``. Every field decides the
    rows written (and so is part of ``keyseg eval``'s resume fingerprint,
    :meth:`row_settings`) unless its metadata says ``rows=False``: a field added later
    counts by default. Bad values raise one :class:`KeySegConfigError` naming every field
    at fault.
    """

    mode: EvalMode = "teacher"
    """``teacher``: LISA's protocol, the answer is fed; ``generate``: the model answers
    (greedy)."""
    limit: int | None = None
    """Evaluate only the first ``limit`` records (images), before sharding; ``None``: all."""
    batch_size: int = 1
    """Conversations per forward pass (rows about one image share its SAM encoding)."""
    all_texts: bool = False
    """ReasonSeg: score every text of a record, not only the first (they are paraphrases)."""
    max_new_tokens: int = 64
    """Generation budget per answer (``generate`` mode)."""
    protocol: EvalProtocol = "lisa"
    """``lisa``: targets as read; ``lisa-bugs``: as LISA's metric sees them (pair it with
    records read under the same protocol, :func:`keyseg.data.eval_sets.resolve_eval_set`)."""
    max_pixels: int | None = None
    """Image pixel limit (width * height) when loading images; ``None``: the loader's
    default (64 MP)."""
    keep_overlays: int = field(default=0, metadata={"rows": False})
    """Keep the ``n`` worst and ``n`` best samples for overlays (``EvalResult.overlays``)."""
    keep_per_sample: bool = field(default=False, metadata={"rows": False})
    """Also return the per-sample rows in ``EvalResult.per_sample`` (this process's)."""
    progress: bool = field(default=True, metadata={"rows": False})
    """Show a progress bar (main process only)."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in get_args(EvalMode):
            problems.append(f"evaluation mode {self.mode!r}: use one of "
                            f"{', '.join(get_args(EvalMode))}")
        if self.protocol not in get_args(EvalProtocol):
            problems.append(f"evaluation protocol {self.protocol!r}: use one of "
                            f"{', '.join(get_args(EvalProtocol))}")
        for name, value, least in (("batch_size", self.batch_size, 1),
                                   ("limit", self.limit, 0),
                                   ("max_new_tokens", self.max_new_tokens, 0),
                                   ("max_pixels", self.max_pixels, 1),
                                   ("keep_overlays", self.keep_overlays, 0)):
            if value is not None and value < least:
                problems.append(f"{name} must be >= {least}, got {value}")
        if problems:
            raise KeySegConfigError("; ".join(problems))

    def row_settings(self) -> dict[str, Any]:
        """``{field: value}`` of the fields that decide the rows (all but ``rows=False``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("rows", True)}
