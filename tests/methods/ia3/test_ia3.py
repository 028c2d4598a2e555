"""IA3: where the vectors act, how they merge, the architecture defaults, and bad configs."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, logits, max_diff, perturb_trainable
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.methods.ia3 import IA3_DEFAULTS, IA3Conv, IA3Linear


def conv2d(groups: int) -> nn.Conv2d:
    return nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=groups)


# name: (base layer factory, input shape, in-dim of the input, out-dim of the output)
BASES = {
    "linear": (lambda: nn.Linear(5, 3), (2, 4, 5), -1, -1),
    "conv1d-gpt2": (lambda: Conv1D(3, 5), (2, 4, 5), -1, -1),
    "conv2d": (lambda: conv2d(1), (2, 4, 5, 5), 1, 1),
    "conv2d-grouped": (lambda: conv2d(2), (2, 4, 5, 5), 1, 1),
}


def wrapped(base_name: str, feedforward: bool, seed: int = 0):
    factory, shape, in_dim, out_dim = BASES[base_name]
    torch.manual_seed(seed)
    base = factory()
    nn.init.normal_(base.bias)  # GPT-2's Conv1D starts its bias at zero
    layer = (IA3Conv if isinstance(base, nn.Conv2d) else IA3Linear)(base)
    layer.update_layer("default", is_feedforward=feedforward, init_ia3_weights=False)
    layer.set_adapter(["default"])
    return layer, torch.randn(shape), in_dim, out_dim


def broadcast(vector: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vector.flatten().view(shape)


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward-input"])
def test_vector_scales_the_input_of_feedforward_layers_and_the_output_of_others(base_name, feedforward):
    layer, x, in_dim, out_dim = wrapped(base_name, feedforward)
    vector = layer.ia3_l["default"].detach()
    with torch.no_grad():
        if feedforward:
            expected = layer.base_layer(x * broadcast(vector, in_dim, x.dim()))
        else:
            out = layer.base_layer(x)
            expected = out * broadcast(vector, out_dim, out.dim())
        assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward-input"])
def test_merge_multiplies_into_the_weight_and_unmerge_divides_it_out(base_name, feedforward):
    layer, x, _, _ = wrapped(base_name, feedforward)
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), adapted, atol=1e-5)
        assert not torch.equal(layer.base_layer.weight, weight)
        assert torch.equal(layer.base_layer.bias, bias) == feedforward  # the bias is scaled on output only
        layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, weight, atol=1e-6)
    assert torch.allclose(layer.base_layer.bias, bias, atol=1e-6)


def test_vector_shapes_follow_peft():
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.IA3Config(task_type="CAUSAL_LM"))
    state = deltatune.get_peft_model_state_dict(model)
    assert state["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 64)  # input of down_proj
    assert state["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)  # k_proj output
    assert all(torch.equal(t, torch.ones_like(t)) for t in state.values())


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2", "t5"])
def test_defaults_come_from_the_architecture_table(arch):
    model = ARCHS[arch][0]()
    peft_model = deltatune.get_peft_model(model, deltatune.IA3Config(task_type=ARCHS[arch][1]))
    config = peft_model.peft_config["default"]
    targets, feedforward = IA3_DEFAULTS[model.config.model_type]
    assert (sorted(config.target_modules), config.feedforward_modules) == (sorted(targets), sorted(feedforward))


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2", "t5"])
def test_all_linear_matches_peft_and_its_file_loads_in_both(arch, tmp_path):
    """The default feedforward names (GPT-2's "mlp.c_proj", BERT's "output.dense") stay valid once "all-linear"
    is expanded to leaf names, also in the saved config, which both libraries check on load."""
    factory, task = ARCHS[arch][:2]
    theirs = peft.get_peft_model(factory(), peft.IA3Config(task_type=task, target_modules="all-linear"))
    ours = deltatune.get_peft_model(factory(), deltatune.IA3Config(task_type=task, target_modules="all-linear"))
    perturb_trainable(theirs)
    state = peft.get_peft_model_state_dict(theirs)
    assert any(v.shape[0] == 1 for v in state.values())  # some vectors scale a feedforward input
    deltatune.set_peft_model_state_dict(ours, state)
    inputs = inputs_for(arch)
    expected = logits(theirs.eval(), inputs)
    assert max_diff(logits(ours.eval(), inputs), expected) < 1e-5
    ours.save_pretrained(tmp_path)
    for loaded in (deltatune.PeftModel.from_pretrained(factory(), tmp_path),
                   peft.PeftModel.from_pretrained(factory(), tmp_path)):
        assert max_diff(logits(loaded.eval(), inputs), expected) < 1e-5


def test_default_feedforward_modules_keep_only_targeted_ones():
    config = deltatune.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj"])
    model = deltatune.get_peft_model(ARCHS["llama"][0](), config)
    assert model.peft_config["default"].feedforward_modules == []
    assert config.feedforward_modules is None  # the caller's config is left alone


def test_custom_model_without_defaults_has_no_feedforward_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    deltatune.inject_adapter_in_model(deltatune.IA3Config(target_modules=["0", "2"]), model)
    assert [layer.ia3_l["default"].shape for layer in (model[0], model[2])] == [(8, 1), (2, 1)]


@pytest.mark.parametrize(
    ("targets", "feedforward", "strays"),
    [(["k_proj", "v_proj"], ["down_proj"], "['down_proj']"),
     (["k_proj", "down_proj"], ["down_proj", "up_proj", "fc2"], "['fc2', 'up_proj']")],
)
def test_feedforward_modules_outside_targets_are_refused_by_name(targets, feedforward, strays):
    with pytest.raises(ValueError, match="must be a subset of target_modules; " + re.escape(strays)):
        deltatune.IA3Config(target_modules=targets, feedforward_modules=feedforward)


def test_module_sets_are_stored_sorted():
    config = deltatune.IA3Config(target_modules={"v_proj", "k_proj", "down_proj"},
                                 feedforward_modules={"down_proj"})
    assert config.target_modules == ["down_proj", "k_proj", "v_proj"]
    assert config.feedforward_modules == ["down_proj"]


def test_unsupported_module_type_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="Embedding, which IA3 cannot wrap"):
        deltatune.inject_adapter_in_model(deltatune.IA3Config(target_modules=["0"]), model)


def test_safe_merge_refuses_non_finite_vectors():
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.ia3_l["default"][0] = float("inf")
    weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, weights[key]), key
