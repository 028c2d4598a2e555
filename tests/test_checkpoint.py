"""Checkpoint I/O: peft's key layout both ways, atomic saves, legacy .bin files, clear errors for bad files."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, logits, lora_kwargs, max_diff, perturb_trainable, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

import deltatune
from deltatune import checkpoint
from deltatune.checkpoint import AdapterLoadError

TOL = 1e-5


def llama_model(seed: int = 0, **overrides) -> deltatune.PeftModel:
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**lora_kwargs("llama", **overrides)))
    perturb_trainable(model, seed)
    return model.eval()


def load_llama(path) -> deltatune.PeftModel:
    return deltatune.PeftModel.from_pretrained(ARCHS["llama"][0](), path).eval()


def files_in(path) -> list[str]:
    return sorted(os.listdir(path))


def test_state_dict_keys_have_no_adapter_name_and_load_under_any_name():
    model = llama_model()
    model.add_adapter("other", deltatune.LoraConfig(**lora_kwargs("llama")))
    state = deltatune.get_peft_model_state_dict(model)
    assert state and all(".default." not in k and ".other." not in k for k in state)
    assert all(k.startswith("base_model.model.") for k in state)
    assert state.keys() == deltatune.get_peft_model_state_dict(model, adapter_name="other").keys()
    deltatune.set_peft_model_state_dict(model, state, "other")
    model.set_adapter("other")
    other = logits(model, inputs_for("llama"))
    model.set_adapter("default")
    # The same values in other tensors (each adapter its own): last bits only; a wrong load would move them by > 1e-3.
    torch.testing.assert_close(other, logits(model, inputs_for("llama")), rtol=1.3e-6, atol=1e-6)


def test_save_then_load_gives_same_outputs_and_inference_mode(tmp_path):
    model = llama_model()
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files_in(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["inference_mode"] is True
    assert model.peft_config["default"].inference_mode is False  # saving does not change the live config
    loaded = load_llama(tmp_path)
    assert max_diff(logits(loaded, inputs_for("llama")), logits(model, inputs_for("llama"))) < TOL
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = deltatune.PeftModel.from_pretrained(ARCHS["llama"][0](), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_legacy_bin_file_is_read(tmp_path):
    model = llama_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert "adapter_model.bin" in files_in(tmp_path)
    assert "adapter_model.safetensors" not in files_in(tmp_path)
    loaded = load_llama(tmp_path)
    assert max_diff(logits(loaded, inputs_for("llama")), logits(model, inputs_for("llama"))) < TOL


def test_saving_in_the_other_format_does_not_leave_stale_weights(tmp_path):
    llama_model(seed=0).save_pretrained(tmp_path)
    newer = llama_model(seed=1)
    newer.save_pretrained(tmp_path, safe_serialization=False)
    loaded = load_llama(tmp_path)
    assert max_diff(logits(loaded, inputs_for("llama")), logits(newer, inputs_for("llama"))) < TOL


class NotATensor:
    """Stands for any pickled object: weights_only loading must refuse to build it."""


@pytest.mark.parametrize("payload", [NotATensor(), "a string"], ids=["pickled-object", "non-tensor-value"])
def test_bin_with_non_tensor_content_is_refused(tmp_path, payload):
    model = llama_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    state = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    state[next(iter(state))] = payload
    torch.save(state, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="adapter_model.bin"):
        load_llama(tmp_path)


def test_corrupted_safetensors_is_reported(tmp_path):
    llama_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(AdapterLoadError, match="truncated or corrupted"):
        load_llama(tmp_path)


def test_truncated_safetensors_is_reported(tmp_path):
    llama_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(AdapterLoadError, match="truncated or corrupted"):
        load_llama(tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    llama_model().save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8  # the file's tensors have r=4
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError) as info:
        load_llama(tmp_path)
    message = str(info.value)
    assert "lora_A.weight" in message and "(4, 32)" in message and "(8, 32)" in message


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_and_unexpected_keys_are_listed(tmp_path, change):
    llama_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    if change == "missing":
        key = sorted(tensors)[0]
        del tensors[key]
    else:
        key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
        tensors[key] = torch.zeros(4, 32)
    save_file(tensors, path)
    with pytest.raises(AdapterLoadError, match=f"{change} keys \\(1\\).*{key.replace('.', '[.]')}"):
        load_llama(tmp_path)


def test_failed_load_adapter_leaves_no_half_added_adapter(tmp_path):
    llama_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"broken")
    model = llama_model()
    before = logits(model, inputs_for("llama"))
    with pytest.raises(AdapterLoadError):
        model.load_adapter(tmp_path, "other")
    assert list(model.peft_config) == ["default"]
    assert "other" not in str(list(model.state_dict()))
    assert torch.equal(logits(model, inputs_for("llama")), before)


def test_missing_weights_file_is_reported(tmp_path):
    llama_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        load_llama(tmp_path)


def crash(*args, **kwargs):
    raise OSError("simulated crash: disk full")


def crash_on_second_file():
    """An fsync that fails for the second file written: the weights are done, the config is not."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            crash()
        real(fd)

    return fsync


