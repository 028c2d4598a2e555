"""PiSSA and OLoRA initialisation, conversion to a plain LoRA adapter, and file interop with peft."""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
from conftest import batch, logits, max_diff, perturb_trainable, tiny_gpt2, tiny_llama
from torch import nn

import deltatune
from deltatune.methods.lora import init as lora_init

TOL = 1e-5
INITS = ["pissa", "pissa_niter_2", "olora"]
MODELS = {
    # name: (factory, LoraConfig kwargs)
    "llama": (tiny_llama, {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
}


def config_kwargs(model: str, init, **overrides) -> dict:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": init, **MODELS[model][1], **overrides}


def make(lib, model: str, init, seed: int = 3, **overrides):
    torch.manual_seed(seed)  # pissa_niter draws its random projection here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.get_peft_model(MODELS[model][0](), lib.LoraConfig(**config_kwargs(model, init, **overrides))).eval()


def base_logits(model: str) -> torch.Tensor:
    return logits(MODELS[model][0](), batch())


# --- the math ------------------------------------------------------------------------------------
@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(12, 7, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scaling", [0.5, 2.0])
def test_pissa_factors_hold_the_top_singular_part(weight, scaling):
    a, b, residual = lora_init.pissa_factors(weight, 3, scaling)
    assert a.shape == (3, 7) and b.shape == (12, 3)
    assert max_diff(residual + scaling * b @ a, weight) < TOL
    top = torch.linalg.svdvals(weight)[:3]
    assert max_diff(torch.linalg.svdvals(scaling * b @ a)[:3], top) < TOL
    assert max_diff(torch.linalg.svdvals(residual)[:4], torch.linalg.svdvals(weight)[3:7]) < TOL
    # A and B share the singular values evenly: A A^T == B^T B (== diag(S) / scaling, entries up to 12.8). The SVD's
    # rounding grows with them (1.2e-5 apart with ATen's portable kernels); an uneven split is off by more than 9.
    torch.testing.assert_close(a @ a.T, b.T @ b, rtol=0, atol=1e-4)


def test_fast_pissa_approximates_the_full_svd(weight):
    torch.manual_seed(0)
    a, b, residual = lora_init.pissa_factors(weight, 3, 1.0, niter=8)
    assert max_diff(residual + b @ a, weight) < TOL
    assert max_diff(torch.linalg.svdvals(b @ a)[:3], torch.linalg.svdvals(weight)[:3]) < 0.01


def test_olora_factors_are_orthonormal_b_and_triangular_a(weight):
    a, b, residual = lora_init.olora_factors(weight, 3, 2.0)
    assert max_diff(b.T @ b, torch.eye(3)) < TOL
    assert torch.equal(a.tril(-1), torch.zeros_like(a).tril(-1))
    assert max_diff(residual + 2.0 * b @ a, weight) < TOL


@pytest.mark.parametrize(
    ("init", "parsed"),
    [("pissa", ("pissa", None)), ("pissa_niter_16", ("pissa", 16)), ("olora", ("olora", None)), (True, None),
     ("gaussian", None), ("pissa_niter_", None)],
)
def test_parse_init(init, parsed):
    assert lora_init.parse_init(init) == parsed


@pytest.mark.parametrize("init", ["pissa_niter_", "pissa_niter_x", "PISSA", "corda"])
def test_config_refuses_unknown_inits(init):
    with pytest.raises(ValueError, match="init_lora_weights must be one of"):
        deltatune.LoraConfig(init_lora_weights=init)


# --- on models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("model", list(MODELS))
def test_initialised_model_computes_the_base_function(model, init):
    ours = make(deltatune, model, init)
    assert max_diff(logits(ours, batch()), base_logits(model)) < TOL
    layer = next(m for m in ours.modules() if isinstance(m, deltatune.methods.lora.LoraLinear))
    assert layer.lora_B["default"].weight.abs().sum() > 0  # the adapter is not zero: the base was changed
    with ours.disable_adapter():
        assert max_diff(logits(ours, batch()), base_logits(model)) > 1e-4  # the residual alone differs


@pytest.mark.parametrize(("model", "init"), [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa")])
def test_factors_and_residual_equal_peft(model, init):
    """Embeddings get the standard init, as in peft. (pissa_niter is left out: deltatune seeds its random
    projection so that a reload recreates the residual, peft draws from the global generator. peft's OLoRA does
    not transpose GPT-2's Conv1D weight and builds factors that do not fit the layer.)"""
    ours, theirs = make(deltatune, model, init), make(peft, model, init)
    expected = theirs.state_dict()
    got = ours.state_dict()
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert max_diff(got[key], tensor) < TOL, key


def test_olora_on_gpt2_conv1d_uses_the_out_in_layout():
    ours = make(deltatune, "gpt2", "olora")
    c_attn = ours.base_model.model.transformer.h[0].attn.c_attn
    b = c_attn.lora_B["default"].weight
    assert b.shape == (96, 4) and max_diff(b.T @ b, torch.eye(4)) < TOL


def test_half_precision_base_keeps_its_dtype():
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    expected = logits(model, batch())
    config = deltatune.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights="pissa")
    ours = deltatune.get_peft_model(model, config)
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16 and q_proj.lora_A["default"].weight.dtype == torch.float32
    assert max_diff(logits(ours, batch()), expected) < 0.1  # bf16 rounding of the residual


class ConvHolder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("init", INITS)
def test_conv_layers_are_refused_clearly(init):
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' starts from the weight of a linear layer"):
        deltatune.get_peft_model(ConvHolder(), deltatune.LoraConfig(target_modules=["conv"], init_lora_weights=init))


def test_non_float_base_is_refused():
    torch.manual_seed(0)
    model = ConvHolder()
    model.lin = nn.Linear(4, 4).double()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 base weight, got torch.float64"):
        deltatune.get_peft_model(model, deltatune.LoraConfig(target_modules=["lin"], init_lora_weights="pissa"))


# --- files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("saver", "loader"), [(deltatune, peft), (peft, deltatune)], ids=["to-peft", "from-peft"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_loads_onto_the_original_base_in_the_other_library(tmp_path, init, saver, loader):
    """The file keeps init_lora_weights; loading re-runs the deterministic init on the original base (as peft)."""
    trained = make(saver, "llama", init)
    perturb_trainable(trained)
    expected = logits(trained, batch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = loader.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert max_diff(logits(loaded, batch()), expected) < TOL


def test_a_trained_fast_pissa_adapter_reloads_to_the_trained_model(tmp_path):
    """The randomised SVD is seeded: loading recreates the very residual the adapter was trained against."""
    trained = make(deltatune, "llama", "pissa_niter_2")
    perturb_trainable(trained)
    trained.save_pretrained(tmp_path)
    base = tiny_llama()
    torch.manual_seed(123)  # another global random state than when the adapter was initialised
    loaded = deltatune.PeftModel.from_pretrained(base, tmp_path).eval()
    assert max_diff(logits(loaded, batch()), logits(trained, batch())) < TOL


def test_pissa_on_a_weight_the_model_ties_elsewhere_is_refused():
    model = tiny_llama(tie=True)
    with pytest.raises(ValueError, match="rewrites the base weight of lm_head.*shares with.*embed_tokens"):
        deltatune.get_peft_model(model, deltatune.LoraConfig(target_modules=["q_proj", "lm_head"],
                                                             init_lora_weights="pissa"))


def _trained_with_initial_folder(lib, tmp_path, init, **overrides):
    model = make(lib, "llama", init, **overrides)
    model.peft_config["default"].init_lora_weights = True  # peft's recipe for the initial folder
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    perturb_trainable(model)
    return model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}},
     {"modules_to_save": ["lm_head"]}],
    ids=["plain", "rslora", "patterns", "modules_to_save"],
)
@pytest.mark.parametrize("init", INITS)
def test_converted_adapter_on_the_original_base_equals_the_trained_model(tmp_path, init, overrides):
    trained = _trained_with_initial_folder(deltatune, tmp_path, init, **overrides)
    expected = logits(trained, batch())
    trained.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"]) == (True, 8)
    alpha = 8 * math.sqrt(2) if overrides.get("use_rslora") else 16
    assert config["lora_alpha"] == pytest.approx(alpha)
    if "rank_pattern" in overrides:
        assert (config["rank_pattern"], config["alpha_pattern"]) == ({"v_proj": 4}, {"q_proj": 6})
    for lib in (deltatune, peft):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
        assert max_diff(logits(loaded, batch()), expected) < TOL, lib.__name__
    # The live adapter is unchanged and the initial folder only read.
    assert trained.peft_config["default"].r == 4
    assert json.loads((tmp_path / "init" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_factors_equal_peft(tmp_path, init):
    """peft's converted file holds the A and B factors only; deltatune's has the same ones (and keeps the rest)."""
    overrides = {"target_modules": ["q_proj", "v_proj"]}
    ours = _trained_with_initial_folder(deltatune, tmp_path / "ours", init, **overrides)
    theirs = _trained_with_initial_folder(peft, tmp_path / "peft", init, **overrides)
    ours.save_pretrained(tmp_path / "ours" / "lora",
                         path_initial_model_for_weight_conversion=tmp_path / "ours" / "init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "peft" / "lora",
                               path_initial_model_for_weight_conversion=str(tmp_path / "peft" / "init"))
    from safetensors.torch import load_file

    got = load_file(tmp_path / "ours" / "lora" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "peft" / "lora" / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert max_diff(got[key], tensor) < TOL, key
    configs = [json.loads((tmp_path / lib / "lora" / "adapter_config.json").read_text()) for lib in ("ours", "peft")]
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert configs[0][key] == configs[1][key], key


def test_conversion_refuses_rslora_with_patterns(tmp_path):
    trained = _trained_with_initial_folder(deltatune, tmp_path, "pissa", use_rslora=True, rank_pattern={"v_proj": 2})
    with pytest.raises(ValueError, match="use_rslora=True together with rank_pattern or alpha_pattern"):
        trained.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "lora").exists()


def test_conversion_refuses_an_initial_folder_of_another_adapter(tmp_path):
    other = make(deltatune, "llama", "pissa", r=2)
    other.save_pretrained(tmp_path / "init")
    trained = make(deltatune, "llama", "pissa")
    with pytest.raises(ValueError, match="do not come from the same adapter"):
        trained.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    missing = make(deltatune, "llama", "pissa", r=2, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="The initial adapter has no tensor .*k_proj"):
        missing.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
