"""load_base_model: one option per recipe, memory with and without quantization, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from torchao.quantization import Int8Tensor, NF4Tensor

from deltatune.quantized import loading
from deltatune.quantized.loading import (
    QUANTIZE_CHOICES,
    QuantizationUnavailableError,
    check_quantization_available,
    load_base_model,
    model_memory_bytes,
)

from .conftest import load, token_batch


def quantized_kind(model) -> type:
    module = model.model.layers[0].self_attn.q_proj
    return type(module) if type(module) is not torch.nn.Linear else type(module.weight)


EXPECTED = {"8bit": Linear8bitLt, "4bit": Linear4bit, "nf4": Linear4bit, "fp4": Linear4bit,
            "torchao-int8": Int8Tensor, "torchao-nf4": NF4Tensor}


@pytest.mark.parametrize("quantize", QUANTIZE_CHOICES)
def test_each_recipe_loads_runs_and_reports_its_memory(tiny_llama_dir, quantize):
    lines = []
    model = load_base_model(str(tiny_llama_dir), quantize, report=lines.append, dtype=torch.float32)
    assert issubclass(quantized_kind(model), EXPECTED[quantize])
    assert not isinstance(model.lm_head, Linear4bit | Linear8bitLt) and type(model.lm_head.weight) is torch.nn.Parameter
    with torch.no_grad():
        assert torch.isfinite(model(**token_batch()).logits).all()
    used, full = model_memory_bytes(model), model_memory_bytes(model, full_precision=True)
    assert full == model_memory_bytes(load(tiny_llama_dir))  # same model, every weight in float32
    assert used < full
    assert len(lines) == 1 and f"{used / 2**20:.1f} MiB" in lines[0] and f"{full / 2**20:.1f} MiB" in lines[0]


def test_memory_orders_the_recipes_and_counts_quantization_state(tiny_llama_dir):
    sizes = {q: model_memory_bytes(load_base_model(str(tiny_llama_dir), q, report=None)) for q in ("8bit", "nf4")}
    full = model_memory_bytes(load(tiny_llama_dir))
    assert sizes["nf4"] < sizes["8bit"] < full
    layer = load(tiny_llama_dir, "nf4").model.layers[0].self_attn.q_proj
    packed = layer.weight.numel() * layer.weight.element_size()
    assert packed == 64 * 64 // 2
    # Per 64-value block: one 8-bit absmax (double quantization), plus small shared tables.
    assert model_memory_bytes(torch.nn.ModuleList([layer])) > packed + 64 * 64 // 64


def test_full_precision_load_reports_plainly(tiny_llama_dir):
    lines = []
    model = load_base_model(str(tiny_llama_dir), None, report=lines.append)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert lines == [f"base model weights: {model_memory_bytes(model) / 2**20:.1f} MiB (full precision)"]


@pytest.mark.parametrize(("quantize", "package"), [("nf4", "bitsandbytes"), ("8bit", "bitsandbytes"),
                                                   ("torchao-int8", "torchao")])
def test_a_missing_backend_says_what_to_install(tiny_llama_dir, monkeypatch, quantize, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    with pytest.raises(QuantizationUnavailableError) as error:
        load_base_model(str(tiny_llama_dir), quantize, report=None)
    message = str(error.value)
    assert f"needs {package}" in message
    assert "pip install 'deltatune[quant]'" in message and "drop the quantize option" in message


def test_unsupported_hardware_says_which_option_to_drop(monkeypatch):
    def no_kernel(quantize, device):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(loading, "_probe", no_kernel)
    expected = r"cannot run bitsandbytes 4-bit nf4 layers on cpu \(RuntimeError: no 4-bit kernel.*Drop the quantize"
    with pytest.raises(QuantizationUnavailableError, match=expected):
        check_quantization_available("nf4", "cpu")


def test_the_probe_passes_on_this_machine():
    for quantize in QUANTIZE_CHOICES:
        check_quantization_available(quantize, "cpu")


def test_unknown_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="choose one of 8bit, 4bit, nf4, fp4, torchao-int8, torchao-nf4"):
        load_base_model("unused", "int3")


def test_models_without_quantized_layers_import_no_backend():
    """transformers may import torchao itself (it does when torchao is installed); deltatune adds no import."""
    code = (
        "import sys, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "before = {m for m in ('bitsandbytes', 'torchao') if m in sys.modules}\n"
        "import deltatune\n"
        "model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=4, vocab_size=64))\n"
        "model = deltatune.get_peft_model(model, deltatune.LoraConfig(target_modules='all-linear'))\n"
        "model.merge_and_unload()\n"
        "print(sorted({m for m in ('bitsandbytes', 'torchao') if m in sys.modules} - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("quantize", ["8bit", "nf4"])
def test_full_precision_size_of_a_bf16_load_is_the_bf16_size(tiny_llama_dir, quantize):
    """bitsandbytes' 8-bit layers do not record their weight's dtype: the model config's is used."""
    full = model_memory_bytes(load_base_model(str(tiny_llama_dir), None, report=None, dtype=torch.bfloat16))
    model = load_base_model(str(tiny_llama_dir), quantize, report=None, dtype=torch.bfloat16)
    assert model_memory_bytes(model, full_precision=True) == full
