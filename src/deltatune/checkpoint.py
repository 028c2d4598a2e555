"""Checkpoint I/O: the map between live adapter parameters and peft's file keys, and safe file writing.

One function, `adapter_parameter_map`, walks the live module tree and names each parameter of one adapter
with its file key (the model key with the adapter name removed). Saving reads through it and loading
writes through it, so the two directions cannot drift apart.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.layers import AdapterLayer
from deltatune.modules_to_save import ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model, or cannot be read."""


def adapter_parameter_map(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, nn.Parameter]:
    """{file key: live parameter} for one adapter, in peft's key layout.

    Keys are relative to `model`: pass the PeftModel to get peft's `base_model.model.` prefix.
    `bias` is LoRA's bias option: "all" adds every bias of the model, "lora_only" those of adapted layers.
    """
    out: dict[str, nn.Parameter] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, AdapterLayer):
            for suffix, param in module.adapter_parameters(adapter_name):
                out[prefix + suffix] = param
            if bias == "lora_only" and adapter_name in module.adapter_names:
                base_bias = getattr(module.base_layer, "bias", None)
                if isinstance(base_bias, nn.Parameter):
                    out[f"{prefix}base_layer.bias"] = base_bias
            skip += [f"{prefix}{c}." for c in module.adapter_param_containers]
        elif isinstance(module, ModulesToSaveWrapper):
            skip.append(prefix)
            if module.tied_to is None:
                for suffix, param in module.adapter_parameters(adapter_name):
                    out[prefix + suffix] = param
        elif bias == "all" and isinstance(getattr(module, "bias", None), nn.Parameter):
            out[f"{prefix}bias"] = module.bias
    return out


def get_peft_model_state_dict(model: nn.Module, adapter_name: str = "default", bias: str | None = None
                              ) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's file keys (detached; ready for safetensors)."""
    if bias is None:
        config = getattr(model, "peft_config", {}).get(adapter_name)
        bias = getattr(config, "bias", "none")
    return {k: p.detach() for k, p in adapter_parameter_map(model, adapter_name, bias).items()}


def set_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              bias: str | None = None, strict: bool = True, source: str = "the state dict"
                              ) -> None:
    """Copy file tensors into the adapter's live parameters; shape or key mismatches are errors."""
    if bias is None:
        config = getattr(model, "peft_config", {}).get(adapter_name)
        bias = getattr(config, "bias", "none")
    expected = adapter_parameter_map(model, adapter_name, bias)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        raise AdapterLoadError(
            f"{source} does not fit adapter {adapter_name!r} of this model.\n"
            f"  missing keys ({len(missing)}): {missing[:10]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}\n"
            "Check that the adapter was trained for this base model and the same target_modules."
        )
    for key, param in expected.items():
        if key not in state_dict:
            continue
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterLoadError(
                f"Shape mismatch for {key} in {source}: the file has {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}. Was the adapter trained on a different base model "
                "or with another rank?"
            )
        with torch.no_grad():
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


# --- files -------------------------------------------------------------------------------------
def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def save_tensors(directory: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> str:
    """Write adapter weights atomically: safetensors, or peft's legacy .bin when asked."""
    # safetensors refuses tensors that share storage (tied weights, views): store independent copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        path = os.path.join(directory, WEIGHTS_NAME)
        _atomic_write(path, lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))
    else:
        path = os.path.join(directory, LEGACY_WEIGHTS_NAME)
        _atomic_write(path, lambda tmp: torch.save(plain, tmp))
    return path


def load_adapter_weights(directory: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read adapter_model.safetensors, or else adapter_model.bin without unpickling arbitrary objects."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path), path
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterLoadError(
                f"{path} is not a readable safetensors file ({err}). It is truncated or corrupted: "
                "save or download the adapter again."
            ) from err
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True), legacy
        except Exception as err:
            raise AdapterLoadError(
                f"{legacy} could not be read as a plain tensor file ({err}). deltatune never unpickles "
                "arbitrary objects; convert the file to safetensors with a tool you trust."
            ) from err
    raise FileNotFoundError(f"No {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {directory!r}.")
