"""LoRA on torchao-quantized weights: int8 weight-only (through transformers' TorchAoConfig) and NF4 (to_nf4)."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, NF4Tensor
from transformers import AutoModelForCausalLM, TorchAoConfig

import deltatune
from deltatune.methods.lora.layers import QuantizedLoraLinear
from deltatune.quantized import RequantizationWarning
from deltatune.quantized.loading import quantize_nf4

from .conftest import load, token_batch, train_losses

LORA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
# Measured on the tiny Llama (logits within +-0.6), adapter from `perturbed`: the float32 base with the same adapter
# differs by 0.0076 (int8) and 0.081 (NF4); merging (re-quantizing) moves the logits by 0.0081 and 0.092.
FULL_PRECISION_TOL = {"int8": 0.02, "nf4": 0.2}
MERGE_TOL = {"int8": 0.03, "nf4": 0.25}
WEIGHT_TYPE = {"int8": Int8Tensor, "nf4": NF4Tensor}


def load_torchao(path, kind):
    if kind == "int8":
        config = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config).eval()
    return quantize_nf4(load(path))


def logits(model):
    with torch.no_grad():
        return model(**token_batch()).logits


def perturbed(model, seed=0):
    torch.manual_seed(seed)
    model = deltatune.get_peft_model(model, deltatune.LoraConfig(**LORA)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_lora_trains_saves_and_moves_to_full_precision(tiny_llama_dir, tmp_path, kind):
    model = deltatune.get_peft_model(load_torchao(tiny_llama_dir, kind), deltatune.LoraConfig(**LORA))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoraLinear) and isinstance(layer.base_layer.weight, WEIGHT_TYPE[kind])
    frozen = layer.base_layer.weight
    losses = train_losses(model, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1
    assert layer.base_layer.weight is frozen and not frozen.requires_grad

    model.eval().save_pretrained(tmp_path)
    reloaded = deltatune.PeftModel.from_pretrained(load_torchao(tiny_llama_dir, kind), tmp_path).eval()
    # Another model object, which may run other kernels (torchao's may compute in lower precision): far below
    # the trained adapter's effect (about 1).
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_same_adapter_on_the_full_precision_base_is_close(tiny_llama_dir, tmp_path, kind):
    model = perturbed(load_torchao(tiny_llama_dir, kind))
    model.save_pretrained(tmp_path)
    full = deltatune.PeftModel.from_pretrained(load(tiny_llama_dir), tmp_path).eval()
    assert (logits(full) - logits(model)).abs().max() < FULL_PRECISION_TOL[kind]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_merge_requantizes_in_the_same_format(tiny_llama_dir, kind):
    model = perturbed(load_torchao(tiny_llama_dir, kind))
    before = logits(model)
    with pytest.warns(RequantizationWarning, match=f"torchao {kind.upper() if kind == 'nf4' else kind}"):
        merged = model.merge_and_unload()
    weight = merged.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, WEIGHT_TYPE[kind])
    assert (logits(merged) - before).abs().max() < MERGE_TOL[kind]


def test_nf4_quantization_skips_nothing_on_the_tiny_llama_and_keeps_the_head(tiny_llama_dir):
    model = quantize_nf4(load(tiny_llama_dir))
    weights = [m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(w, NF4Tensor) for w in weights) == 14
    assert not isinstance(model.lm_head.weight, NF4Tensor)
