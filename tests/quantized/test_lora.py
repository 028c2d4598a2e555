"""LoRA on bitsandbytes 8-bit and 4-bit base layers, on CPU: training, files, full-precision bases, and peft."""

from __future__ import annotations

import peft
import pytest
import torch

import deltatune
from deltatune.methods.lora.layers import QuantizedLoraLinear
from deltatune.quantized import keep_differentiable

from .conftest import QUANTIZATIONS, load, token_batch, train_losses

LORA = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
# Measured on the tiny random Llama (logits within +-0.6) with the adapter of `perturbed_lora` (it moves the logits
# by 0.90): the same adapter on the float32 base gives logits 0.0054 (8-bit) and 0.069 (nf4) away from the quantized
# run, which is what quantizing the base alone changes (0.0055 and 0.067). Other adapter seeds: 0.04-0.09 for nf4.
FULL_PRECISION_TOL = {"8bit": 0.02, "nf4": 0.2}


def logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or token_batch())).logits


def perturbed_lora(path, quantize, seed=0):
    """A deltatune LoRA model on the quantized tiny Llama with every adapter tensor moved off its init."""
    torch.manual_seed(seed)
    model = deltatune.get_peft_model(load(path, quantize), deltatune.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_lora_trains_only_adapter_weights(tiny_llama_dir, quantize):
    base = deltatune.prepare_model_for_kbit_training(load(tiny_llama_dir, quantize))
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(**LORA))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoraLinear)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_keys = {k for k, p in model.named_parameters() if p.requires_grad}
    assert adapter_keys and all(".lora_A." in k or ".lora_B." in k for k in adapter_keys)

    losses = train_losses(model, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1

    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in adapter_keys if ".lora_B." in k or ".lora_A." in k}


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_save_and_reload_on_the_quantized_base_is_identical(tiny_llama_dir, tmp_path, quantize):
    model = perturbed_lora(tiny_llama_dir, quantize)
    model.save_pretrained(tmp_path)
    reloaded = deltatune.PeftModel.from_pretrained(load(tiny_llama_dir, quantize), tmp_path).eval()
    # Another model object, which may run other kernels; bitsandbytes' CPU kernels may round activations to half
    # precision, where a last-bit difference can grow. 1e-4 stays far below the adapter's effect (0.90) and
    # quantization's (0.0055).
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_adapters_move_between_quantized_and_full_precision_bases(tiny_llama_dir, tmp_path, quantize):
    quantized = perturbed_lora(tiny_llama_dir, quantize)
    quantized.save_pretrained(tmp_path / "from-quantized")
    full = deltatune.PeftModel.from_pretrained(load(tiny_llama_dir), tmp_path / "from-quantized").eval()
    assert (logits(full) - logits(quantized)).abs().max() < FULL_PRECISION_TOL[quantize]
    assert (logits(full) - logits(load(tiny_llama_dir))).abs().max() > 0.3  # the adapter is really on

    # ... and back: the full-precision model's file (same keys) on a fresh quantized base.
    full.save_pretrained(tmp_path / "from-full")
    again = deltatune.PeftModel.from_pretrained(load(tiny_llama_dir, quantize), tmp_path / "from-full").eval()
    torch.testing.assert_close(logits(again), logits(quantized), rtol=0, atol=1e-4)  # as in the test above


@pytest.mark.parametrize("quantize", [*QUANTIZATIONS, "fp4"])
def test_equal_outputs_to_peft_on_the_same_quantized_base(tiny_llama_dir, tmp_path, quantize):
    ours = perturbed_lora(tiny_llama_dir, quantize)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load(tiny_llama_dir, quantize), tmp_path / "ours").eval()
    keep_differentiable(theirs)  # the same kernel as deltatune: no CPU repacking (see quantized/bnb.py)
    # The same quantized kernels, but each library adds the adapter with its own float32 ops: last bits only,
    # which half-precision activations in bitsandbytes' CPU kernels may grow (see the reload test above).
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-4)

    theirs.save_pretrained(tmp_path / "theirs")
    ours_again = deltatune.PeftModel.from_pretrained(load(tiny_llama_dir, quantize), tmp_path / "theirs").eval()
    theirs_again = peft.PeftModel.from_pretrained(load(tiny_llama_dir, quantize), tmp_path / "theirs").eval()
    keep_differentiable(theirs_again)
    torch.testing.assert_close(logits(ours_again), logits(theirs_again), rtol=0, atol=1e-4)


def test_trainable_parameter_count_matches_peft(tiny_llama_dir):
    ours = deltatune.get_peft_model(load(tiny_llama_dir, "nf4"), deltatune.LoraConfig(**LORA))
    theirs = peft.get_peft_model(load(tiny_llama_dir, "nf4"), peft.LoraConfig(**LORA))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("option", [{"use_dora": True}, {"init_lora_weights": "pissa"}])
def test_options_that_rewrite_the_base_weight_are_refused_on_quantized_layers(tiny_llama_dir, option):
    with pytest.raises(ValueError, match="bitsandbytes 4-bit nf4 layer.*load the base model without quantization"):
        deltatune.get_peft_model(load(tiny_llama_dir, "nf4"), deltatune.LoraConfig(**LORA, **option))
