"""LoRA files and numbers agree with peft: adapters move between the libraries with identical logits.

peft is the reference here only; the package itself never imports it.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, logits, lora_kwargs, max_diff, perturb_trainable, tiny_llama
from safetensors.torch import load_file

import deltatune

TOL = 1e-5
# peft announces that it saves the embeddings' base weights (the "embeddings" variant); that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")


def variant_kwargs(arch: str, variant: str) -> dict:
    """Config variants that change which modules are adapted and how they are scaled."""
    a, b = ARCHS[arch][2]
    if variant == "plain":
        return lora_kwargs(arch)
    if variant == "regex":
        return lora_kwargs(arch, target_modules=rf".*\.({a}|{b})")
    if variant == "patterns":
        return lora_kwargs(arch, rank_pattern={b: 2}, alpha_pattern={a: 32})
    if variant == "rslora":
        return lora_kwargs(arch, use_rslora=True, lora_alpha=16)
    if variant == "dora":
        return lora_kwargs(arch, use_dora=True)
    if variant == "embeddings":  # peft then also saves the embeddings' base weights
        return lora_kwargs(arch, target_modules=["embed_tokens", "lm_head", a])
    raise AssertionError(variant)


VARIANTS = ["plain", "regex", "patterns", "rslora", "dora"]
CASES = [pytest.param(arch, variant, id=f"{arch}-{variant}") for arch in ARCHS for variant in VARIANTS]
CASES.append(pytest.param("llama", "embeddings", id="llama-embeddings"))


def build(lib, arch: str, kwargs: dict, seed: int = 0):
    """(PeftModel, base model) from `lib` (peft or deltatune), every trainable tensor moved off its init."""
    model = lib.get_peft_model(ARCHS[arch][0](), lib.LoraConfig(**kwargs))
    perturb_trainable(model, seed)
    return model.eval()


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_peft_saved_adapter_loads_in_deltatune(tmp_path, arch, variant):
    theirs = build(peft, arch, variant_kwargs(arch, variant))
    theirs.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path).eval()
    inputs = inputs_for(arch)
    assert max_diff(logits(ours, inputs), logits(theirs, inputs)) < TOL
    # ... and the adapter really is on: it moves the logits away from the base model's.
    assert max_diff(logits(ours, inputs), logits(ARCHS[arch][0](), inputs)) > 1e-3


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_deltatune_saved_adapter_loads_in_peft(tmp_path, arch, variant):
    ours = build(deltatune, arch, variant_kwargs(arch, variant))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch][0](), tmp_path).eval()
    inputs = inputs_for(arch)
    assert max_diff(logits(theirs, inputs), logits(ours, inputs)) < TOL
    assert max_diff(logits(theirs, inputs), logits(ARCHS[arch][0](), inputs)) > 1e-3


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_saved_files_have_peft_keys(tmp_path, arch, variant):
    kwargs = variant_kwargs(arch, variant)
    build(peft, arch, kwargs).save_pretrained(tmp_path / "peft")
    build(deltatune, arch, kwargs).save_pretrained(tmp_path / "ours")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_config) == set(peft_config)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "task_type", "peft_type",
                "modules_to_save", "fan_in_fan_out", "bias", "use_dora"):
        assert ours_config[key] == peft_config[key], key
    targets = peft_config["target_modules"]
    assert ours_config["target_modules"] == (targets if isinstance(targets, str) else sorted(targets))
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours_tensors) == sorted(peft_tensors)
    for key, tensor in peft_tensors.items():
        assert ours_tensors[key].shape == tensor.shape, key
        assert ours_tensors[key].dtype == tensor.dtype, key


@pytest.mark.parametrize("arch", list(ARCHS))
def test_equal_weights_give_equal_outputs_and_gradients(arch):
    """Copy peft's weights into ours by state dict, then compare the forward and every adapter gradient."""
    kwargs = variant_kwargs(arch, "patterns")
    theirs = build(peft, arch, kwargs)
    ours = build(deltatune, arch, kwargs, seed=1)
    deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    inputs = inputs_for(arch)
    grads = []
    for model in (theirs, ours):  # eval mode: no dropout, gradients still flow
        model.zero_grad()
        out = model(**inputs).logits
        out.float().pow(2).mean().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (peft_out, peft_grads), (our_out, our_grads) = grads
    assert max_diff(our_out, peft_out) < TOL
    assert sorted(our_grads) == sorted(peft_grads)
    lora_keys = [k for k in peft_grads if ".lora_A." in k or ".lora_B." in k]
    assert lora_keys and len(lora_keys) % 2 == 0
    for key, grad in peft_grads.items():
        assert grad is not None and our_grads[key] is not None, key
        assert max_diff(our_grads[key], grad) < TOL, key


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_linear_wraps_the_same_modules_as_peft(arch):
    kwargs = lora_kwargs(arch, target_modules="all-linear")
    theirs = peft.get_peft_model(ARCHS[arch][0](), peft.LoraConfig(**kwargs))
    ours = deltatune.get_peft_model(ARCHS[arch][0](), deltatune.LoraConfig(**kwargs))

    def adapted(model):
        return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))

    assert adapted(ours) == adapted(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trainable_parameters_match_peft(arch):
    kwargs = variant_kwargs(arch, "patterns")
    theirs = peft.get_peft_model(ARCHS[arch][0](), peft.LoraConfig(**kwargs))
    ours = deltatune.get_peft_model(ARCHS[arch][0](), deltatune.LoraConfig(**kwargs))
    trainable = [sorted(n for n, p in m.named_parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1]
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(
    "overrides",
    [{"layers_to_transform": [1]}, {"exclude_modules": ["q_proj"], "target_modules": "all-linear"}],
    ids=["layers_to_transform", "exclude_modules"],
)
def test_module_selection_matches_peft(overrides):
    kwargs = lora_kwargs("llama", **overrides)
    theirs = peft.get_peft_model(ARCHS["llama"][0](), peft.LoraConfig(**kwargs))
    ours = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**kwargs))
    keys = [sorted(deltatune.get_peft_model_state_dict(ours)), sorted(peft.get_peft_model_state_dict(theirs))]
    assert keys[0] == keys[1]


