"""Checkpoint housekeeping: atomic folders, listing only complete checkpoints, random-number states."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune import LoraConfig, get_peft_model
from deltatune.checkpoint import AdapterLoadError
from deltatune.trainer.checkpoints import (
    STATE_FILE,
    TRAINABLE_FILE,
    _load_weights,
    _save_weights,
    list_checkpoints,
    remove_leftovers,
    rng_state,
    rotate,
    set_rng_state,
    write_folder,
)


def _checkpoint(root, step, complete=True):
    folder = root / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text("{}")
    return folder


def test_only_complete_checkpoints_are_listed_and_rotation_keeps_the_newest(tmp_path):
    for step in (2, 10, 4):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoints" / ".step-14.partial").mkdir()
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 4, 10]
    rotate(str(tmp_path), keep=2)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [4, 10]
    remove_leftovers(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-10", "step-12", "step-4"]


def test_a_failed_write_leaves_the_previous_folder_whole(tmp_path):
    final = tmp_path / "adapter"
    write_folder(str(final), lambda tmp: open(os.path.join(tmp, "weights"), "w").write("old"))

    def crash(tmp):
        open(os.path.join(tmp, "weights"), "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(str(final), crash)
    assert (final / "weights").read_text() == "old"
    write_folder(str(final), lambda tmp: open(os.path.join(tmp, "weights"), "w").write("new"))
    assert (final / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_random_states_round_trip_through_a_weights_only_file(tmp_path):
    state = rng_state()
    torch.save([state], tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)[0])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def _lora_with_batchnorm(seed: int, affine: bool = True):
    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(4, 4))
    base.add_module("bn", nn.BatchNorm1d(4, affine=affine))
    return get_peft_model(base, LoraConfig(r=2, target_modules=["lin"], modules_to_save=["bn"]))


def _bn_buffers(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if "modules_to_save" in k}


@pytest.mark.parametrize("affine", [True, False])  # without affine parameters the copy owns no parameter
def test_resume_weights_carry_the_running_statistics_of_trained_batchnorm(tmp_path, affine):
    model = _lora_with_batchnorm(0, affine).train()
    for _ in range(3):
        model(torch.randn(8, 4) * 3 + 1)  # training-mode forwards move the trained copy's running statistics
    _save_weights(model, str(tmp_path))
    trained = _bn_buffers(model)
    assert trained["base_model.model.bn.modules_to_save.default.num_batches_tracked"].item() == 3

    fresh = _lora_with_batchnorm(1, affine)
    _load_weights(fresh, str(tmp_path))
    for name, value in _bn_buffers(fresh).items():
        torch.testing.assert_close(value, trained[name], msg=name)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(q, p, msg=name)


def test_resume_weights_from_a_checkpoint_without_buffers_still_load(tmp_path):
    model = _lora_with_batchnorm(0)
    _save_weights(model, str(tmp_path))
    path = tmp_path / TRAINABLE_FILE
    params_only = {k: v for k, v in load_file(path).items() if "running" not in k and "num_batches" not in k}
    save_file(params_only, path)
    _load_weights(_lora_with_batchnorm(1), str(tmp_path))

    save_file({**params_only, "stray.weight": torch.zeros(1)}, path)
    with pytest.raises(AdapterLoadError, match="unexpected \\['stray.weight'\\]"):
        _load_weights(_lora_with_batchnorm(1), str(tmp_path))


class _ViewBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.arange(6.0).view(2, 3))
        self.register_buffer("row", self.table[0])  # a view of another buffer: the two share memory


def test_resume_weights_save_buffers_that_share_memory(tmp_path):
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(4, 4))
    base.add_module("extra", _ViewBuffers())
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lin"], modules_to_save=["extra"]))
    _save_weights(model, str(tmp_path))
    saved = load_file(tmp_path / TRAINABLE_FILE)
    assert torch.equal(saved["base_model.model.extra.modules_to_save.default.row"], torch.arange(3.0))
