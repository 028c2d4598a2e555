"""add_weighted_adapter: the pure combination functions, peft parity for every combination type, bad input."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import batch, max_diff, tiny_gpt2, tiny_llama
from peft.utils import merge_utils
from torch import nn

import deltatune
from deltatune.methods.lora import merging

TOL = 1e-5
FACTOR_WISE = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
ALL_TYPES = ["cat", *FACTOR_WISE, *SVD_TYPES]


def _kwargs(combination: str) -> dict:
    return {} if combination in ("linear", "cat", "svd") else {"density": 0.5}


# --- pure functions -------------------------------------------------------------------------------
def _task_tensors(seed: int = 0, n: int = 3, shape=(6, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


PURE = {
    # name: (ours, peft's, extra arguments)
    "task_arithmetic": (merging.task_arithmetic, merge_utils.task_arithmetic, {}),
    "magnitude_prune": (merging.magnitude_prune, merge_utils.magnitude_prune, {"density": 0.4}),
    "dare_linear": (merging.dare_linear, merge_utils.dare_linear, {"density": 0.4}),
    "ties_total": (merging.ties, merge_utils.ties, {"density": 0.4, "majority_sign_method": "total"}),
    "ties_frequency": (merging.ties, merge_utils.ties, {"density": 0.6, "majority_sign_method": "frequency"}),
    "dare_ties": (merging.dare_ties, merge_utils.dare_ties, {"density": 0.4, "majority_sign_method": "total"}),
}


@pytest.mark.parametrize("name", list(PURE))
def test_pure_combination_equals_peft_under_the_same_seed(name):
    ours, theirs, extra = PURE[name]
    tensors, weights = _task_tensors(), torch.tensor([0.5, -1.25, 2.0])
    torch.manual_seed(3)
    expected = theirs(tensors, weights, **extra)
    torch.manual_seed(3)
    # Another library's code (its own order of operations): last bits only. A different pruning mask or sign
    # election would move whole entries.
    torch.testing.assert_close(ours(tensors, weights, **extra), expected, rtol=1.3e-6, atol=1e-6)


def test_magnitude_pruning_keeps_the_largest_entries():
    tensor = torch.tensor([[0.1, -3.0], [2.0, -0.2]])
    assert torch.equal(merging.magnitude_pruned(tensor, 0.5), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    assert merging.magnitude_pruned(tensor, 1.0) is tensor


def test_random_pruning_rescales_survivors_and_keeps_the_mean():
    tensor = torch.ones(200, 200)
    torch.manual_seed(0)
    pruned = merging.randomly_pruned(tensor, 0.25)
    assert set(pruned.unique().tolist()) == {0.0, 4.0}
    assert abs(pruned.mean().item() - 1.0) < 0.05


def test_ties_keeps_only_entries_of_the_elected_sign():
    tensors = [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 2.0]), torch.tensor([-1.0, -4.0])]
    merged = merging.ties(tensors, torch.ones(3), density=1.0)
    # entry 0: sum 3 > 0, positives 1 and 3 -> mean 2; entry 1: sum -3 < 0, negatives -1 and -4 -> mean -2.5
    assert torch.equal(merged, torch.tensor([2.0, -2.5]))


def test_factor_weights_put_the_sign_on_a_only():
    weights_a, weights_b = merging.factor_weights([4.0, -1.0], [0.25, 4.0])
    assert torch.allclose(weights_a, torch.tensor([1.0, -2.0])) and torch.allclose(weights_b, torch.tensor([1.0, 2.0]))


def test_cat_is_exact_and_pads_the_rank():
    a1, a2 = torch.randn(2, 5), torch.randn(3, 5)
    b1, b2 = torch.randn(4, 2), torch.randn(4, 3)
    a, b = merging.concatenate_factors([a1, a2], [b1, b2], [0.5, -2.0], [2.0, 0.5], rank=7)
    assert a.shape == (7, 5) and b.shape == (4, 7)
    expected = 0.5 * 2.0 * b1 @ a1 - 2.0 * 0.5 * b2 @ a2
    assert max_diff(b @ a, expected) < TOL


def test_truncated_svd_is_the_best_approximation_and_zero_pads_a_large_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 4, generator=g)
    a, b = merging.truncated_svd(delta, rank=2)
    u, s, vh = torch.linalg.svd(delta)
    assert max_diff(b @ a, u[:, :2] @ torch.diag(s[:2]) @ vh[:2]) < TOL
    for full in (True, False):
        a, b = merging.truncated_svd(delta, rank=9, full_matrices=full)
        assert a.shape == (9, 4) and b.shape == (6, 9)
        assert max_diff(b @ a, delta) < TOL


def test_svd_clamp_bounds_the_factor_entries():
    delta = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    a, b = merging.truncated_svd(delta, rank=4, clamp=0.9)
    bound = max(a.abs().max(), b.abs().max())
    a_free, b_free = merging.truncated_svd(delta, rank=4)
    assert bound < max(a_free.abs().max(), b_free.abs().max())


# --- peft parity on models -------------------------------------------------------------------------
class ConvNet(nn.Module):
    """Conv2d, Linear and Embedding layers under fixed names (no transformers model has all three)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.lin = nn.Linear(6, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2).unsqueeze(-1)  # (batch, 8, length, 1)
        h = self.conv(h).squeeze(-1).transpose(1, 2)
        return self.lin(h)


def convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def _lora(targets: list[str], r: int, alpha: float, **extra) -> dict:
    return {"target_modules": targets, "r": r, "lora_alpha": alpha, "init_lora_weights": False, **extra}


MODELS = {
    # name: (factory, inputs, adapters of equal rank, adapters of different ranks)
    "llama": (
        tiny_llama,
        lambda: batch(),
        {"a": _lora(["q_proj", "v_proj", "embed_tokens"], 4, 8), "b": _lora(["q_proj", "k_proj"], 4, 4)},
        {"a": _lora(["q_proj", "v_proj"], 4, 8), "b": _lora(["v_proj", "o_proj"], 2, 3, rank_pattern={"o_proj": 3})},
    ),
    "gpt2": (
        tiny_gpt2,
        lambda: batch(),
        {"a": _lora(["c_attn"], 4, 8, fan_in_fan_out=True), "b": _lora(["c_attn", "c_fc"], 4, 2, fan_in_fan_out=True)},
        {"a": _lora(["c_attn"], 4, 8, fan_in_fan_out=True), "b": _lora(["c_attn"], 2, 2, fan_in_fan_out=True)},
    ),
    "convnet": (
        convnet,
        lambda: {"ids": torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))},
        {"a": _lora(["emb", "conv", "lin"], 3, 6), "b": _lora(["conv", "lin"], 3, 3)},
        {"a": _lora(["emb", "conv", "lin"], 3, 6), "b": _lora(["conv"], 2, 3)},
    ),
}


def _build(lib, factory, configs: dict[str, dict]):
    model = None
    for name, kwargs in configs.items():
        if model is None:
            model = lib.get_peft_model(factory(), lib.LoraConfig(**kwargs), adapter_name=name)
        else:
            model.add_adapter(name, lib.LoraConfig(**kwargs))
    return model.eval()


def ours_and_peft(factory, configs: dict[str, dict]):
    """The same adapters in both libraries (peft draws them, deltatune loads peft's tensors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        theirs = _build(peft, factory, configs)
        ours = _build(deltatune, factory, configs)
        for name in configs:
            tensors = peft.get_peft_model_state_dict(theirs, adapter_name=name)
            deltatune.set_peft_model_state_dict(ours, tensors, adapter_name=name)
    return ours, theirs


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _combine_both(ours, theirs, combination, weights=(0.7, -0.4), **kwargs):
    for model in (theirs, ours):
        torch.manual_seed(11)  # DARE's masks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(["a", "b"], list(weights), "new", combination_type=combination, **kwargs)
        model.set_adapter("new")


def _assert_same_adapter(ours, theirs, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.get_peft_model_state_dict(theirs, adapter_name="new")
    got = deltatune.get_peft_model_state_dict(ours, adapter_name="new")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].shape == tensor.shape, key
        assert max_diff(got[key], tensor) < TOL, key
    assert max_diff(_outputs(ours, inputs), _outputs(theirs, inputs)) < TOL


@pytest.mark.parametrize("combination", ALL_TYPES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_same_rank_combination_equals_peft(model_name, combination):
    factory, inputs, same_rank, _ = MODELS[model_name]
    ours, theirs = ours_and_peft(factory, same_rank)
    _combine_both(ours, theirs, combination, **_kwargs(combination))
    assert ours.peft_config["new"].r == theirs.peft_config["new"].r
    _assert_same_adapter(ours, theirs, inputs())


@pytest.mark.parametrize("combination", ["cat", *SVD_TYPES])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_different_rank_combination_equals_peft(model_name, combination):
    factory, inputs, _, mixed_rank = MODELS[model_name]
    ours, theirs = ours_and_peft(factory, mixed_rank)
    _combine_both(ours, theirs, combination, **_kwargs(combination))
    _assert_same_adapter(ours, theirs, inputs())


@pytest.mark.parametrize(("svd_rank", "svd_clamp", "full"), [(2, None, True), (6, 0.95, False), (3, 0.8, True)])
def test_svd_options_equal_peft(svd_rank, svd_clamp, full):
    factory, inputs, same_rank, _ = MODELS["llama"]
    ours, theirs = ours_and_peft(factory, same_rank)
    _combine_both(ours, theirs, "svd", svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=full)
    assert ours.peft_config["new"].r == svd_rank
    _assert_same_adapter(ours, theirs, inputs())


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("combination", ["ties", "dare_ties_svd"])
def test_majority_sign_methods_equal_peft(combination, method):
    factory, inputs, same_rank, _ = MODELS["gpt2"]
    ours, theirs = ours_and_peft(factory, same_rank)
    _combine_both(ours, theirs, combination, density=0.7, majority_sign_method=method)
    _assert_same_adapter(ours, theirs, inputs())


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_exact_types_give_the_weighted_sum_of_deltas(combination):
    """cat and full-rank svd reproduce sum_i w_i * delta_i in every layer; the new adapter's scaling is 1."""
    ours, _ = ours_and_peft(*[MODELS["llama"][0]], MODELS["llama"][3])
    ours.add_weighted_adapter(["a", "b"], [1.5, -0.5], "new", combination_type=combination, svd_rank=6)
    assert ours.peft_config["new"].lora_alpha == ours.peft_config["new"].r
    v_proj = ours.base_model.model.model.layers[0].self_attn.v_proj
    expected = 1.5 * v_proj.delta_weight("a") - 0.5 * v_proj.delta_weight("b")
    assert v_proj.scaling["new"] == 1
    assert max_diff(v_proj.delta_weight("new"), expected) < TOL


