"""AutoPeftModel*: the base model named in the adapter config is loaded, then the adapter on top of it."""

from __future__ import annotations

import json

import peft
import pytest
from conftest import ARCHS, inputs_for, logits, lora_kwargs, max_diff, perturb_trainable
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import deltatune

CASES = [
    ("llama", AutoModelForCausalLM, deltatune.AutoPeftModelForCausalLM, deltatune.PeftModelForCausalLM),
    ("bert", AutoModelForSequenceClassification, deltatune.AutoPeftModelForSequenceClassification,
     deltatune.PeftModelForSequenceClassification),
]


@pytest.mark.parametrize(("arch", "auto_model", "auto_peft", "peft_cls"), CASES, ids=[c[0] for c in CASES])
def test_auto_peft_model_loads_base_named_in_config(tmp_path, arch, auto_model, auto_peft, peft_cls):
    ARCHS[arch][0]().save_pretrained(tmp_path / "base")
    base = auto_model.from_pretrained(tmp_path / "base")
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(**lora_kwargs(arch))).eval()
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    loaded = auto_peft.from_pretrained(tmp_path / "adapter")
    assert type(loaded) is peft_cls
    assert not any(p.requires_grad for p in loaded.parameters())
    inputs = inputs_for(arch)
    assert max_diff(logits(loaded, inputs), logits(model, inputs)) < 1e-5
    trainable = auto_peft.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_auto_peft_model_reads_a_peft_adapter(tmp_path):
    ARCHS["llama"][0]().save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                 peft.LoraConfig(**lora_kwargs("llama"))).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = deltatune.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    inputs = inputs_for("llama")
    assert max_diff(logits(ours, inputs), logits(theirs, inputs)) < 1e-5


def test_auto_peft_model_without_base_name_says_what_to_do(tmp_path):
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**lora_kwargs("llama")))
    model.save_pretrained(tmp_path)  # a model built from a config has no name_or_path
    with pytest.raises(ValueError, match="no base_model_name_or_path.*PeftModel.from_pretrained"):
        deltatune.AutoPeftModelForCausalLM.from_pretrained(tmp_path)


def test_auto_classes_cannot_be_instantiated():
    with pytest.raises(TypeError, match="from_pretrained"):
        deltatune.AutoPeftModelForCausalLM()


def test_an_adapter_without_task_type_loads_through_its_auto_mapping_in_both_libraries(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
                              ).save_pretrained(tmp_path / "base")
    base = ViTForImageClassification.from_pretrained(tmp_path / "base")
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                                modules_to_save=["classifier"])).eval()
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["auto_mapping"] == {"base_model_class": "ViTForImageClassification",
                                      "parent_library": "transformers.models.vit.modeling_vit"}
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        for auto in (deltatune.AutoPeftModel, peft.AutoPeftModel):
            loaded = auto.from_pretrained(tmp_path / "adapter").eval()
            assert max_diff(loaded(pixel_values=pixels).logits, expected) < 1e-5, auto.__module__


def test_the_adapters_task_type_picks_the_auto_class(tmp_path):
    ARCHS["llama"][0]().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    deltatune.get_peft_model(base, deltatune.LoraConfig(**lora_kwargs("llama"))).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="needs PeftModelForCausalLM.*AutoPeftModelForSequenceClassification"):
        deltatune.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="task_type is 'CAUSAL_LM'.*AutoPeftModelForCausalLM"):
        deltatune.AutoPeftModel.from_pretrained(tmp_path / "a")
    loaded = deltatune.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a", revision=None)  # peft's keyword
    assert type(loaded) is deltatune.PeftModelForCausalLM
