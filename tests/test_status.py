"""get_layer_status / get_model_status report what peft's functions report, state by state."""

from __future__ import annotations

from dataclasses import asdict

import peft
import pytest
import torch
from conftest import tiny_llama

import deltatune

# Type names are each library's own ("LoraLinear" / "lora.Linear", "TunedModel" / "LoraModel").
OWN_NAMES = ("module_type", "adapter_model_type")


def comparable(status) -> dict:
    return {key: value for key, value in asdict(status).items() if key not in OWN_NAMES}


def build(lib):
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            modules_to_save=["lm_head"]))
    model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    return model


def merge(lib, model, names):
    # peft's PeftModel has no merge_adapter of its own; its tuner model does
    (model if lib is deltatune else model.base_model).merge_adapter(names)


def both_statuses(step=None):
    out = []
    for lib in (deltatune, peft):
        model = build(lib)
        if step is not None:
            step(lib, model)
        out.append(([comparable(s) for s in model.get_layer_status()], comparable(model.get_model_status())))
    return out


@pytest.mark.filterwarnings("ignore:Already unmerged")  # peft, on the layers "other" never reached
@pytest.mark.parametrize("state", ["fresh", "switched", "merged", "unmerged", "frozen_param"])
def test_status_equals_peft(state):
    def step(lib, model):
        if state == "switched":
            model.set_adapter("other")
        if state in ("merged", "unmerged"):
            merge(lib, model, ["other"])
        if state == "unmerged":
            (model if lib is deltatune else model.base_model).unmerge_adapter()
        if state == "frozen_param":  # one layer's B frozen by hand: that layer and the model say "irregular"
            model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight.requires_grad_(False)

    (layers, model), (peft_layers, peft_model) = both_statuses(step)
    expected = {"fresh": (["default"], []), "switched": (["other"], []), "merged": (["default"], ["other"]),
                "unmerged": (["default"], []), "frozen_param": (["default"], [])}[state]
    assert (model["active_adapters"], model["merged_adapters"]) == expected
    if state == "switched":
        # "other" covers q_proj only. peft lists it as active on every layer and calls the model irregular; here a
        # layer lists the active adapters it holds (the others run their base alone), and the model is consistent.
        assert peft_model["active_adapters"] == "irregular"
        assert [layer["active_adapters"] for layer in layers] == [["other"], [], ["other"], [], []]
        for status in (*layers, *peft_layers, model, peft_model):
            del status["active_adapters"]
    assert (layers, model) == (peft_layers, peft_model)
    assert layers[0]["name"] == "model.model.layers.0.self_attn.q_proj"
    if state == "frozen_param":
        assert model["requires_grad"]["default"] == layers[0]["requires_grad"]["default"] == "irregular"


def test_status_inside_disable_adapter():
    for lib in (deltatune, peft):
        model = build(lib)
        with model.disable_adapter():
            status = model.get_model_status()
        assert status.enabled is False
        assert model.get_model_status().enabled is True


def test_irregular_states_are_reported():
    model = build(deltatune)
    layers = [layer for _, layer in deltatune.layers.adapter_layers(model)]
    layers[0].set_adapter(["other"])  # one layer switched by hand, one merged by hand
    layers[1].merge(["default"])
    status = model.get_model_status()
    assert status.active_adapters == "irregular"
    assert status.merged_adapters == "irregular"
    layers[1].unmerge()
    layers[2].disabled = True
    assert model.get_model_status().enabled == "irregular"


def test_injected_model_without_wrapper():
    config = {"r": 4, "target_modules": ["q_proj"]}
    ours = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config), tiny_llama())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_llama())
    assert [comparable(s) for s in deltatune.get_layer_status(ours)] == [
        comparable(s) for s in peft.get_layer_status(theirs)]
    status = deltatune.get_model_status(ours)
    assert (status.adapter_model_type, status.peft_types, status.num_adapter_layers) == ("None", {}, 2)
    assert status.base_model_type == "LlamaForCausalLM"
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 4))
    deltatune.inject_adapter_in_model(deltatune.LoraConfig(r=2, target_modules=["0"]), sequential)
    assert deltatune.get_model_status(sequential).base_model_type == "other"  # peft's word for a plain module
    assert status.trainable_params == sum(p.numel() for p in ours.parameters() if p.requires_grad) > 0


def test_no_adapter_layers_says_why():
    with pytest.raises(ValueError, match="No adapter layers.*inject_adapter_in_model"):
        deltatune.get_model_status(tiny_llama())
    prompt = deltatune.get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"\['default'\] are prompt-learning adapters"):
        prompt.get_layer_status()
