"""What trains: LoRA on the language model, and one table of components -> parameters.

Every parameter of a :class:`~keyseg.model.keyseg.KeySegModel` belongs to exactly one named
component; :func:`configure_trainable` switches whole components on or off and refuses a
configuration that marks a component trainable while it has no parameter (the reference
silently froze its fusion and table projection this way).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from keyseg.config import LoraSettings
from keyseg.errors import KeySegConfigError

COMPONENTS: tuple[str, ...] = (
    "lora",
    "embed_tokens",
    "lm_head",
    "language_model",
    "vision_tower",
    "mm_projector",
    "sam_image_encoder",
    "sam_prompt_encoder",
    "sam_mask_decoder",
    "text_hidden_fcs",
    "fusion",
    "table_projection",
)


def apply_lora(model, settings: LoraSettings) -> None:
    """Wrap the VLM with PEFT LoRA adapters on the *language model* only.

    The target pattern is anchored on ``language_model`` so the vision tower, projector and
    KeySeg's own heads (whose attention layers are also called ``q_proj``...) never get one.
    """
    if not settings.enabled or hasattr(model.backbone.vlm, "peft_config"):
        return
    from peft import LoraConfig, get_peft_model

    names = "|".join(settings.target_modules)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=rf".*language_model.*\.({names})",
        bias="none",
    )
    model.backbone.vlm = get_peft_model(model.backbone.vlm, config)


def component_modules(model) -> dict[str, list[nn.Module]]:
    """Component name -> the modules it consists of (``lora`` is found by name)."""
    backbone = model.backbone
    heads = [model.text_hidden_fcs]
    if model.keyword_text_proj is not None:
        heads.append(model.keyword_text_proj)
    return {
        "embed_tokens": [backbone.input_embeddings()],
        "lm_head": [backbone.output_embeddings()],
        "vision_tower": [backbone.vision_tower()],
        "mm_projector": [backbone.projector()],
        "language_model": [backbone.language_model()],
        # SAM or SAM 2: sam_image_encoder / sam_prompt_encoder / sam_mask_decoder
        **model.sam.component_modules(),
        "text_hidden_fcs": heads,
        "fusion": [model.keyword_fusion],
        "table_projection": [model.embedding_table_proj],
    }


def parameter_components(model) -> dict[str, str]:
    """Parameter name -> component name, for every parameter of ``model``."""
    owner: dict[int, str] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            owner[id(param)] = "lora"
    modules = component_modules(model)
    # Priority follows COMPONENTS: embeddings/lm_head are claimed before language_model.
    for component in COMPONENTS:
        for module in modules.get(component, []):
            for param in module.parameters():
                owner.setdefault(id(param), component)
    result = {}
    for name, param in model.named_parameters():
        if id(param) not in owner:
            raise KeySegConfigError(f"parameter {name} belongs to no trainable component")
        result[name] = owner[id(param)]
    return result


@dataclass
class ComponentCount:
    trainable: int = 0
    frozen: int = 0


def configure_trainable(model, trainable: Iterable[str]) -> dict[str, ComponentCount]:
    """Set ``requires_grad`` per component and return per-component parameter counts.

    Raises:
        KeySegConfigError: a name is not a component, or a component marked trainable has
            no parameter in this model (unless the model config makes it legitimately
            empty: LoRA disabled, fusion variant ``none``, an LM head tied to the input
            embeddings).
    """
    wanted = set(trainable)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise KeySegConfigError(
            f"model.trainable: unknown component(s) {sorted(unknown)} (known: {list(COMPONENTS)})"
        )
    owners = parameter_components(model)
    counts = {name: ComponentCount() for name in COMPONENTS}
    for name, param in model.named_parameters():
        component = owners[name]
        param.requires_grad_(component in wanted)
        if component in wanted:
            counts[component].trainable += param.numel()
        else:
            counts[component].frozen += param.numel()
    cfg = model.config
    legitimately_empty = set()
    if not cfg.lora.enabled:
        legitimately_empty.add("lora")
    if cfg.fusion.variant == "none":
        legitimately_empty.add("fusion")
    backbone = model.backbone
    if backbone.output_embeddings().weight is backbone.input_embeddings().weight:
        # Tied LM head (Qwen2-VL-2B, Qwen2.5-VL-3B, Qwen3-VL-2B/4B): the one matrix is
        # claimed, and trained, as embed_tokens.
        legitimately_empty.add("lm_head")
    for component in sorted(wanted - legitimately_empty):
        if counts[component].trainable == 0:
            raise KeySegConfigError(
                f"model.trainable lists '{component}' but it has no parameter in this model "
                "(was LoRA applied? is the module built?)"
            )
    return counts


def format_trainable_table(counts: dict[str, ComponentCount]) -> str:
    """A plain-text table of trainable / frozen parameters per component."""
    lines = [f"{'component':<20}{'trainable':>14}{'frozen':>14}"]
    total_t = total_f = 0
    for name, count in counts.items():
        if count.trainable or count.frozen:
            lines.append(f"{name:<20}{count.trainable:>14,}{count.frozen:>14,}")
            total_t += count.trainable
            total_f += count.frozen
    lines.append(f"{'total':<20}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)
