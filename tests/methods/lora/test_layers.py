"""LoRA layers on every supported base layer: no-op at init, scaling, merging, bias options, peft parity."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, logits, lora_kwargs, max_diff, perturb_trainable
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.methods.lora import LoraConv, LoraEmbedding, LoraLinear

TOL = 1e-5


class Holder(nn.Module):
    """One base layer under the name "layer", so every layer type is targeted the same way."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS = {
    # name: (base layer factory, input factory, deltatune layer class)
    "linear": (lambda: nn.Linear(6, 5), lambda g: torch.randn(2, 3, 6, generator=g), LoraLinear),
    "gpt2_conv1d": (lambda: Conv1D(5, 6), lambda g: torch.randn(2, 3, 6, generator=g), LoraLinear),
    "embedding": (
        lambda: nn.Embedding(20, 6, padding_idx=0),
        lambda g: torch.randint(0, 20, (2, 7), generator=g),
        LoraEmbedding,
    ),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), lambda g: torch.randn(2, 4, 9, generator=g), LoraConv),
    "conv2d": (
        lambda: nn.Conv2d(3, 5, (3, 2), stride=2, padding=1),
        lambda g: torch.randn(2, 3, 8, 8, generator=g),
        LoraConv,
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2), padding=1),
        lambda g: torch.randn(2, 2, 4, 6, 6, generator=g),
        LoraConv,
    ),
}
LAYER_NAMES = list(LAYERS)


def holder(kind: str, seed: int = 0) -> Holder:
    torch.manual_seed(seed)
    return Holder(LAYERS[kind][0]())


def layer_input(kind: str, seed: int = 3) -> torch.Tensor:
    return LAYERS[kind][1](torch.Generator().manual_seed(seed))


def config_kwargs(kind: str, **overrides) -> dict:
    kwargs = {"target_modules": ["layer"], "r": 3, "lora_alpha": 6, "init_lora_weights": False}
    if kind == "gpt2_conv1d":
        kwargs["fan_in_fan_out"] = True
    kwargs.update(overrides)
    return kwargs


