"""What every weight-space method promises, checked for IA3, LayerNorm tuning and BitFit on tiny models:
a fresh adapter is an exact no-op, training moves only the adapter, files round-trip exactly, merging
gives the same outputs and unmerging restores the base.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, inputs_for, logits, max_diff, perturb_trainable

import deltatune
from deltatune.checkpoint import adapter_parameter_map

# (config class, arch, config kwargs besides task_type)
CASES = [
    (deltatune.IA3Config, "llama", {}),
    (deltatune.IA3Config, "bert", {}),
    (deltatune.IA3Config, "gpt2", {"fan_in_fan_out": True}),
    (deltatune.IA3Config, "t5", {}),
    (deltatune.LNTuningConfig, "llama", {}),
    (deltatune.LNTuningConfig, "bert", {}),
    (deltatune.LNTuningConfig, "t5", {}),
    (deltatune.BitFitConfig, "bert", {}),
    (deltatune.BitFitConfig, "gpt2", {}),
]
PARAMS = [pytest.param(cls, arch, kwargs, id=f"{cls.peft_type}-{arch}") for cls, arch, kwargs in CASES]


def make(config_cls, arch: str, kwargs: dict, seed: int = 0):
    """(PeftModel, a fresh copy of its base model)."""
    factory, task_type = ARCHS[arch][0], ARCHS[arch][1]
    model = deltatune.get_peft_model(factory(seed), config_cls(task_type=task_type, **kwargs))
    return model, factory(seed)


def loss(model, arch: str) -> torch.Tensor:
    inputs = inputs_for(arch)
    if ARCHS[arch][1] == "SEQ_CLS":
        labels = torch.tensor([0, 2])
    elif arch == "t5":
        labels = inputs["decoder_input_ids"]
    else:
        labels = inputs["input_ids"]
    return model(**inputs, labels=labels).loss


@pytest.mark.parametrize(("config_cls", "arch", "kwargs"), PARAMS)
def test_fresh_adapter_is_an_exact_no_op(config_cls, arch, kwargs):
    model, base = make(config_cls, arch, kwargs)
    inputs = inputs_for(arch)
    # IA3 scales by exact ones, BitFit adds an exact zero, LN tuning runs a copy of the norm; `base` is a separately
    # built model (its own tensors, possibly other kernels): last bits only, far below any trained adapter's effect.
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize(("config_cls", "arch", "kwargs"), PARAMS)
def test_training_lowers_the_loss_and_leaves_the_base_untouched(config_cls, arch, kwargs):
    model, base = make(config_cls, arch, kwargs)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameter_map(model, "default").values()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        value = loss(model, arch)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < losses[0]
    after = model.unload().state_dict()  # the base model, its own modules back in place
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


@pytest.mark.parametrize(("config_cls", "arch", "kwargs"), PARAMS)
def test_save_and_load_give_identical_outputs(tmp_path, config_cls, arch, kwargs):
    model, base = make(config_cls, arch, kwargs)
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(base, tmp_path)
    assert type(loaded.peft_config["default"]) is config_cls
    inputs = inputs_for(arch)
    # The same values in another model object, which may run other kernels: last bits only.
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=1.3e-6, atol=1e-6)
    assert max_diff(logits(loaded, inputs), logits(make(config_cls, arch, kwargs)[1], inputs)) > 1e-4


@pytest.mark.parametrize(("config_cls", "arch", "kwargs"), PARAMS)
def test_merge_matches_and_unmerge_restores(config_cls, arch, kwargs):
    model, base = make(config_cls, arch, kwargs)
    perturb_trainable(model)
    inputs = inputs_for(arch)
    adapted = logits(model, inputs)
    weights = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    model.merge_adapter()
    assert max_diff(logits(model, inputs), adapted) < 1e-5
    with model.disable_adapter():
        assert max_diff(logits(model, inputs), logits(base, inputs)) < 1e-5
    model.unmerge_adapter()
    assert max_diff(logits(model, inputs), adapted) < 1e-5
    for key, value in model.get_base_model().state_dict().items():
        assert torch.allclose(value, weights[key], atol=1e-6), key
    merged = model.merge_and_unload()
    assert max_diff(logits(merged, inputs), adapted) < 1e-5


@pytest.mark.parametrize(("config_cls", "arch", "kwargs"), PARAMS)
def test_adapters_switch_and_delete(config_cls, arch, kwargs):
    model, base = make(config_cls, arch, kwargs)
    perturb_trainable(model, seed=0)
    model.add_adapter("other", config_cls(task_type=ARCHS[arch][1], **kwargs))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameter_map(model, "default").values()}  # "other" is frozen
    model.set_adapter("other")
    perturb_trainable(model, seed=1)
    inputs = inputs_for(arch)
    other = logits(model, inputs)
    model.set_adapter("default")
    default = logits(model, inputs)
    assert max_diff(default, other) > 1e-4
    model.delete_adapter("default")
    assert torch.equal(logits(model, inputs), other)
    model.delete_adapter("other")
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=1.3e-6, atol=1e-6)  # separately built