def test_rslora_adapters_combine_to_scaling_one():
    """peft keeps use_rslora on the new adapter and so scales it by sqrt(r); deltatune turns it off."""
    configs = {name: _lora(["q_proj"], 4, 8, use_rslora=True) for name in ("a", "b")}
    ours, _ = ours_and_peft(tiny_llama, configs)
    ours.add_weighted_adapter(["a", "b"], [0.5, 0.5], "new", combination_type="svd", svd_rank=32)
    assert ours.peft_config["new"].use_rslora is False
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    expected = 0.5 * q_proj.delta_weight("a") + 0.5 * q_proj.delta_weight("b")
    assert max_diff(q_proj.delta_weight("new"), expected) < TOL


def test_new_adapter_config_targets_the_union_and_is_inactive():
    ours, _ = ours_and_peft(tiny_llama, MODELS["llama"][2])
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    config = ours.peft_config["new"]
    assert config.target_modules == ["embed_tokens", "k_proj", "q_proj", "v_proj"]
    assert (config.r, config.lora_alpha, config.rank_pattern) == (8, 8, {})
    assert ours.active_adapter == "a"
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".new" in n)


@pytest.mark.parametrize("limits", [
    {"a": {"layers_to_transform": [0]}, "b": {"layers_to_transform": [1]}},
    {"a": {"layers_to_transform": 0}, "b": {}},
    {"a": {"layers_to_transform": []}, "b": {"layers_to_transform": [1]}},  # [] adapts every layer, as None
    {"a": {"exclude_modules": ["model.layers.1.self_attn.q_proj"]}, "b": {}},
])
def test_combination_covers_every_adapters_layers(limits):
    """peft keeps the first adapter's layers_to_transform / exclude_modules and so drops the others' deltas
    outside them; here the combination covers every layer an adapter adapts."""
    configs = {name: _lora(["q_proj"], 4, 8, **limits[name]) for name in ("a", "b")}
    ours, _ = ours_and_peft(tiny_llama, configs)
    ours.add_weighted_adapter(["a", "b"], [1.5, -0.5], "new", combination_type="cat")
    for layer in ours.base_model.model.model.layers:
        q_proj = layer.self_attn.q_proj
        expected = sum(w * q_proj.delta_weight(name) for name, w in (("a", 1.5), ("b", -0.5))
                       if name in q_proj.adapter_names)
        assert max_diff(q_proj.delta_weight("new"), expected) < TOL