@pytest.mark.parametrize(
    ("target", "attribute", "replacement"),
    [(checkpoint, "save_file", crash), (checkpoint.os, "replace", crash),
     (checkpoint.os, "fsync", crash_on_second_file())],
    ids=["weights-write", "rename", "config-write"],
)
def test_crash_mid_save_leaves_previous_adapter_intact(tmp_path, monkeypatch, target, attribute, replacement):
    old = llama_model(seed=0)
    old.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in files_in(tmp_path)}
    newer = llama_model(seed=1, r=2)  # other shapes: a half-written folder would not even load
    with monkeypatch.context() as patch:
        patch.setattr(target, attribute, replacement)
        with pytest.raises(OSError, match="simulated crash"):
            newer.save_pretrained(tmp_path)
    assert files_in(tmp_path) == sorted(before)  # no temporary files left behind
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    loaded = load_llama(tmp_path)
    assert max_diff(logits(loaded, inputs_for("llama")), logits(old, inputs_for("llama"))) < TOL


def test_crash_in_a_first_save_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        llama_model().save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists() or files_in(tmp_path / "new") == []


def test_saved_files_get_the_permissions_open_would_give(tmp_path):
    """Staged through mkstemp (owner-only), the files end with 0o666 minus the umask, as any written file."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        llama_model().save_pretrained(tmp_path)
    finally:
        os.umask(mask)
    for name in files_in(tmp_path):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# --- module copies with state besides parameters (BatchNorm's running statistics), saved as peft saves them ---
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


CONFIGS = {
    "modules_to_save": lambda lib: lib.LoraConfig(target_modules=["conv"], modules_to_save=["norm"], r=2),
    "ln_tuning": lambda lib: lib.LNTuningConfig(target_modules=["norm"]),
}
X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def trained(lib, kind):
    """A copy whose running statistics moved: two train-mode forwards."""
    model = lib.get_peft_model(ConvNet(), CONFIGS[kind](lib))
    model.train()
    with torch.no_grad():
        model(X * 3 + 1)
        model(X - 2)
    return model.eval()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_running_statistics_travel_with_the_adapter_both_ways(kind, tmp_path):
    for source, dest in ((deltatune, deltatune), (deltatune, peft), (peft, deltatune)):
        model = trained(source, kind)
        folder = tmp_path / f"{source.__name__}-{dest.__name__}"
        model.save_pretrained(folder)
        loaded = dest.PeftModel.from_pretrained(ConvNet(), folder).eval()
        with torch.no_grad():
            assert (loaded(X) - model(X)).abs().max() < 1e-6, (source.__name__, dest.__name__)


def test_running_statistics_are_state_not_trainable_parameters():
    model = trained(deltatune, "modules_to_save")
    state = deltatune.get_peft_model_state_dict(model)
    assert {"base_model.model.norm.running_mean", "base_model.model.norm.num_batches_tracked"} <= set(state)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("running" in n for n in trainable)


def test_state_dict_and_compiled_model_arguments_as_in_peft():
    """peft's signature: get_peft_model_state_dict(model, state_dict=None, adapter_name="default", ...); values come
    from the given state dict (alpaca-lora saves model.state_dict() through it)."""
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["q_proj"], r=2))
    plain = deltatune.get_peft_model_state_dict(model)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    shifted = deltatune.get_peft_model_state_dict(model, state)
    assert shifted.keys() == plain.keys()
    assert all(torch.equal(shifted[k], plain[k] + 1) for k in plain)
    compiled = torch.compile(model)
    assert deltatune.get_peft_model_state_dict(compiled, unwrap_compiled=True).keys() == plain.keys()


def test_set_peft_model_state_dict_returns_the_keys_it_left_out():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(target_modules=["q_proj"], r=2))
    state = deltatune.get_peft_model_state_dict(model)
    result = deltatune.set_peft_model_state_dict(model, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    first = next(iter(state))
    partial = {k: v for k, v in state.items() if k != first} | {"stray.weight": torch.zeros(1)}
    result = deltatune.set_peft_model_state_dict(model, partial, strict=False)
    assert result.missing_keys == [first] and result.unexpected_keys == ["stray.weight"]