def ours_and_peft(kind: str, **overrides) -> tuple[Holder, Holder]:
    """The same non-zero adapter on the same base layer, injected by each library (peft's weights copied)."""
    kwargs = config_kwargs(kind, **overrides)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), holder(kind))
    ours = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**kwargs), holder(kind))
    deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return ours, theirs


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_layer_type_and_fresh_adapter_is_exact_noop(kind):
    base = holder(kind)
    x = layer_input(kind)
    with torch.no_grad():
        expected = base(x)
        config = deltatune.LoraConfig(**config_kwargs(kind, init_lora_weights=True))
        model = deltatune.inject_adapter_in_model(config, base)
        assert isinstance(model.layer, LAYERS[kind][2])
        if LAYERS[kind][2] is LoraLinear:
            # B = 0 makes the adapter's term exact zeros, but LoraLinear adds it inside an addmm over the base
            # output, which a BLAS may round differently on some CPUs: a tolerance far below any adapter's effect.
            torch.testing.assert_close(model(x), expected, rtol=1.3e-6, atol=1e-6)
        else:
            assert torch.equal(model(x), expected)  # the same base module, plus exact zeros by a plain add


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_only_adapter_parameters_are_trainable(kind):
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs(kind)), holder(kind))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    expected = ["layer.lora_embedding_A.default", "layer.lora_embedding_B.default"] if kind == "embedding" \
        else ["layer.lora_A.default.weight", "layer.lora_B.default.weight"]
    assert trainable == expected
    # File keys are the parameter names without the adapter name.
    assert sorted(deltatune.get_peft_model_state_dict(model)) == [k.replace(".default", "") for k in expected]


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_layer_matches_peft_outputs_gradients_and_keys(kind):
    ours, theirs = ours_and_peft(kind)
    assert sorted(deltatune.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    x = layer_input(kind)
    outs = []
    for model in (ours, theirs):
        out = model(x)
        out.pow(2).mean().backward()
        outs.append(out.detach())
    assert max_diff(outs[0], outs[1]) < TOL
    assert max_diff(outs[0], holder(kind)(x)) > 1e-3  # the adapter is on
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(our_grads) == sorted(peft_grads)
    for name, grad in peft_grads.items():
        assert max_diff(our_grads[name], grad) < TOL, name


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    ours, theirs = ours_and_peft(kind)
    x = layer_input(kind)
    base_weight = ours.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = ours(x)
        ours.layer.merge()
        assert ours.layer.merged
        merged = ours(x)
        theirs.layer.merge()
        assert max_diff(ours.layer.base_layer.weight, theirs.layer.base_layer.weight) < TOL
        ours.layer.unmerge()
        assert not ours.layer.merged
        again = ours(x)
    assert max_diff(merged, unmerged) < TOL
    assert max_diff(again, unmerged) < TOL
    assert max_diff(ours.layer.base_layer.weight, base_weight) < TOL


def test_dilated_conv_merges_exactly():
    """peft does not support dilation; the merged kernel must still equal the two-conv forward."""
    base = Holder(nn.Conv2d(3, 5, 3, padding=2, dilation=2))
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("conv2d")), base)
    x = layer_input("conv2d")
    with torch.no_grad():
        unmerged = model(x)
        model.layer.merge()
        assert max_diff(model(x), unmerged) < TOL


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "embedding", "conv2d"])
def test_scaling_is_alpha_over_r_or_sqrt_r(kind, use_rslora):
    r, alpha = 4, 12
    ours, theirs = ours_and_peft(kind, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert ours.layer.scaling["default"] == pytest.approx(expected)
    assert ours.layer.scaling["default"] == pytest.approx(theirs.layer.scaling["default"])
    # The forward really applies it: the adapter's contribution is scaling * (B A x).
    x = layer_input(kind)
    with torch.no_grad():
        contribution = ours(x) - ours.layer.base_layer(x)
        ours.layer.scaling["default"] = 1.0
        unit = ours(x) - ours.layer.base_layer(x)
    assert max_diff(contribution, expected * unit) < TOL


def test_rank_and_alpha_patterns_pick_per_module_values():
    kwargs = lora_kwargs("llama", r=4, lora_alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                         alpha_pattern={"q_proj": 3})
    ours = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(ARCHS["llama"][0](), peft.LoraConfig(**kwargs))
    ours_layers = dict(ours.named_modules())
    seen = 0
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            mine = ours_layers[name]
            assert mine.r["default"] == module.r["default"], name
            assert mine.scaling["default"] == pytest.approx(module.scaling["default"]), name
            seen += 1
    assert seen == 4
    q1 = ours.base_model.model.model.layers[1].self_attn.q_proj
    assert (q1.r["default"], q1.scaling["default"]) == (6, 0.5)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_option_trains_and_saves_what_peft_does(arch, bias):
    kwargs = lora_kwargs(arch, bias=bias)
    ours = deltatune.get_peft_model(ARCHS[arch][0](), deltatune.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(ARCHS[arch][0](), peft.LoraConfig(**kwargs))
    trainable = [sorted(n for n, p in m.named_parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1]
    n_bias = sum(".bias" in n and "lora_" not in n and "modules_to_save" not in n for n in trainable[0])
    assert (n_bias > 0) == (bias != "none")
    saved = sorted(deltatune.get_peft_model_state_dict(ours))
    assert saved == sorted(peft.get_peft_model_state_dict(theirs))


@pytest.mark.parametrize(("saver", "loader"), [(deltatune, peft), (peft, deltatune)], ids=["to-peft", "from-peft"])
@pytest.mark.parametrize(("arch", "bias"), [("gpt2", "lora_only"), ("bert", "all")])
def test_trained_biases_round_trip_with_peft(tmp_path, arch, bias, saver, loader):
    model = saver.get_peft_model(ARCHS[arch][0](), saver.LoraConfig(**lora_kwargs(arch, bias=bias))).eval()
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    loaded = loader.PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path).eval()
    inputs = inputs_for(arch)
    assert max_diff(logits(loaded, inputs), logits(model, inputs)) < TOL


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_and_changes_nothing(bad):
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**lora_kwargs("llama")))
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    # Poison the last adapted layer only: layers merged before it must not be left changed either.
    last = model.base_model.model.model.layers[-1].self_attn.v_proj
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    after = model.get_base_model().state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(layer.merged for _, layer in deltatune.layers.adapter_layers(model))


def test_safe_merge_of_finite_adapter_merges():
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**lora_kwargs("llama")))
    inputs = inputs_for("llama")
    expected = logits(model, inputs)
    model.merge_adapter(safe_merge=True)
    assert max_diff(logits(model, inputs), expected) < TOL