def test_multiple_adapters_saved_by_deltatune_load_in_peft(tmp_path):
    ours = build(deltatune, "llama", lora_kwargs("llama"))
    ours.add_adapter("other", deltatune.LoraConfig(**lora_kwargs("llama", r=2)))
    ours.set_adapter("other")
    perturb_trainable(ours, seed=5)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS["llama"][0](), tmp_path)
    theirs.load_adapter(tmp_path / "other", "other")
    inputs = inputs_for("llama")
    for name in ("default", "other"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        assert max_diff(logits(ours, inputs), logits(theirs, inputs)) < TOL


def _resized_llama(seed: int):
    """A tiny Llama whose vocabulary grew by 8 tokens; the new rows depend on `seed`, as after any resize."""
    model = tiny_llama(tie=True)
    torch.manual_seed(seed)
    model.resize_token_embeddings(136)
    return model


@pytest.mark.parametrize("save", [True, "auto-targeted", False])
def test_embedding_layers_are_saved_and_loaded_as_peft_does(tmp_path, save):
    targets = ["q_proj", "embed_tokens"] if save == "auto-targeted" else ["q_proj", "v_proj"]
    flag = "auto" if save == "auto-targeted" else save
    ids = torch.randint(128, 136, (2, 5), generator=torch.Generator().manual_seed(0))  # the new tokens
    files = {}
    for lib in (peft, deltatune):
        model = lib.get_peft_model(_resized_llama(seed=1), lib.LoraConfig(target_modules=targets))
        perturb_trainable(model)
        model.save_pretrained(tmp_path / lib.__name__, save_embedding_layers=flag)
        files[lib.__name__] = load_file(tmp_path / lib.__name__ / "adapter_model.safetensors")
        expected = model.eval()(input_ids=ids).logits
    assert {k: v.shape for k, v in files["deltatune"].items()} == {k: v.shape for k, v in files["peft"].items()}
    assert any("embed" in k and "lora" not in k for k in files["peft"]) == (save is not False)
    if save is False:
        return
    for writer in ("peft", "deltatune"):  # either file, read by either library onto a base with other new rows
        for reader in (peft, deltatune):
            loaded = reader.PeftModel.from_pretrained(_resized_llama(seed=2), tmp_path / writer).eval()
            assert max_diff(loaded(input_ids=ids).logits, expected) < 1e-5, (writer, reader.__name__)


def test_auto_saves_the_embeddings_when_the_vocabulary_was_resized(tmp_path):
    tiny_llama(tie=True).save_pretrained(tmp_path / "base")
    model = deltatune.get_peft_model(_resized_llama(seed=1), deltatune.LoraConfig(target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(keys)
    with pytest.raises(ValueError, match="save_embedding_layers must be True, False or 'auto'"):
        model.save_pretrained(tmp_path / "bad", save_embedding_layers="yes")


@pytest.mark.parametrize("method", ["LoraConfig", "IA3Config"])
def test_saved_config_states_gpt2s_weight_layout_as_peft_does(tmp_path, method):
    """Left at its default (False), fan_in_fan_out is saved as what GPT-2's Conv1D layers need (True)."""
    saved = {}
    for lib in (peft, deltatune):
        config = getattr(lib, method)(task_type="CAUSAL_LM", target_modules=["c_attn"])
        with pytest.warns(UserWarning, match="fan_in_fan_out"):
            model = lib.get_peft_model(ARCHS["gpt2"][0](), config)
        model.save_pretrained(tmp_path / lib.__name__)
        saved[lib.__name__] = json.loads((tmp_path / lib.__name__ / "adapter_config.json").read_text())
    assert saved["deltatune"]["fan_in_fan_out"] is saved["peft"]["fan_in_fan_out"] is True
