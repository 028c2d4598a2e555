"""Merging adapters into quantized base layers: dequantize, merge exactly, re-quantize, and say what it cost."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM

import deltatune
from deltatune.quantized import RequantizationWarning
from deltatune.quantized.layers import QuantizedLayer

from .conftest import load, token_batch

LORA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
# Measured on the tiny Llama (logits within +-0.6) with the adapter of `lora_model` (it moves the logits by 0.51):
# merging re-quantizes each weight, which moves the logits by 0.091 (nf4) and 0.011 (8-bit), the same order as
# quantizing the base at all (0.067 and 0.0055); over 8 adapter seeds at most 0.123 and 0.011 (IA3: 0.013, 0.0034).
# merge_and_unload(dequantize=True) merges without rounding: what remains, 0.0024 (nf4) and 0.0059 (8-bit), is
# bitsandbytes' CPU kernels (bfloat16 block scales, int8 activations) against a float32 matmul.
MERGE_TOL = {"nf4": 0.25, "8bit": 0.03}
DEQUANTIZED_TOL = 0.01


def logits(model):
    with torch.no_grad():
        return model(**token_batch()).logits


def lora_model(path, quantize, config=None, seed=0):
    """LoRA (A at its random init, B ~ N(0, 0.05^2)) or IA3 (vectors ~ 1 + N(0, 0.1^2)) on the quantized Llama."""
    torch.manual_seed(seed)
    model = deltatune.get_peft_model(load(path, quantize), config or deltatune.LoraConfig(**LORA)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
            elif ".ia3_l." in name:
                param.copy_(1 + torch.randn(param.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("quantize", ["nf4", "8bit"])
def test_merge_and_unload_requantizes_and_warns_with_the_rounding_error(tiny_llama_dir, quantize):
    model = lora_model(tiny_llama_dir, quantize)
    before = logits(model)
    with pytest.warns(RequantizationWarning, match=r"re-quantized 14 bitsandbytes .* by up to (\d|\.|e-)+ "):
        merged = model.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    assert (logits(merged) - before).abs().max() < MERGE_TOL[quantize]


def test_the_warning_reports_the_measured_error(tiny_llama_dir):
    model = lora_model(tiny_llama_dir, "nf4")
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    exact = layer.backend.dequantize(layer.base_layer) + layer.delta_weight("default")
    with pytest.warns(RequantizationWarning) as record:
        model.merge_adapter()
    requantized = layer.backend.dequantize(layer.base_layer)
    error = (requantized - exact).abs().max().item()
    reported = float(str(record[0].message).split("by up to ")[1].split(" ")[0])
    assert 0 < error <= reported * 1.001  # the reported number is the worst layer's
    assert error > 1e-4  # 4-bit rounding is real: this is why the warning exists


@pytest.mark.parametrize("quantize", ["nf4", "8bit"])
def test_unmerge_restores_the_quantized_base_exactly(tiny_llama_dir, quantize):
    model = lora_model(tiny_llama_dir, quantize)
    adapted = logits(model)
    with model.disable_adapter():
        base = logits(model)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    weights = [layer.base_layer.weight for layer in layers]
    with pytest.warns(RequantizationWarning):
        model.merge_adapter()
    with model.disable_adapter():  # unmerges, runs the base, merges again
        assert torch.equal(logits(model), base)
    model.unmerge_adapter()
    assert torch.equal(logits(model), adapted)
    assert all(layer.base_layer.weight is weight for layer, weight in zip(layers, weights, strict=True))


@pytest.mark.parametrize("quantize", ["nf4", "8bit"])
def test_merge_and_unload_dequantize_writes_a_full_precision_model(tiny_llama_dir, tmp_path, recwarn, quantize):
    model = lora_model(tiny_llama_dir, quantize)
    before = logits(model)
    merged = model.merge_and_unload(dequantize=True)
    assert not [w for w in recwarn if issubclass(w.category, RequantizationWarning)]
    linears = [m for m in merged.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    assert getattr(merged.config, "quantization_config", None) is None
    assert getattr(merged, "hf_quantizer", None) is None
    assert (logits(merged) - before).abs().max() < DEQUANTIZED_TOL

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # A float32 model with the same weights, but another object that may run other kernels: last bits only.
    torch.testing.assert_close(logits(reloaded), logits(merged), rtol=1.3e-6, atol=1e-6)


def test_dequantize_also_covers_layers_without_adapters(tiny_llama_dir):
    model = lora_model(tiny_llama_dir, "nf4", deltatune.LoraConfig(**{**LORA, "target_modules": ["q_proj"]}))
    merged = model.merge_and_unload(dequantize=True)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())


def test_safe_merge_refuses_nan_and_changes_nothing(tiny_llama_dir):
    model = lora_model(tiny_llama_dir, "nf4")
    layer = model.get_base_model().model.layers[1].mlp.down_proj
    packed = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True, dequantize=True)
    assert isinstance(layer.base_layer, Linear4bit) and torch.equal(layer.base_layer.weight.data, packed)


def test_ia3_merges_into_a_quantized_base(tiny_llama_dir):
    model = lora_model(tiny_llama_dir, "nf4", deltatune.IA3Config(task_type="CAUSAL_LM"))
    before = logits(model)
    with pytest.warns(RequantizationWarning, match="re-quantized 6 "):
        merged = model.merge_and_unload()
    assert (logits(merged) - before).abs().max() < MERGE_TOL["nf4"]
