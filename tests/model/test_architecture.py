"""``train.init_from`` with a run config whose architecture differs from the directory's:
adjustable keys take effect on the loaded model, keys fixed by the weights stop the run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from keyseg.build import build_tiny_model
from keyseg.config import ModelConfig
from keyseg.errors import KeySegConfigError
from keyseg.model.architecture import reconcile


@pytest.fixture
def loaded():
    return build_tiny_model(seed=0)


def test_same_architecture_changes_nothing_but_what_and_how_to_train(loaded):
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    requested = replace(loaded.settings, loss=replace(loaded.settings.loss, ce_weight=1.0),
                        trainable=("fusion",))
    assert reconcile(loaded, requested, "DIR") == []
    assert loaded.settings == requested
    after = loaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fusion_variant_takes_effect_and_keeps_the_shared_tensors(loaded):
    cross = loaded.keyword_fusion.cross_attn.q_proj.weight.detach().clone()
    requested = replace(loaded.settings, fusion=replace(loaded.settings.fusion, variant="residual"))
    notes = reconcile(loaded, requested, "DIR")
    assert loaded.settings.fusion.variant == "residual"
    assert hasattr(loaded.keyword_fusion, "norm_mlp")
    torch.testing.assert_close(loaded.keyword_fusion.cross_attn.q_proj.weight, cross)
    assert any("model.fusion.variant: 'reference' from train.init_from DIR -> 'residual'" in n
               for n in notes)
    assert any("start fresh" in n for n in notes)


def test_hidden_state_and_separate_key_head_take_effect(loaded):
    requested = replace(loaded.settings, key_projection="separate",
                        backbone=replace(loaded.settings.backbone, hidden_state="at"))
    reconcile(loaded, requested, "DIR")
    assert loaded.settings.backbone.hidden_state == "at"
    head = loaded.keyword_text_proj
    assert head is not None and head is not loaded.text_hidden_fcs
    torch.testing.assert_close(head[0].weight, loaded.text_hidden_fcs[0].weight)


def test_convention_change_re_registers_the_tokens(loaded):
    tokenizer = loaded.processor.tokenizer
    seg = tokenizer.convert_tokens_to_ids("[SEG]")
    backbone = replace(loaded.settings.backbone, convention="v0")
    requested = replace(loaded.settings, backbone=backbone)
    reconcile(loaded, requested, "DIR")
    ids = tokenizer("is [SEG]", add_special_tokens=False)["input_ids"]
    assert ids[-1] == seg and tokenizer.convert_ids_to_tokens(ids[-2]) == "Ġ"  # lone space
    assert loaded.processor.backbone.convention == "v0"


def test_key_fixed_by_the_weights_stops_with_one_line_naming_both_values(loaded):
    requested = replace(loaded.settings, sam=replace(loaded.settings.sam, preset="shapes"))
    with pytest.raises(KeySegConfigError) as error:
        reconcile(loaded, requested, "DIR")
    message = str(error.value)
    assert "model.sam.preset" in message and "'shapes'" in message and "'tiny'" in message
    assert "\n" not in message
    assert loaded.settings.sam.preset == "tiny"


def test_defaults_and_weight_sources_keep_the_directory_and_say_so(loaded):
    assert loaded.settings.sam.preset != ModelConfig().sam.preset
    requested = replace(loaded.settings, sam=ModelConfig().sam,
                        backbone=replace(loaded.settings.backbone, name_or_path="org/vlm"))
    notes = reconcile(loaded, requested, "DIR")
    assert loaded.settings.sam.preset == "tiny" and loaded.settings.backbone.name_or_path is None
    assert any("model.sam.preset: 'tiny' kept" in n for n in notes)
    assert any("model.backbone.name_or_path='org/vlm' ignored" in n for n in notes)
