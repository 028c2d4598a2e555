"""IA3 and LayerNorm-tuning files and numbers agree with peft: adapters move both ways with equal logits.

peft is the reference here only; the package itself never imports it.
"""

from __future__ import annotations

import json

import peft
import pytest
from conftest import ARCHS, inputs_for, logits, max_diff, perturb_trainable
from safetensors.torch import load_file

import deltatune

TOL = 1e-5

# (method, arch): config kwargs, the same for both libraries.
CASES = {
    ("IA3Config", "llama"): {"task_type": "CAUSAL_LM"},
    ("IA3Config", "bert"): {"task_type": "SEQ_CLS"},
    ("IA3Config", "gpt2"): {"task_type": "CAUSAL_LM", "fan_in_fan_out": True},
    ("IA3Config", "t5"): {"task_type": "SEQ_2_SEQ_LM"},
    ("IA3Config", "llama-explicit"): {
        "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "up_proj", "down_proj"],
        "feedforward_modules": ["up_proj"],
    },
    ("IA3Config", "bert-regex"): {
        "task_type": "SEQ_CLS", "target_modules": r".*\.(value|dense)",
        "feedforward_modules": r".*output\.dense",
    },
    ("LNTuningConfig", "llama"): {"task_type": "CAUSAL_LM"},
    ("LNTuningConfig", "bert"): {"task_type": "SEQ_CLS", "target_modules": ["LayerNorm"]},
    ("LNTuningConfig", "gpt2"): {"task_type": "CAUSAL_LM"},
}
PARAMS = [pytest.param(method, arch, id=f"{method[:-6]}-{arch}") for method, arch in CASES]


def factory(arch: str):
    return ARCHS[arch.split("-")[0]][0]


def build(lib, method: str, arch: str, seed: int = 0):
    """A PeftModel from `lib` (peft or deltatune) with every trainable tensor moved off its init."""
    config = getattr(lib, method)(**CASES[method, arch])
    model = lib.get_peft_model(factory(arch)(), config)
    perturb_trainable(model, seed)
    return model.eval()


@pytest.mark.parametrize(("method", "arch"), PARAMS)
@pytest.mark.parametrize("direction", ["peft-to-deltatune", "deltatune-to-peft"])
def test_adapter_moves_between_libraries(tmp_path, method, arch, direction):
    source, target = (peft, deltatune) if direction == "peft-to-deltatune" else (deltatune, peft)
    saved = build(source, method, arch)
    saved.save_pretrained(tmp_path)
    loaded = target.PeftModel.from_pretrained(factory(arch)(), tmp_path).eval()
    inputs = inputs_for(arch.split("-")[0])
    assert max_diff(logits(loaded, inputs), logits(saved, inputs)) < TOL
    # ... and the adapter really is on: it moves the logits away from the base model's.
    assert max_diff(logits(loaded, inputs), logits(factory(arch)(), inputs)) > 1e-4


@pytest.mark.parametrize(("method", "arch"), PARAMS)
def test_saved_files_have_peft_keys(tmp_path, method, arch):
    build(peft, method, arch).save_pretrained(tmp_path / "peft")
    build(deltatune, method, arch).save_pretrained(tmp_path / "ours")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_config) == set(peft_config)
    for key, value in peft_config.items():
        if isinstance(value, list):  # peft writes sets in arbitrary order; ours are sorted or as given
            assert sorted(ours_config[key]) == sorted(value), key
        else:
            assert ours_config[key] == value, key
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(ours_tensors) == sorted(peft_tensors)
    for key, tensor in peft_tensors.items():
        assert (ours_tensors[key].shape, ours_tensors[key].dtype) == (tensor.shape, tensor.dtype), key


@pytest.mark.parametrize(("method", "arch"), PARAMS)
def test_trainable_parameters_match_peft(method, arch):
    models = [lib.get_peft_model(factory(arch)(), getattr(lib, method)(**CASES[method, arch]))
              for lib in (deltatune, peft)]
    counts = [model.get_nb_trainable_parameters() for model in models]
    assert counts[0] == counts[1]
