"""LayerNorm tuning: only norm copies train, one adapter acts at a time, merging swaps values in and out."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, inputs_for, logits, perturb_trainable
from torch import nn

import deltatune
from deltatune.methods.ln_tuning import LNTuningLayer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_only_the_norm_copies_are_trainable(arch):
    factory, task_type = ARCHS[arch][0], ARCHS[arch][1]
    model = deltatune.get_peft_model(factory(), deltatune.LNTuningConfig(task_type=task_type))
    wrapped = [type(m.base_layer).__name__ for m in model.modules() if isinstance(m, LNTuningLayer)]
    assert wrapped and all(name.endswith("Norm") for name in wrapped)  # LayerNorm, LlamaRMSNorm, T5LayerNorm
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    task_heads = [name for name in trainable if ".modules_to_save." in name]
    assert all(".ln_tuning_layers.default." in name for name in trainable if name not in task_heads)
    layers = [layer for layer in model.modules() if isinstance(layer, LNTuningLayer)]
    norm_params = sum(len(list(layer.base_layer.parameters())) for layer in layers)
    assert len(trainable) - len(task_heads) == norm_params


def two_adapters():
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LNTuningConfig(task_type="CAUSAL_LM"))
    model.add_adapter("other", deltatune.LNTuningConfig(task_type="CAUSAL_LM"))
    perturb_trainable(model, seed=0)
    model.set_adapter("other")
    perturb_trainable(model, seed=1)
    return model


def test_merging_two_adapters_is_refused():
    model = two_adapters()
    with pytest.raises(ValueError, match="only one adapter can be merged"):
        model.merge_adapter(["default", "other"])
    model.merge_adapter(["other"])
    with pytest.raises(ValueError, match="only one adapter can be merged"):
        model.merge_adapter(["default"])


def test_two_active_adapters_are_refused_in_forward():
    model = two_adapters()
    norm = model.base_model.model.model.norm
    norm.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter acts at a time"):
        norm(torch.randn(1, 32))


def test_saving_while_merged_writes_the_adapter_not_the_base(tmp_path):
    model = two_adapters()
    expected = {k: v.clone() for k, v in deltatune.get_peft_model_state_dict(model, adapter_name="other").items()}
    model.merge_adapter(["other"])
    saved = deltatune.get_peft_model_state_dict(model, adapter_name="other")
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    inputs = inputs_for("llama")
    merged = logits(model, inputs)
    model.unmerge_adapter()
    # Merging copies the norm's values; unmerged, the adapter's own copy (another module) runs: last bits only.
    torch.testing.assert_close(logits(model, inputs), merged, rtol=1.3e-6, atol=1e-6)


def test_module_without_parameters_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="ReLU, which LN_TUNING cannot wrap"):
        deltatune.inject_adapter_in_model(deltatune.LNTuningConfig(target_modules=["1"]), model)