def test_lora_dropout_applies_in_train_mode_only():
    model = deltatune.inject_adapter_in_model(
        deltatune.LoraConfig(**config_kwargs("linear", lora_dropout=0.5)), holder("linear")
    )
    x = layer_input("linear")
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.equal(first, model(x))


def test_half_precision_base_keeps_float32_adapter():
    model = holder("linear").to(torch.bfloat16)
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear")), model)
    assert model.layer.lora_A["default"].weight.dtype == torch.float32
    out = model(layer_input("linear").to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.layer.lora_B["default"].weight.grad is not None


@pytest.mark.parametrize("kind", LAYER_NAMES)
@pytest.mark.parametrize("use_dora", [False, True])
def test_half_precision_base_adds_float32_adapters_and_rounds_once_as_peft(kind, use_dora):
    """Two active adapters on a bfloat16 base: the adapters add in float32, the output is rounded once at the end.
    Plain LoRA gives peft's bits; DoRA's float32 terms are grouped differently, so a bfloat16 rounding may flip."""

    def build(lib):
        kwargs = config_kwargs(kind, use_dora=use_dora)
        # get_peft_model: both libraries keep the adapters in float32 beside a bfloat16 base
        model = lib.get_peft_model(holder(kind).to(torch.bfloat16), lib.LoraConfig(**kwargs))
        model.add_adapter("second", lib.LoraConfig(**{**kwargs, "r": 2}))
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "set_adapter"):
                module.set_adapter(["default", "second"])
        return model

    theirs, ours = build(peft), build(deltatune)
    perturb_trainable(theirs)
    for name in ("default", "second"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        deltatune.set_peft_model_state_dict(ours, state, adapter_name=name)
    assert all(p.dtype == torch.float32 for n, p in ours.named_parameters() if "lora_" in n)
    x = layer_input(kind)
    x = x.to(torch.bfloat16) if x.is_floating_point() else x
    with torch.no_grad():
        out, expected = ours(x), theirs(x)
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=2**-9)  # within one bfloat16 step
        if not use_dora:
            # Rounded once, as peft: the same bits, except where the libraries' float32 kernels differ in the last
            # bit and that tips a bfloat16 rounding (~2**-16 per element). Rounding twice moves ~half the elements.
            assert (out != expected).sum() <= 1


def test_grouped_conv_matches_peft_and_refuses_what_peft_refuses():
    """A depthwise convolution (ConvNext's dwconv): B is grouped like the base, A reads every channel."""

    def grouped():
        torch.manual_seed(0)
        return Holder(nn.Conv2d(4, 4, 3, padding=1, groups=4))

    kwargs = {"target_modules": ["layer"], "r": 8, "init_lora_weights": False}
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), grouped())
    ours = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**kwargs), grouped())
    deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) < TOL and max_diff(ours(x), grouped()(x)) > 1e-3
    with pytest.raises(ValueError, match="cannot be merged"):
        ours.layer.merge()
    with pytest.raises(ValueError, match="groups=4.*rank 6, which groups=4 does not divide"):
        deltatune.inject_adapter_in_model(deltatune.LoraConfig(target_modules=["layer"], r=6), grouped())
    with pytest.raises(ValueError, match="no DoRA"):
        deltatune.inject_adapter_in_model(deltatune.LoraConfig(target_modules=["layer"], use_dora=True), grouped())


def test_unsupported_modules_are_refused_clearly():
    norm = Holder(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="LayerNorm.*cannot wrap"):
        deltatune.inject_adapter_in_model(deltatune.LoraConfig(target_modules=["layer"]), norm)


def test_state_dict_round_trip_on_a_custom_module():
    ours, _ = ours_and_peft("conv2d")
    state = {k: v.clone() for k, v in deltatune.get_peft_model_state_dict(ours).items()}
    base = holder("conv2d")
    torch.manual_seed(1)  # other factors than peft drew for `ours`
    fresh = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("conv2d")), base)
    assert not all(torch.equal(v, deltatune.get_peft_model_state_dict(fresh)[k]) for k, v in state.items())
    deltatune.set_peft_model_state_dict(fresh, state)
    x = layer_input("conv2d")
    # The same values in other model objects (each may run other kernels): last bits only.
    torch.testing.assert_close(fresh(x), ours(x), rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(copy.deepcopy(fresh)(x), ours(x), rtol=1.3e-6, atol=1e-6)  # trainers copy models
