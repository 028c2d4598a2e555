"""Injection: which modules a config targets, defaults per architecture, and errors that say what to fix."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, tiny_bert, tiny_llama
from torch import nn

import deltatune
from deltatune.layers import AdapterLayer
from deltatune.modules_to_save import ModulesToSaveWrapper


def adapted(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLayer))


def leaves(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in adapted(model)}


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}), ("bert", {"query", "value"}), ("t5", {"q", "v"})],
)
def test_default_targets_per_architecture(arch, expected):
    config = deltatune.LoraConfig(task_type=ARCHS[arch][1], **ARCHS[arch][3])
    model = deltatune.get_peft_model(ARCHS[arch][0](), config)
    assert leaves(model) == expected
    assert model.peft_config["default"].target_modules == sorted(expected)
    assert config.target_modules is None  # filled in on the model's copy only


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.proj = nn.Linear(8, 2)

    def forward(self, x):
        return self.proj(self.encoder(x))


def test_unknown_architecture_without_targets_is_a_clear_error():
    with pytest.raises(ValueError, match="no default LORA targets.*model_type=None.*Set target_modules.*proj"):
        deltatune.inject_adapter_in_model(deltatune.LoraConfig(), Custom())


def test_target_that_matches_nothing_lists_existing_names():
    with pytest.raises(ValueError, match="matched no module.*q_proj") as info:
        deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["query"]))
    assert "v_proj" in str(info.value) and "query" in str(info.value)


def test_modules_to_save_that_matches_nothing_is_reported():
    config = deltatune.LoraConfig(target_modules=["q_proj"], modules_to_save=["head"])
    with pytest.raises(ValueError, match="modules_to_save=\\['head'\\] matched no module.*lm_head"):
        deltatune.get_peft_model(tiny_llama(), config)


def test_all_linear_excludes_the_output_head():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in leaves(model)
    assert leaves(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    bert = deltatune.get_peft_model(tiny_bert(), deltatune.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear"))
    assert "classifier" not in leaves(bert)
    assert isinstance(bert.get_base_model().classifier, ModulesToSaveWrapper)


@pytest.mark.parametrize(
    "targets", ["all-linear", ["v_proj", "q_proj", "o_proj"], ("v_proj", "q_proj"), {"v_proj", "k_proj", "q_proj"}]
)
def test_target_modules_are_saved_sorted_and_stable(tmp_path, targets):
    texts = []
    for i in range(2):
        model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=copy.copy(targets)))
        saved = model.peft_config["default"].target_modules
        assert saved == sorted(saved)
        model.save_pretrained(tmp_path / str(i))
        texts.append((tmp_path / str(i) / "adapter_config.json").read_text())
    assert texts[0] == texts[1]


def test_regex_target_is_fully_matched_against_the_whole_name():
    model = deltatune.get_peft_model(
        tiny_llama(), deltatune.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    )
    assert adapted(model) == [
        "base_model.model.model.layers.1.self_attn.q_proj",
        "base_model.model.model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(ValueError, match="matched no module"):  # a partial match is not enough
        deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=r"q_proj"))


def test_layers_to_transform_and_exclude_modules():
    model = deltatune.get_peft_model(
        tiny_llama(), deltatune.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[0])
    )
    assert all(".layers.0." in name for name in adapted(model)) and len(adapted(model)) == 2
    model = deltatune.get_peft_model(
        tiny_llama(), deltatune.LoraConfig(target_modules="all-linear", exclude_modules=["q_proj", "down_proj"])
    )
    assert leaves(model) == {"k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}


@pytest.mark.parametrize(
    "config",
    [
        deltatune.LoraConfig(target_modules="all-linear"),
        deltatune.LoraConfig(),
        deltatune.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], rank_pattern={"query": 2}),
    ],
    ids=["all-linear", "defaults", "seq-cls-head"],
)
def test_get_peft_model_does_not_modify_the_callers_config(config):
    before = copy.deepcopy(config.to_dict())
    model_factory = tiny_bert if config.task_type == "SEQ_CLS" else tiny_llama
    deltatune.get_peft_model(model_factory(), config)
    assert config.to_dict() == before


def test_inject_adapter_in_model_on_a_custom_module():
    model = Custom()
    x = torch.randn(3, 4)
    expected = model(x)
    returned = deltatune.inject_adapter_in_model(deltatune.LoraConfig(target_modules=["proj"], r=2), model)
    assert returned is model and adapted(model) == ["proj"]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "proj.lora_A.default.weight", "proj.lora_B.default.weight"
    ]
    # B = 0: exact zeros, but added inside an addmm over the base output, which a CPU may round differently.
    torch.testing.assert_close(model(x), expected, rtol=1.3e-6, atol=1e-6)
    assert sorted(deltatune.get_peft_model_state_dict(model)) == ["proj.lora_A.weight", "proj.lora_B.weight"]


def test_second_adapter_on_the_same_module_shares_its_lora_layer():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("second", deltatune.LoraConfig(target_modules=["q_proj"], r=2))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.adapter_names == ["default", "second"]  # one LoRA layer holds both adapters


def test_a_module_named_in_full_is_adapted_whatever_layers_to_transform_says_as_in_peft():
    import peft

    kwargs = {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]}
    ours = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))

    def adapted_names(model):
        suffix = ".lora_A.default"
        return sorted(n.removesuffix(suffix) for n, _ in model.named_modules() if n.endswith(suffix))

    assert adapted_names(ours) == adapted_names(theirs)
    assert any("layers.0.self_attn.q_proj" in n for n in adapted_names(ours))


def test_nested_targets_are_refused_by_name():
    model = ARCHS["llama"][0]()
    config = deltatune.BottleneckConfig(target_modules=["mlp", "down_proj"], placement="pfeiffer")
    with pytest.raises(ValueError, match=r"selects both .*layers.0.mlp and .*layers.0.mlp.down_proj, which sits"):
        deltatune.get_peft_model(model, config)