def test_grouped_convolutions_are_refused_and_nothing_is_added():
    def grouped():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))
    ours = deltatune.get_peft_model(grouped(), deltatune.LoraConfig(r=4, target_modules=["0"]), adapter_name="a")
    ours.add_adapter("b", deltatune.LoraConfig(r=4, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"grouped convolutions \(\['0'\]\).*merge_adapter"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="linear")
    assert sorted(ours.peft_config) == ["a", "b"]


def test_single_adapter_is_combined_linearly():
    ours, _ = ours_and_peft(tiny_llama, MODELS["llama"][2])
    ours.add_weighted_adapter(["a"], [2.0], "twice", combination_type="svd")
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert ours.peft_config["twice"].r == 4
    assert max_diff(q_proj.delta_weight("twice"), 2 * q_proj.delta_weight("a")) < TOL


def test_saved_combination_loads_in_peft(tmp_path):
    factory, inputs, _, mixed_rank = MODELS["llama"]
    ours, _ = ours_and_peft(factory, mixed_rank)
    ours.add_weighted_adapter(["a", "b"], [0.6, 0.9], "new", combination_type="cat")
    ours.set_adapter("new")
    ours.save_pretrained(tmp_path, selected_adapters=["new"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(factory(), tmp_path / "new").eval()
    assert max_diff(_outputs(loaded, inputs()), _outputs(ours, inputs())) < TOL


def test_modules_to_save_of_one_adapter_is_copied_into_the_combination():
    configs = {"a": _lora(["q_proj"], 4, 8), "b": _lora(["q_proj"], 4, 8, modules_to_save=["lm_head"])}
    ours, _ = ours_and_peft(tiny_llama, configs)
    head = ours.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["b"].weight.add_(1.0)  # "trained"
    ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="linear")
    assert "lm_head" in ours.peft_config["new"].modules_to_save
    assert torch.equal(head.modules_to_save["new"].weight, head.modules_to_save["b"].weight)
    assert not torch.equal(head.modules_to_save["new"].weight, head.original_module.weight)


def test_adapters_that_both_train_a_module_cannot_be_combined():
    configs = {name: _lora(["q_proj"], 4, 8, modules_to_save=["lm_head"]) for name in ("a", "b")}
    ours, _ = ours_and_peft(tiny_llama, configs)
    with pytest.raises(ValueError, match=r"Several of the adapters have their own copy of \['lm_head'\]"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new")
    assert "new" not in ours.peft_config


@pytest.fixture
def two_adapters():
    return ours_and_peft(tiny_llama, MODELS["llama"][3])[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, r"one weight per adapter; got 2 adapter\(s\) and 1 weight\(s\)"),
        ({"adapters": ["a", "zzz"], "weights": [1.0, 1.0]}, r"No adapter named 'zzz'. Loaded adapters: \['a', 'b'\]"),
        ({"combination_type": "mean"}, r"Unknown combination_type 'mean'; choose one of \['svd', 'linear'"),
        ({"combination_type": "linear"}, r"'linear' needs adapters of the same rank; these have ranks \[4, 3\]"),
        ({"combination_type": "dare_ties"}, "'dare_ties' prunes each adapter: pass density"),
        ({"combination_type": "ties", "density": 1.5}, r"above 0 and at most 1 \(got 1.5\)"),
        ({"combination_type": "dare_linear", "density": 0.0}, r"above 0 and at most 1 \(got 0.0\)"),
        ({"svd_clamp": 2.0}, r"svd_clamp is a quantile .* got 2.0"),
        ({"majority_sign_method": "max"}, "majority_sign_method must be one of"),
        ({"adapter_name": "a"}, "An adapter named 'a' already exists"),
    ],
)
def test_bad_arguments_are_refused_clearly(two_adapters, kwargs, message):
    arguments = {"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "new", **kwargs}
    with pytest.raises(ValueError, match=message):
        two_adapters.add_weighted_adapter(**arguments)
    assert sorted(two_adapters.peft_config) == ["a", "b"]


def test_adapters_of_other_methods_are_refused(two_adapters):
    two_adapters.add_adapter("ia3", deltatune.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="combines LoRA adapters, but 'ia3' is a IA3 adapter"):
        two_adapters.add_weighted_adapter(["a", "ia3"], [1.0, 1.0], "new")


def test_regex_and_list_targets_cannot_be_mixed():
    configs = {"a": _lora(["q_proj"], 4, 8), "b": _lora(r".*\.k_proj", 4, 8)}
    ours, _ = ours_and_peft(tiny_llama, configs)
    with pytest.raises(ValueError, match="mix a regex string and a list"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new")


def test_combining_a_pissa_adapter_leaves_the_base_weights_alone():
    """peft re-runs the first adapter's PiSSA init for the new adapter and so changes the base a second time."""
    model = deltatune.get_peft_model(
        tiny_llama(), deltatune.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="pissa"), "a"
    )
    model.add_adapter("b", deltatune.LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights=False))
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert model.peft_config["new"].init_lora_weights is True
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert max_diff(q_proj.delta_weight("new"), q_proj.delta_weight("a") + q_proj.delta_weight("b")) < TOL
