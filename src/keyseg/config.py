"""Typed, frozen configuration for model, data and training, with strict YAML round-trip.

Defaults equal the reference recipe (SPEC §3-§4). Sizes are named presets (``tiny``,
``7b``) chosen by :class:`BackboneConfig.preset` / :class:`SamSettings.preset`; YAML files
in ``configs/`` only say what differs.

Every field has a docstring and a type; a ranged type (``PositiveInt``, ``Probability``,
...) states the values it accepts. Loading rejects unknown keys, wrong types and values
out of range, gathering *every* problem before it raises one :class:`KeySegConfigError`
whose lines name the source (the YAML file, or ``command line`` for an override) and the
dotted key::

    configs/x.yaml: train.lr: expected float, got str ('fast')
    command line: train.save_every: must be >= 1, got 0

Constructing a config in Python runs the same checks (``__post_init__``); the machinery
(ranged types, gathering problems, strict loading) is :mod:`keyseg.schema`. This module
imports no torch: it is read before anything heavy is built.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from keyseg.dtypes import _DTYPE_ALIASES, DTYPES, TORCH_DTYPE_NAMES, dtype_name, torch_dtype_name
from keyseg.errors import KeySegConfigError
from keyseg.schema import (
    COMMAND_LINE,
    Checked,
    ConfigProblems,
    NonNegativeFloat,
    NonNegativeInt,
    Normalise,
    OpenUnit,
    PositiveFloat,
    PositiveInt,
    Probability,
    Problem,
    Range,
    from_dict,
    load_yaml,
    problems_of,
    save_config,
    to_dict,
)

__all__ = [
    "COMMAND_LINE", "DTYPES", "TORCH_DTYPE_NAMES", "BackboneConfig", "Checked", "ConfigProblems",
    "DataConfig", "FusionConfig", "KeySegConfig", "LoraSettings", "LossConfig", "ModelConfig",
    "NonNegativeFloat", "NonNegativeInt", "OpenUnit", "PositiveFloat", "PositiveInt",
    "Probability", "Problem", "Range", "SamSettings", "ShapesConfig", "TrainConfig", "dtype_name",
    "from_dict", "load_config", "problems_of", "save_config", "to_dict", "torch_dtype_name",
]

# dtypes: one spelling for every command and the training precision (keyseg.dtypes)

def _precision_alias(value: Any) -> Any:
    return _DTYPE_ALIASES.get(value.strip().lower(), value) if isinstance(value, str) else value


def _names_list(value: Any) -> Any:
    """``"a||b"`` (the reference's spelling, and that of configs written before lists) ->
    ``("a", "b")``; a list -> a tuple."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split("||") if part.strip())
    return tuple(value) if isinstance(value, list) else value


Precision = Annotated[Literal["fp32", "bf16", "fp16"], Normalise(_precision_alias)]
NameList = Annotated[tuple[str, ...], Normalise(_names_list)]

# ---------------------------------------------------------------------------------------
# Tables of names the config is checked against. The modules that implement them import
# torch, so the names are kept here; tests/test_config.py checks both stay in step.

SAM_PRESET_NAMES: dict[str, tuple[str, ...]] = {
    # keyseg.model.sam.SAM_PRESETS
    "sam": ("vit_h", "vit_l", "vit_b", "tiny", "shapes", "shapes192"),
    "sam2": ("hiera_tiny", "hiera_small", "hiera_base_plus", "hiera_large", "tiny"),
}
LOCAL_VLM_PRESETS: dict[str, tuple[str, ...]] = {
    # llava: keyseg.model.tiny.VLM_PRESETS
    "llava": ("tiny", "shapes", "shapes192", "shapes192p32", "shapes192deep"),
    "qwen2_vl": ("tiny",), "qwen2_5_vl": ("tiny",), "qwen3_vl": ("tiny",),  # qwen.QWEN_PRESETS
}
TRAINABLE_COMPONENTS: tuple[str, ...] = (  # keyseg.model.trainable.COMPONENTS
    "lora", "embed_tokens", "lm_head", "language_model", "vision_tower", "mm_projector",
    "sam_image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "text_hidden_fcs",
    "fusion", "table_projection",
)
DATASET_NAMES: tuple[str, ...] = ("reason_seg", "refer_seg", "shapes", "shapes_qa")
"""Names allowed in ``data.datasets`` (keyseg.data.datasets builds them)."""
VAL_NAMES: tuple[str, ...] = ("reason_seg", "shapes", "refcoco", "refcoco+", "refcocog")
"""Names allowed before the colon of ``data.val_dataset``."""
REFER_NAMES: tuple[str, ...] = ("refcoco", "refcoco+", "refcocog")  # data.refer.REFER_DATASETS
SHAPES_DIFFICULTIES: tuple[str, ...] = ("direct", "attribute", "relational", "indirect", "multi",
                                         "negative")
"""Query difficulties of the shapes world (``ShapesConfig.difficulty_weights`` keys)."""
SHAPES_QA_TYPES: tuple[str, ...] = ("what", "where", "colour", "size", "count", "existence",
                                    "relation", "describe", "list")
"""Question types of the shapes world's visual QA (``keyseg.data.shapes.qa``;
``ShapesConfig.qa_types``)."""


def _known(value: str, known: Sequence[str]) -> str:
    return f"{value!r} is not one of {', '.join(known)}"


# ---------------------------------------------------------------------------------------
# The configs


EvalMode = Literal["teacher", "generate"]
HiddenStateChoice = Literal["before", "at"]
FusionVariant = Literal["reference", "residual", "gated", "none"]
KeywordTarget = Literal["first", "all"]


@dataclass(frozen=True)
class BackboneConfig(Checked):
    """The multimodal LLM that reads image + query.

    ``hidden_state`` chooses which last-layer state represents a special token:
    ``"before"`` (default) takes the state of the token *preceding* ``[SEG]``/``[KEY]`` —
    the state whose next-token prediction is that special token. This is the reference
    (LISA/KeySeg) behaviour, so imported LISA weights (``text_hidden_fcs`` and the SAM
    decoder were trained on these states) work unchanged, and during generation the state
    exists as soon as the model decides to emit ``[SEG]``, with no extra forward step.
    ``"at"`` takes the state at the special token itself.
    """

    section: ClassVar[str] = "model.backbone"

    family: Literal["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "llava"
    """"llava": HF LLaVA (LLaMA + CLIP, llava_v1 template); "qwen2_vl" / "qwen2_5_vl" /
    "qwen3_vl": Qwen-VL (ChatML, dynamic image-token counts; set
    image_token="<|image_pad|>" and a Qwen system prompt)."""
    preset: str = "tiny"
    """Used when name_or_path is None: a random local VLM of that size (llava: "tiny" (a
    few MB), "shapes", "shapes192", "shapes192p32" (32 px patches) or "shapes192deep"
    (a 6-layer LM); Qwen families: "tiny"). Checked at load unless train.init_from."""
    name_or_path: str | None = None
    """HF directory or hub name of the VLM."""
    hidden_state: HiddenStateChoice = "before"
    """Which state stands for a special token (see the class docstring)."""
    image_token: str = "<image>"
    """The placeholder the processor expands into image tokens."""
    use_im_start_end: bool = False
    """LLaVA-v1 (LISA-7B-v1) wraps the image tokens in <im_start>/<im_end>."""
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """LLaVA's image->text projector: "mlp2x_gelu" (HF LLaVA-1.5) or "linear" (LLaVA-v1 /
    LISA-7B-v1: one Linear(vision_hidden, text_hidden))."""
    convention: Literal["lisa", "v0"] = "lisa"
    """How the added tokens ([SEG], [KEY] and LLaVA-v1's <im_start>/<im_end>) meet the text
    around them. "lisa": they absorb the whitespace on both sides, as the slow LLaMA
    tokenizer (transformers 4.31) did for LISA and the KeySeg reference, so "it is [SEG]."
    gives "▁is [SEG] ▁." and the "\\n" after <im_end> disappears; <im_start><image><im_end>
    is written into the prompt text. "v0": the whitespace is kept (a SentencePiece tokenizer
    then emits a lone "▁" before each added token) and the image markers are inserted as
    ids; the convention of KeySeg directories written before this field existed, which
    load as "v0"."""
    attn_implementation: str | None = None
    """The language model's attention kernel: None = transformers' default (sdpa), "eager",
    "sdpa", "flash_attention_2" (needs flash-attn), ... Applied when the VLM is built or
    loaded (KeySegModel.from_pretrained also takes attn_implementation directly)."""
    system_prompt: str = (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    )
    """LLaVA's llava_v1 template as LISA and the KeySeg reference run it ("human", not the
    "user" of the LLaVA paper's text): imported checkpoints were trained on exactly this."""

    def relations(self) -> Iterable[Problem]:
        if not self.image_token:
            yield Problem("image_token", "must not be empty")


@dataclass(frozen=True)
class SamSettings(Checked):
    """The mask decoder. ``checkpoint`` is an official ``sam_vit_*.pth`` /
    ``sam2.1_hiera_*.pt`` (or converted safetensors) loaded with ``weights_only=True``."""

    section: ClassVar[str] = "model.sam"

    family: Literal["sam", "sam2"] = "sam"
    """"sam": SAM (ViT); "sam2": SAM 2 (Hiera)."""
    preset: str = "vit_h"
    """The size: for sam one of vit_h, vit_l, vit_b, tiny, shapes, shapes192; for sam2 one of
    hiera_tiny, hiera_small, hiera_base_plus, hiera_large, tiny."""
    checkpoint: str | None = None
    """Weights: an official file or a SAM directory of this preset (None: random)."""

    def relations(self) -> Iterable[Problem]:
        known = SAM_PRESET_NAMES.get(self.family, ())
        if known and self.preset not in known:
            yield Problem("preset", f"unknown {self.family.upper()} preset {self.preset!r} "
                          f"(known for family {self.family}: {', '.join(known)})", ("family",))


@dataclass(frozen=True)
class FusionConfig(Checked):
    """Keyword fusion of ``[KEY]`` into ``[SEG]`` (SPEC §2.4)."""

    section: ClassVar[str] = "model.fusion"

    dim: Annotated[int, Range(8, multiple_of=8)] = 256
    """Width of [SEG]/[KEY] embeddings after text_hidden_fcs (= SAM prompt width); a
    multiple of 8."""
    num_queries: PositiveInt = 12
    """[SEG] rows are resampled to this many before attention."""
    variant: FusionVariant = "reference"
    """"reference" (SPEC §2.4), "residual" (post-norm blocks with an MLP), "gated" (pre-norm
    blocks with an MLP behind tanh gates (gate_init), on the [SEG] rows themselves) or
    "none" (see keyseg.model.fusion)."""
    mlp_ratio: PositiveFloat = 4.0
    """MLP width / dim (residual and gated variants only)."""
    gate_init: OpenUnit = 0.0
    """Starting value of each ``tanh(gate)`` of the gated variant, in [0, 1): 0 starts the
    fusion as the identity (its blocks then train only as fast as their gates open), 0.5
    starts every block at half strength."""
    dropout: OpenUnit = 0.0
    """Dropout in the MLP (residual and gated variants only), in [0, 1)."""
    inner_dim: PositiveInt | None = None
    """Inner width of the cross-attention (q/k/v: dim -> inner_dim, out: inner_dim -> dim;
    scale 1/sqrt(inner_dim)); None = dim. The reference fixes it at 256 whatever its
    fusion_dim, so a reference checkpoint at another width converts with inner_dim=256."""
    generation_keys: Literal["all", "first"] = "all"
    """Which [KEY] rows of a generated answer are fused: "all" (as in training), or "first"
    (the reference's evaluate(), which uses only a sample's first [KEY])."""


@dataclass(frozen=True)
class LossConfig(Checked):
    """Loss weights (KeySeg reference defaults; LISA used ce_weight=1.0)."""

    section: ClassVar[str] = "model.loss"

    ce_weight: NonNegativeFloat = 1e-4
    """Weight of the answer's next-token cross-entropy."""
    bce_weight: NonNegativeFloat = 2.0
    """Weight of the per-pixel binary cross-entropy of the masks."""
    dice_weight: NonNegativeFloat = 0.5
    """Weight of the Dice loss of the masks."""
    key_weight: NonNegativeFloat = 1.0
    """Weight of the keyword (contrastive [KEY]) loss."""
    key_temperature: PositiveFloat = 0.07
    """Softmax temperature of the keyword loss."""
    key_target: KeywordTarget = "first"
    """"first": the keyword's first token is the positive; "all": multi-positive over every
    keyword token."""
    dice_scale: PositiveFloat = 1000.0
    """Scale of the Dice loss (the reference's)."""
    dice_eps: PositiveFloat = 1e-6
    """Smoothing term of the Dice loss."""
    ignore_index: Annotated[int, Range(0, 255)] | None = 255
    """Pixels with this mask value ("ignore" shapes) are left out of BCE/Dice. The
    reference treated them as background; set to None to reproduce that."""


@dataclass(frozen=True)
class LoraSettings(Checked):
    """LoRA on the language model only (not the fusion's own projections)."""

    section: ClassVar[str] = "model.lora"

    enabled: bool = True
    """Wrap the language model's target_modules with LoRA adapters."""
    r: PositiveInt = 8
    """Rank of the adapters."""
    alpha: PositiveInt = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: OpenUnit = 0.05
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the language model's linears that get adapters."""

    def relations(self) -> Iterable[Problem]:
        if self.enabled and not self.target_modules:
            yield Problem("target_modules", "must name at least one module when enabled",
                          ("enabled",))


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
class ModelConfig(Checked):
    """The model: backbone, mask decoder, fusion, losses, LoRA and what trains."""

    section: ClassVar[str] = "model"

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    """The multimodal LLM."""
    sam: SamSettings = field(default_factory=SamSettings)
    """The mask decoder."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Keyword fusion."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters."""
    use_keyword: bool = True
    """False: no [KEY] in targets and no keyword loss (ablation)."""
    key_projection: Literal["shared", "separate"] = "shared"
    """[KEY] goes through text_hidden_fcs like [SEG] (SPEC §2.3), or its own projection."""
    trainable: tuple[str, ...] = TRAINABLE_DEFAULT
    """Components that train (the rest is frozen); names from TRAINABLE_COMPONENTS."""

    def relations(self) -> Iterable[Problem]:
        unknown = [name for name in self.trainable if name not in TRAINABLE_COMPONENTS]
        if unknown:
            yield Problem("trainable", f"unknown component(s) {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(TRAINABLE_COMPONENTS)})")


@dataclass(frozen=True)
class ShapesConfig(Checked):
    """How the procedural shapes world (``keyseg.data.shapes``) is generated: the one
    definition, used by the generator and settable from YAML under ``data.shapes``."""

    section: ClassVar[str] = "data.shapes"

    image_size: Annotated[int, Range(64, 1024)] = 192
    """Side of the square images in pixels (64-1024; 160-256 advised; 192 keeps CPU
    training of the embedded default within ~30 minutes)."""
    min_objects: Annotated[int, Range(1, 8)] = 2
    """Fewest objects per image (1-8, <= max_objects)."""
    max_objects: Annotated[int, Range(1, 8)] = 6
    """Most objects per image (1-8)."""
    min_radius: Annotated[float, Range(0, 0.3, low_open=True)] = 0.07
    """Smallest object circumradius as a fraction of image_size, in (0, 0.3]."""
    max_radius: Annotated[float, Range(0, 0.3, low_open=True)] = 0.15
    """Largest object circumradius as a fraction of image_size, in (0, 0.3]."""
    min_visible: Probability = 0.6
    """An object must keep at least this fraction of its pixels visible after later
    (higher) objects are drawn over it."""
    train_size: PositiveInt = 20000
    """Records in the train split."""
    val_size: NonNegativeInt = 200
    """Records in the val split."""
    test_size: NonNegativeInt = 500
    """Records in the test split."""
    queries_per_image: PositiveInt = 1
    """Referents per record (each its own query and target)."""
    difficulty_weights: tuple[tuple[str, NonNegativeFloat], ...] = (
        ("direct", 0.15),
        ("attribute", 0.15),
        ("relational", 0.2),
        ("indirect", 0.25),
        ("multi", 0.125),
        ("negative", 0.125),
    )
    """Relative frequency of each query difficulty (names from SHAPES_DIFFICULTIES); YAML
    takes a mapping (``{direct: 1.0, multi: 0.5}``) or a list of pairs."""
    train_difficulty_weights: tuple[tuple[str, NonNegativeFloat], ...] | None = None
    """Difficulty weights for the train split only (same form as ``difficulty_weights``);
    ``None`` uses ``difficulty_weights``. Val and test keep ``difficulty_weights``, so a run
    that trains on more negatives is still validated and tested on the same records."""
    answer_style: Literal["lisa", "restate", "verdict", "asked", "asked_only"] = "lisa"
    """How single-target and negative answers are worded. ``lisa``: LISA's ("Sure, it is
    [SEG].", "There is no such shape, [SEG]."), so the first word already decides whether
    the shape is there. ``restate``: every such answer names the target first and decides
    right after its name ("The red star [SEG]." / "The red star: there is no such shape,
    [SEG]."), where a VLM that looks a named kind up (``experiments/pretrain_vlm.py
    --lm-probe-weight``) holds the answer. ``verdict``: the name, then the verdict word of
    the stage 2 lookup turn (``pretrain_vlm.py --lookup-turn``): "The red star: yes, [SEG]." /
    "The red star: no, there is no such shape, [SEG].". ``asked``: the same, but the name
    before the verdict is the one the query asked for, for present and absent shapes alike
    ("the circle" -> "The circle: yes, the blue circle [SEG]." / "The circle: no, there is
    no such shape, [SEG]."), so the name does not give the verdict away. ``asked_only``:
    as ``asked``, but nothing is named that only the image tells: "The circle: yes, [SEG].";
    a query whose concept the image alone gives ("the smallest diamond") is answered "Sure,
    [SEG]."; multi-target answers count their targets left to right ("The circles: the
    first [SEG] and the second [SEG]."). Otherwise multi-target answers are the same in
    every style (each target named)."""
    qa_types: tuple[str, ...] = SHAPES_QA_TYPES
    """Question types of the ``shapes_qa`` training dataset (names from SHAPES_QA_TYPES):
    text-only visual-QA turns about shapes images, mixed into training as the reference
    mixes LLaVA's VQA data, so that fine-tuning keeps what the VLM learnt in pretraining."""
    qa_restate_existence: bool = False
    """``shapes_qa`` existence answers name what was asked before the yes/no ("red star:
    no"), as a VLM pretrained with ``experiments/pretrain_vlm.py --restate-existence``
    learnt them."""
    seed: NonNegativeInt = 0
    """World seed mixed into every image's random stream."""

    def weights_for(self, split: str) -> tuple[tuple[str, float], ...]:
        """The difficulty weights that ``split``'s records are drawn with."""
        if split == "train" and self.train_difficulty_weights is not None:
            return self.train_difficulty_weights
        return self.difficulty_weights

    def relations(self) -> Iterable[Problem]:
        if self.min_objects > self.max_objects:
            yield Problem("min_objects", f"must be <= max_objects ({self.max_objects}), got "
                          f"{self.min_objects}", ("max_objects",))
        if self.min_radius > self.max_radius:
            yield Problem("min_radius", f"must be <= max_radius ({self.max_radius}), got "
                          f"{self.min_radius}", ("max_radius",))
        for key in ("difficulty_weights", "train_difficulty_weights"):
            weights = getattr(self, key)
            if weights is None:
                continue
            names = [name for name, _ in weights]
            unknown = [n for n in names if n not in SHAPES_DIFFICULTIES]
            if unknown:
                yield Problem(key, f"unknown difficulty {unknown[0]!r} (known: "
                              f"{', '.join(SHAPES_DIFFICULTIES)})")
            elif len(set(names)) != len(names):
                yield Problem(key, "a difficulty is named twice")
            if not any(isinstance(w, int | float) and w > 0 for _, w in weights):
                yield Problem(key, "needs at least one positive weight")
        unknown_qa = [t for t in self.qa_types if t not in SHAPES_QA_TYPES]
        if unknown_qa:
            yield Problem("qa_types", f"unknown question type {unknown_qa[0]!r} (known: "
                          f"{', '.join(SHAPES_QA_TYPES)})")
        elif not self.qa_types:
            yield Problem("qa_types", "needs at least one question type")

    def split_size(self, split: str) -> int:
        """Number of records in ``split``."""
        sizes = {"train": self.train_size, "val": self.val_size, "test": self.test_size}
        if split not in sizes:
            raise KeySegConfigError(f"unknown shapes split {split!r} (use train, val or test)")
        return sizes[split]


@dataclass(frozen=True)
class DataConfig(Checked):
    """What the model trains and validates on."""

    section: ClassVar[str] = "data"

    dataset_dir: str = "./dataset"
    """Root of the on-disk datasets (SPEC §5)."""
    datasets: NameList = ("refer_seg", "reason_seg")
    """The training mixture: names from DATASET_NAMES, one rate each in sample_rates. The
    reference's "refer_seg||reason_seg" string is read too."""
    sample_rates: tuple[NonNegativeFloat, ...] = (9.0, 3.0)
    """Relative sampling weight of each dataset in datasets (same length, positive sum)."""
    refer_seg_data: NameList = ("refcoco", "refcoco+", "refcocog")
    """The REFER datasets refer_seg concatenates (REFER_NAMES; "a||b" is read too)."""
    reason_seg_split: Literal["train", "val", "test"] = "train"
    """The ReasonSeg split trained on."""
    keyword_file: str | None = "auto"
    """"auto": the first keyword_outputs.json found in the usual places; null: none; else a
    path (relative to dataset_dir)."""
    refer_keyword: Literal["sentence", "head-noun"] = "sentence"
    """The keyword of a REFER expression: the whole sentence, or its head noun."""
    max_referents_per_image: PositiveInt = 3
    """At most this many referents of one image go into one training sample."""
    explanatory: Probability = 1.0
    """Probability of using an explanatory answer (ReasonSeg) where there is one."""
    val_dataset: str = "reason_seg:val"
    """Validation set "NAME:SPLIT" (NAME from VAL_NAMES); "" or "none" disables it."""
    max_image_pixels: PositiveInt = 64_000_000
    """Images larger than this (width*height) are refused as bad samples."""
    num_workers: NonNegativeInt = 2
    """DataLoader worker processes (0: load in the training process)."""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    """Options of the procedural "shapes" data."""

    def relations(self) -> Iterable[Problem]:
        if not self.datasets:
            yield Problem("datasets", "names no dataset")
        for name in self.datasets:
            if name not in DATASET_NAMES:
                yield Problem("datasets", _known(name, DATASET_NAMES))
        if len(set(self.datasets)) != len(self.datasets):
            yield Problem("datasets", "a dataset is named twice")
        if len(self.sample_rates) != len(self.datasets):
            yield Problem("sample_rates", f"{len(self.sample_rates)} rates for "
                          f"{len(self.datasets)} datasets ({', '.join(self.datasets)})",
                          ("datasets",))
        elif self.sample_rates and not any(r > 0 for r in self.sample_rates
                                           if isinstance(r, int | float)):
            yield Problem("sample_rates", "needs at least one positive rate")
        for name in self.refer_seg_data:
            if name not in REFER_NAMES:
                yield Problem("refer_seg_data", _known(name, REFER_NAMES))
        spec = self.val_dataset.strip()
        name = spec.partition(":")[0].strip()
        if spec.lower() not in ("", "none") and name not in VAL_NAMES:
            yield Problem("val_dataset", f"{spec!r}: unknown dataset {name!r} (expected "
                          f"NAME:SPLIT with NAME one of {', '.join(VAL_NAMES)}, or none)")


@dataclass(frozen=True)
class TrainConfig(Checked):
    """The optimisation, checkpointing and logging of one run."""

    section: ClassVar[str] = "train"

    output_dir: str = "runs/keyseg"
    """The run directory (config, logs, checkpoints/, best/, final/)."""
    init_from: str | None = None
    """A KeySeg model directory (save_pretrained / `keyseg convert lisa`) to start from; its
    architecture wins, while model.lora / model.loss / model.trainable come from this
    config."""
    seed: NonNegativeInt = 42
    """Seed of the data order, initialisation and dropout."""
    epochs: PositiveInt = 20
    """Epochs (a validation after each)."""
    steps_per_epoch: PositiveInt = 200
    """Optimizer steps per epoch."""
    batch_size: PositiveInt = 2
    """Samples per micro-batch and process."""
    grad_accumulation: PositiveInt = 10
    """Micro-batches per optimizer step."""
    lr: NonNegativeFloat = 3e-4
    """Peak learning rate (AdamW); 0 trains nothing (a dry run that still loads, steps and
    checkpoints)."""
    lr_scale: tuple[tuple[str, PositiveFloat], ...] = ()
    """Learning-rate multipliers per trainable component (names of ``model.trainable``):
    ``{language_model: 0.1, vision_tower: 0.1}`` trains those at ``lr x 0.1`` and every other
    component at ``lr``, on the same warm-up and decay; YAML takes a mapping or a list of
    pairs. Empty (the reference): one learning rate for everything."""
    betas: tuple[OpenUnit, OpenUnit] = (0.9, 0.95)
    """AdamW's betas, each in [0, 1)."""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW's decoupled weight decay."""
    warmup_steps: NonNegativeInt = 100
    """Steps of linear warm-up from 0 to lr."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up (to 0 at the last step, except "constant")."""
    grad_clip: NonNegativeFloat = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    precision: Precision = "bf16"
    """Mixed precision: fp32, bf16 or fp16 (float32, bfloat16, float16 are read too)."""
    gradient_checkpointing: bool = True
    """Recompute the language model's activations in backward (less memory)."""
    save_every: PositiveInt = 200
    """Write checkpoints/step-N every this many steps (and at the end)."""
    keep_last: NonNegativeInt = 3
    """Keep this many step checkpoints (0: keep all)."""
    log_every: PositiveInt = 10
    """Log the loss terms (progress line, TensorBoard, metrics.jsonl) every this many
    steps (and at the last step)."""
    validate_every_epoch: bool = True
    """Validate on data.val_dataset after each epoch (and keep best/)."""
    val_limit: PositiveInt | None = None
    """Validate on the first this many records only (None: all)."""
    val_mode: EvalMode = "teacher"
    """How validation (and so best/) scores the model: ``teacher`` feeds the reference
    answer (LISA's protocol, fast); ``generate`` lets the model answer greedily, as users and
    ``keyseg eval --mode generate`` see it (slower: one decoding per query). With a small LM
    the two can rank checkpoints differently: a model that answers badly still scores well
    teacher-forced."""
    early_stopping_patience: PositiveInt | None = None
    """Stop after this many validations without a better gIoU (None: never)."""
    max_consecutive_nonfinite: PositiveInt = 10
    """Stop when this many optimizer steps in a row have a non-finite loss or gradient."""
    image_embedding_cache_gb: NonNegativeFloat = 0.0
    """Keep the SAM embeddings of seen images, up to this many GiB per process (0: off).
    Needs a frozen SAM image encoder (sam_image_encoder not in model.trainable)."""

    def relations(self) -> Iterable[Problem]:
        if not self.output_dir.strip():
            yield Problem("output_dir", "must not be empty")


@dataclass(frozen=True)
class KeySegConfig(Checked):
    """A training run: model, data and training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The run."""

    def relations(self) -> Iterable[Problem]:
        scaled = [name for name, _ in self.train.lr_scale]
        for name in dict.fromkeys(scaled):
            if scaled.count(name) > 1:
                yield Problem("train.lr_scale", f"{name!r} is named twice")
            elif name not in self.model.trainable:
                yield Problem("train.lr_scale", f"{name!r} is not in model.trainable "
                              f"({', '.join(self.model.trainable)})", ("model.trainable",))
        if self.train.image_embedding_cache_gb and "sam_image_encoder" in self.model.trainable:
            yield Problem("train.image_embedding_cache_gb", "needs a frozen SAM image encoder "
                          "(sam_image_encoder is in model.trainable)", ("model.trainable",))
        backbone = self.model.backbone
        local = LOCAL_VLM_PRESETS.get(backbone.family, ())
        if backbone.name_or_path is None and self.train.init_from is None and (
                local and backbone.preset not in local):
            yield Problem("model.backbone.preset",
                          f"unknown {backbone.family} preset {backbone.preset!r} without "
                          f"name_or_path (local presets: {', '.join(local)})",
                          ("model.backbone.family", "model.backbone.name_or_path"))


T = TypeVar("T")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                cls: type[T] = KeySegConfig) -> T:  # type: ignore[assignment]
    """Load a YAML config (the defaults when ``path`` is None) and apply overrides.

    Overrides are ``section.key=value`` strings (a leading ``--`` is allowed); values are
    parsed as YAML, so ``train.lr=1e-4``, ``model.lora.target_modules=[q_proj,k_proj]``.
    Every problem is reported at once, naming its source: the file, or ``command line``
    for an overridden key.
    """
    return load_yaml(cls, path, overrides)


# ---------------------------------------------------------------------------------------
# evaluation

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
