"""Training checkpoints: output_dir/checkpoints/step-N, written whole or not at all, the newest few kept.

A checkpoint holds everything that decides the rest of a run: the trainable weights (an adapter in peft's
layout, loadable by PeftModel.from_pretrained, and every trainable tensor under its live name, which resuming
reads; or the full model for full fine-tuning), the optimizer, the scheduler, the gradient scaler, every
process's random-number states, and the step number (which fixes the data position, see sampler.py). It is
written into a hidden temporary folder renamed into place at the end, so a run killed at any moment leaves only
complete checkpoints. Everything is read back with torch.load(weights_only=True) or safetensors: nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from deltatune import PeftModel
from deltatune.checkpoint import AdapterLoadError, adapter_buffers, load_adapter_weights, set_peft_model_state_dict
from deltatune.trainer.loading import save_label_names

STATE_FILE = "trainer_state.json"
FULL_MODEL_FILE = "model.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
_STEP = re.compile(r"step-(\d+)")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are hidden and skipped)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := _STEP.fullmatch(name))]
    return sorted(c for c in found if os.path.isfile(os.path.join(c[1], STATE_FILE)))


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# --- random-number states ---------------------------------------------------------------------------------
def rng_state() -> dict:
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- weights ----------------------------------------------------------------------------------------------
def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def _trained_buffers(model) -> dict[str, torch.Tensor]:
    """Persistent buffers that change as the run trains, under their live names: those of the active adapter's
    module copies (a BatchNorm in modules_to_save, with or without affine parameters) and of any module that owns
    a trainable parameter."""
    owners = {id(p) for p in _trainable(model).values()}
    copies = {id(b) for b in adapter_buffers(model, model.active_adapter).values()}
    buffers, seen = {}, set()
    for prefix, module in model.named_modules():
        owns = any(id(p) in owners for p in module.parameters(recurse=False))
        for name, buffer in module.named_buffers(recurse=False):
            trained = owns or id(buffer) in copies
            if trained and name not in module._non_persistent_buffers_set and id(buffer) not in seen:
                seen.add(id(buffer))
                buffers[f"{prefix}.{name}" if prefix else name] = buffer
    return buffers


def _save_weights(model, directory: str) -> None:
    if isinstance(model, PeftModel):
        model.save_pretrained(directory)
        # The adapter file holds what inference needs: for P-tuning and prefix projection that is the prompt table
        # the encoder computes, not the encoder's trained weights, which resuming needs. So every trainable tensor
        # (and the buffers trained with them) is kept beside it, under its live name.
        # Buffers are cloned: one may be a view of another, and safetensors refuses tensors that share memory.
        state = {**{k: v.detach().contiguous() for k, v in _trainable(model).items()},
                 **{k: b.detach().clone() for k, b in _trained_buffers(model).items()}}
        save_file(state, os.path.join(directory, TRAINABLE_FILE))
    else:  # full fine-tuning: safetensors' own pair handles tied weights symmetrically
        save_model(model, os.path.join(directory, FULL_MODEL_FILE))


def _load_weights(model, directory: str) -> None:
    if not isinstance(model, PeftModel):
        load_model(model, os.path.join(directory, FULL_MODEL_FILE), device=str(next(model.parameters()).device))
        return
    path = os.path.join(directory, TRAINABLE_FILE)
    if not os.path.isfile(path):  # a checkpoint written before trainable.safetensors existed
        state_dict, source = load_adapter_weights(directory)
        set_peft_model_state_dict(model, state_dict, model.active_adapter, source=source)
        return
    saved = load_file(path)
    buffers = _trained_buffers(model)
    if not any(k in saved for k in buffers):
        buffers = {}  # a checkpoint written before buffers were kept: resume without them
    live = {**_trainable(model), **buffers}
    if set(live) != set(saved):
        missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        raise AdapterLoadError(f"{path} does not hold this run's trainable parameters (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}): was it written by another configuration?")
    with torch.no_grad():
        for name, param in live.items():
            if saved[name].shape != param.shape:
                raise AdapterLoadError(f"{name} in {path} has shape {tuple(saved[name].shape)}, the run "
                                       f"{tuple(param.shape)}.")
            param.copy_(saved[name])


# --- save / load ------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, output_dir: str, model, optimizer, scheduler, state: dict,
                    keep: int | None, label_names: list[str] | None = None) -> str:
    """Write checkpoint step-<state["step"]> (a collective call: every process must make it). With a classifier's
    `label_names` it also holds labels.json, like the final adapter, so `deltatune eval` reads the classes."""
    from accelerate.utils import gather_object

    rng_states = gather_object([rng_state()])
    final = os.path.join(checkpoints_dir(output_dir), f"step-{state['step']}")

    def write(tmp: str) -> None:
        _save_weights(model, tmp)
        save_label_names(tmp, label_names)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        torch.save(rng_states, os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)

    if accelerator.is_main_process:
        write_folder(final, write)
        rotate(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def read_state(path: str) -> dict:
    """A checkpoint's trainer state: its step and the settings of the run that wrote it."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(path: str, accelerator, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint into the live objects; returns its trainer state (step, ...)."""
    state = read_state(path)
    _load_weights(model, path)
    optimizer.load_state_dict(_load(path, "optimizer.pt"))
    scheduler.load_state_dict(_load(path, "scheduler.pt"))
    if accelerator.scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        accelerator.scaler.load_state_dict(_load(path, "scaler.pt"))
    rng_states = _load(path, "rng.pt")
    set_rng_state(rng_states[min(accelerator.process_index, len(rng_states) - 1)])
    return state


def _load(path: str, name: str):
    return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)


# --- housekeeping -----------------------------------------------------------------------------------------
def write_folder(final: str, write: Callable[[str], None]) -> None:
    """Fill a hidden sibling folder with `write`, then rename it to `final` (replacing an older one).

    The older folder is renamed aside, the new one renamed into place, and only then is the older one deleted:
    `final` is missing only between two renames, never for the time a deletion takes."""
    parent, name = os.path.split(os.path.abspath(final))
    tmp = os.path.join(parent, f".{name}.partial")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    write(tmp)
    old = os.path.join(parent, f".deleting-{name}")
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def rotate(output_dir: str, keep: int | None) -> None:
    """Delete all but the newest `keep` checkpoints."""
    if keep is None:
        return
    found = list_checkpoints(output_dir)
    for _, path in found[:max(len(found) - keep, 0)]:
        _remove(path)


def _remove(path: str) -> None:
    """Hide the folder first (a rename is atomic), then delete it: a half-deleted checkpoint is never listed."""
    hidden = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, hidden)
    shutil.rmtree(hidden)


def remove_leftovers(output_dir: str) -> None:
    """Temporary folders of saves or deletions that a killed run did not finish."""
    root = checkpoints_dir(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("."):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
