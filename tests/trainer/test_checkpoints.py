"""Checkpoint housekeeping: atomic folders, listing only complete checkpoints, random-number states."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from deltatune.trainer.checkpoints import (
    STATE_FILE,
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
