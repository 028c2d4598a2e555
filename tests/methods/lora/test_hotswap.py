"""hotswap_adapter and prepare_model_for_compiled_hotswap: same outputs as a fresh load, no recompilation."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

import deltatune
from deltatune import AdapterLoadError, hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.methods.lora.layers import LoraLayer


def save_adapter(path, seed: int, targets=("q_proj", "v_proj"), lib=deltatune, **kwargs) -> str:
    config = lib.LoraConfig(task_type="CAUSAL_LM", target_modules=list(targets), **kwargs)
    model = lib.get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def adapters(tmp_path):
    return {
        "small": save_adapter(tmp_path / "small", seed=1, r=4, lora_alpha=8),
        "large": save_adapter(tmp_path / "large", seed=2, r=8, lora_alpha=4),
        "subset": save_adapter(tmp_path / "subset", seed=3, targets=("q_proj",), r=4, lora_alpha=16),
        "other": save_adapter(tmp_path / "other", seed=4, targets=("k_proj",), r=4),
    }


def load(path: str) -> deltatune.PeftModel:
    return deltatune.PeftModel.from_pretrained(tiny_llama(), path).eval()


IDS = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_swap_equals_a_fresh_load(adapters):
    model = load(adapters["small"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a_before = layer.lora_A["default"]
    hotswap_adapter(model, adapters["subset"])
    assert layer.lora_A["default"] is a_before  # weights replaced in place, modules kept
    torch.testing.assert_close(logits(model), logits(load(adapters["subset"])))
    hotswap_adapter(model, adapters["small"])
    torch.testing.assert_close(logits(model), logits(load(adapters["small"])))


def test_padded_model_swaps_to_larger_rank_and_other_alpha(adapters):
    model = load(adapters["small"])
    before = logits(model)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[0] == 8 and torch.is_tensor(layer.scaling["default"])
    torch.testing.assert_close(logits(model), before)  # zero padding changes nothing
    hotswap_adapter(model, adapters["large"])
    torch.testing.assert_close(logits(model), logits(load(adapters["large"])))


def test_compiled_model_does_not_recompile_after_swaps(adapters):
    import torch._dynamo

    torch._dynamo.reset()
    model = load(adapters["small"])
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(logits(compiled), logits(load(adapters["small"])))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ("large", "subset", "small"):
            hotswap_adapter(model, adapters[name])
            torch.testing.assert_close(logits(compiled), logits(load(adapters[name])))
    torch._dynamo.reset()


def test_larger_rank_than_prepared_is_refused_and_nothing_changes(adapters):
    model = load(adapters["small"])
    before = logits(model)
    with pytest.raises(AdapterLoadError, match="rank 8.*larger than the loaded rank 4.*target_rank=8"):
        hotswap_adapter(model, adapters["large"])
    torch.testing.assert_close(logits(model), before)


def test_a_merged_adapter_is_refused_and_unmerges_to_the_base(adapters):
    model = load(adapters["small"])
    with model.disable_adapter():
        base = logits(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match="'default' is merged.*unmerge_adapter"):
        hotswap_adapter(model, adapters["subset"])
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base)


def test_peft_files_with_embedding_base_weights_swap_in(tmp_path):
    """peft writes embed_tokens.base_layer.weight beside a LoRA on embed_tokens; the swap puts it in place."""
    for seed in (1, 2):
        save_adapter(tmp_path / str(seed), seed, ("q_proj", "embed_tokens"), lib=peft, r=4, lora_alpha=4 * seed)
    assert any("base_layer" in key for key in load_file(tmp_path / "2" / "adapter_model.safetensors"))
    model = load(str(tmp_path / "1"))
    hotswap_adapter(model, str(tmp_path / "2"))
    torch.testing.assert_close(logits(model), logits(load(str(tmp_path / "2"))))


def test_modules_not_in_the_loaded_adapter_are_refused(adapters):
    model = load(adapters["small"])
    with pytest.raises(AdapterLoadError, match="k_proj.*cannot add LoRA layers"):
        hotswap_adapter(model, adapters["other"])
    with pytest.raises(ValueError, match="No adapter named 'x'"):
        hotswap_adapter(model, adapters["small"], adapter_name="x")


def test_target_rank_below_loaded_rank_is_refused(adapters):
    model = load(adapters["large"])
    with pytest.raises(ValueError, match="target_rank=4 is smaller"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)


def test_dora_is_refused_before_any_layer_is_padded(adapters):
    model = load(adapters["small"])
    model.add_adapter("d", deltatune.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    before = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"\['d'\] use DoRA"):
        prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert {n: p.shape for n, p in model.named_parameters()} == before
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert not any(torch.is_tensor(s) for layer in lora_layers for s in layer.scaling.values())


# --- saving a padded or hot-swapped adapter -------------------------------------------------------
def saved_files(path) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    return load_file(Path(path) / "adapter_model.safetensors"), config


def assert_same_files(saved, original) -> None:
    (tensors, config), (want_tensors, want_config) = saved_files(saved), saved_files(original)
    assert sorted(tensors) == sorted(want_tensors)
    for key, tensor in want_tensors.items():
        torch.testing.assert_close(tensors[key], tensor, rtol=0, atol=1e-6)
    assert config == want_config


def assert_reloads_to(path, live_logits: torch.Tensor) -> None:
    for reloaded in (load(path), peft.PeftModel.from_pretrained(tiny_llama(), path).eval()):
        assert (logits(reloaded) - live_logits).abs().max() < 1e-5


def test_save_after_padding_writes_the_adapter_unpadded(adapters, tmp_path):
    model = load(adapters["small"])
    prepare_model_for_compiled_hotswap(model, target_rank=12)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a = layer.lora_A["default"].weight
    before = logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert_same_files(tmp_path / "saved", adapters["small"])  # rank 4, alpha 8: as first saved
    assert_reloads_to(tmp_path / "saved", before)
    # Saving leaves the live model padded and computing the same.
    assert layer.lora_A["default"].weight is a and a.shape[0] == 12
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("swapped_in", ["small", "subset"])
def test_save_after_hotswap_writes_the_swapped_in_adapter(adapters, tmp_path, swapped_in):
    model = load(adapters["large"])  # rank 8, alpha 4; "small" is rank 4, alpha 8, "subset" adapts q_proj only
    prepare_model_for_compiled_hotswap(model)
    hotswap_adapter(model, adapters[swapped_in])
    before = logits(model)
    model.save_pretrained(tmp_path / "saved")
    assert_same_files(tmp_path / "saved", adapters[swapped_in])
    assert_reloads_to(tmp_path / "saved", before)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    # The slot still takes the larger rank after the save, and saves it whole again.
    hotswap_adapter(model, adapters["large"])
    torch.testing.assert_close(logits(model), logits(load(adapters["large"])))
    model.save_pretrained(tmp_path / "again")
    assert_same_files(tmp_path / "again", adapters["large"])


@pytest.mark.parametrize(("combination", "first", "second"), [
    ("cat", "large", "small"), ("svd", "large", "small"), ("linear", "small", "subset")])
def test_weighted_merge_of_padded_adapters_equals_the_unpadded_merge(adapters, combination, first, second):
    def merged(pad: bool) -> torch.Tensor:
        model = load(adapters[first])
        model.load_adapter(adapters[second], adapter_name="second")
        if pad:
            prepare_model_for_compiled_hotswap(model, target_rank=12)
        model.add_weighted_adapter(["default", "second"], [0.6, 0.4], "mix", combination_type=combination)
        model.set_adapter("mix")
        return logits(model)

    torch.testing.assert_close(merged(pad=True), merged(pad=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "magnitude_prune", "cat", "svd"])
def test_weighted_merge_after_swapping_in_a_subset_adapter_matches_peft(adapters, combination):
    """The swapped-in adapter leaves v_proj out (rank 0 there); peft keeps zero factors at the loaded rank."""
    density = None if combination in ("linear", "cat", "svd") else 0.5

    def merged(lib, swap) -> torch.Tensor:
        model = lib.PeftModel.from_pretrained(tiny_llama(), adapters["small"]).eval()
        model.load_adapter(adapters["small"], adapter_name="second")
        swap(model, adapters["subset"], adapter_name="default")
        torch.manual_seed(0)  # dare's random pruning draws alike in both libraries
        model.add_weighted_adapter(["default", "second"], [0.6, 0.4], "mix", combination_type=combination,
                                   density=density)
        model.set_adapter("mix")
        return logits(model)

    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    torch.testing.assert_close(merged(deltatune, hotswap_adapter), merged(peft, peft_hotswap), atol=1e-5, rtol=1e-5)


def test_peft_keywords_are_accepted(adapters, tmp_path):
    model = load(adapters["small"])
    prepare_model_for_compiled_hotswap(model, target_rank=8, config=model.peft_config, check_compiled="error")
    assert model.peft_config["default"].r == 4  # the adapter keeps its own rank; the padding is internal
    hotswap_adapter(model, adapters["large"], adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(logits(model), logits(load(adapters["large"])))
    nested = tmp_path / "nested"
    save_adapter(nested / "inner", seed=5, r=4)
    hotswap_adapter(model, nested, "default", subfolder="inner")
    torch.testing.assert_close(logits(model), logits(load(str(nested / "inner"))))
    with pytest.raises(ValueError, match="check_compiled must be"):
        prepare_model_for_compiled_hotswap(model, check_compiled="maybe")


def test_prepare_on_a_compiled_model_follows_check_compiled(adapters):
    compiled = torch.compile(load(adapters["small"]))
    with pytest.raises(ValueError, match="before torch.compile.*check_compiled='warn'"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)
    with pytest.warns(UserWarning, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="warn")
    prepare_model_for_compiled_hotswap(compiled, target_rank=8, check_compiled="ignore")


def test_swap_takes_the_new_adapters_dropout(adapters, tmp_path):
    model = load(adapters["small"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    dropped = save_adapter(tmp_path / "dropped", seed=6, r=4, lora_dropout=0.3)
    hotswap_adapter(model, dropped)
    assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout) and layer.lora_dropout["default"].p == 0.3
    assert not layer.lora_dropout["default"].training  # the model is in eval mode: no dropout at inference
    assert torch.equal(logits(model), logits(model)) and torch.allclose(logits(model), logits(load(dropped)))
    hotswap_adapter(model, save_adapter(tmp_path / "dropped2", seed=7, r=4, lora_dropout=0.1))
    assert layer.lora_dropout["default"].p == 0.1
    hotswap_adapter(model, adapters["small"])
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
