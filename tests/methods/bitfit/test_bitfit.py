"""BitFit: a delta on every bias and nothing else; layers without a bias are passed over."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.methods.bitfit import BitFitLayer


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_every_bias_and_only_biases_train(arch):
    factory, task_type = ARCHS[arch][0], ARCHS[arch][1]
    base_biases = sum(p.numel() for name, p in factory().named_parameters()
                      if name.endswith(".bias") and not name.startswith("classifier."))
    model = deltatune.get_peft_model(factory(), deltatune.BitFitConfig(task_type=task_type))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    deltas = {name: p for name, p in trainable.items() if ".bias_delta." in name}
    assert sum(p.numel() for p in deltas.values()) == base_biases
    assert set(trainable) - set(deltas) == {n for n in trainable if ".modules_to_save.default." in n}
    assert model.peft_config["default"].target_modules == ".*"


# base layer: (factory, input shape)
BASES = {
    "linear": (lambda: nn.Linear(5, 3), (2, 5)),
    "conv1d-gpt2": (lambda: Conv1D(3, 5), (2, 4, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3), (1, 2, 5, 5)),
    "layernorm": (lambda: nn.LayerNorm(5), (2, 5)),
}


@pytest.mark.parametrize("base_name", list(BASES))
def test_the_delta_acts_as_part_of_the_bias_and_merges_into_it(base_name):
    factory, shape = BASES[base_name]
    torch.manual_seed(0)
    base = factory()
    reference = factory()
    reference.load_state_dict(base.state_dict())
    layer = BitFitLayer(base)
    layer.update_layer("default")
    layer.set_adapter(["default"])
    x = torch.randn(shape)
    with torch.no_grad():
        # A fresh delta is zero, so the bias is the reference's; the reference is another module (its own copy of
        # the weights): last bits only.
        torch.testing.assert_close(layer(x), reference(x), rtol=1.3e-6, atol=1e-6)
        layer.bias_delta["default"].normal_()
        reference.bias += layer.bias_delta["default"]
        assert torch.allclose(layer(x), reference(x), atol=1e-6)
        layer.merge()
        assert torch.allclose(layer.base_layer.bias, reference.bias, atol=1e-6)
        assert torch.allclose(layer(x), reference(x), atol=1e-6)


def test_layers_without_bias_are_passed_over():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    deltatune.inject_adapter_in_model(deltatune.BitFitConfig(target_modules=["0", "1"]), model)
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], BitFitLayer)


def test_targets_without_any_bias_are_refused():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="matched no module of this model that BITFIT can adapt"):
        deltatune.inject_adapter_in_model(deltatune.BitFitConfig(target_modules=["0"]), model)


def test_model_without_any_bias_is_refused():
    with pytest.raises(ValueError, match="no layer of this LlamaForCausalLM has one"):
        deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.BitFitConfig(task_type="CAUSAL_LM"))


def test_half_precision_base_trains_a_float32_delta():
    model = nn.Sequential(nn.Linear(4, 2)).to(torch.bfloat16)
    deltatune.inject_adapter_in_model(deltatune.BitFitConfig(), model)
    assert model[0].bias_delta["default"].dtype == torch.float32
    out = model(torch.randn(3, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model[0].bias_delta["default"].grad is not None


def test_a_head_whose_bias_is_its_decoders_trains_through_the_decoder():
    """BERT's masked-LM head owns a bias that is also its decoder's: the decoder is wrapped, not the head around
    it (one layer inside another would never run)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=32)
    model = deltatune.get_peft_model(BertForMaskedLM(config), deltatune.BitFitConfig())
    head = model.get_base_model().cls.predictions
    assert not isinstance(head, BitFitLayer) and isinstance(head.decoder, BitFitLayer)
    ids = torch.randint(1, 64, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert any("predictions.decoder" in n for n in trained)

