"""Quantized base models: which library quantized a layer, and what the adapter layers need from it.

Backends plug in through an ordered chain of small dispatch functions, one file per library, imported only
when that library is: a module can only be quantized by a library that has been imported, so a model without
quantized layers never pays for (or needs) bitsandbytes or torchao. Each backend describes its layers to the
rest of deltatune through `QuantizedBackend`: shape, dequantize, requantize. `deltatune.quantized.layers` builds
merging on that for any method's layer; the methods' quantized layers live in their folders (they call
`backend_for` to tell a quantized linear layer from a plain one).

Nothing here imports bitsandbytes or torchao at import time, and nothing in this package knows a method or the
model wrapper.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

# (package that must already be imported, the deltatune file with its `dispatch` function), tried in order.
DISPATCH_CHAIN: tuple[tuple[str, str], ...] = (
    ("bitsandbytes", "deltatune.quantized.bnb"),
    ("torchao", "deltatune.quantized.torchao"),
)


class RequantizationWarning(UserWarning):
    """Merging into a quantized layer re-quantized it: the merged weights were rounded again."""


class QuantizedBackend:
    """What deltatune needs to know about one library's quantized linear layers. Backends are classes used
    through their classmethods (never instantiated), so a layer can hold one and still be deep-copied."""

    name: ClassVar[str]

    @classmethod
    def describe(cls, module: nn.Module) -> str:
        """A short human name of the layer's quantization, for messages ("bitsandbytes 4-bit nf4")."""
        return cls.name

    @classmethod
    def features(cls, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the layer: a packed weight's shape does not tell them."""
        return module.in_features, module.out_features

    @classmethod
    @abstractmethod
    def dequantize(cls, module: nn.Module) -> torch.Tensor:
        """The weight as a new float32 (out, in) tensor on the weight's device."""
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def requantize(cls, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize `weight` (float, (out, in)) as the layer's current weight was, and store it in the layer."""
        raise NotImplementedError

    @classmethod
    def snapshot(cls, module: nn.Module) -> Any:
        """What `restore` needs to put the layer's current quantized weight back exactly."""
        return module.weight

    @classmethod
    def restore(cls, module: nn.Module, snapshot: Any) -> None:
        module.weight = snapshot

    @classmethod
    def original_dtype(cls, module: nn.Module) -> torch.dtype | None:
        """The dtype the weight had before quantization, when the layer records it."""
        return None

    @classmethod
    def state_tensors(cls, module: nn.Module) -> list[torch.Tensor]:
        """Quantization state held outside parameters and buffers (scales kept on the weight object)."""
        return []

    @classmethod
    def keep_differentiable(cls, module: nn.Module) -> None:
        """Keep the layer on a kernel gradients flow through (nothing to do for most libraries)."""


def backend_for(module: nn.Module) -> type[QuantizedBackend] | None:
    """The backend whose quantized linear layer `module` is, or None for anything else (plain layers too)."""
    for package, path in DISPATCH_CHAIN:
        if sys.modules.get(package) is None:  # never imported (or blocked): it quantized nothing here
            continue
        backend = importlib.import_module(path).dispatch(module)
        if backend is not None:
            return backend
    return None


def keep_differentiable(model: nn.Module) -> None:
    """Keep every quantized layer of `model` on a kernel gradients flow through (see the backends'
    keep_differentiable), whether the adapter trains or not: the same adapter then computes the same numbers
    loaded for inference as while it trained."""
    for module in model.modules():
        backend = backend_for(module)
        if backend is not None:
            backend.keep_differentiable(module)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, a quantized weight counted by the values it stands for (a packed 4-bit weight holds
    two per byte), so the total matches the full-precision model's, as peft counts it."""
    logical = {}
    for module in model.modules():
        backend = backend_for(module)
        if backend is not None:
            in_features, out_features = backend.features(module)
            logical[id(module.weight)] = in_features * out_features
    return sum(logical.get(id(p), p.numel()) for p in model.parameters())


# --- merging ----------------------------------------------------------------------------------------------
def warn_requantization(model: nn.Module, action: str = "merging") -> None:
    """One warning for every quantized layer that `action` just re-quantized, with the measured rounding error.

    Layers record the error of their last re-quantization (`requantization_error`); this reads and clears them.
    """
    errors: dict[str, float] = {}
    for name, module in model.named_modules():
        error = getattr(module, "requantization_error", None)
        if error is not None:
            errors[name] = error
            module.requantization_error = None
    if not errors:
        return
    worst = max(errors, key=errors.__getitem__)
    kinds = sorted({module.backend.describe(module.base_layer) for name, module in model.named_modules()
                    if name in errors and module.backend is not None})
    warnings.warn(
        f"{action} re-quantized {len(errors)} {'/'.join(kinds) or 'quantized'} layer(s): rounding moved the weights "
        f"by up to {errors[worst]:.3g} (max abs difference from the exact merged weights, in {worst}), so outputs "
        "differ slightly from the unmerged model. merge_and_unload(dequantize=True) writes full-precision "
        "weights instead.",
        RequantizationWarning,
        stacklevel=4,
    )


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear layer of `model` (adapter layers' base layers included) by an nn.Linear
    holding its dequantized weight, in `dtype` (default: the dtype the weight had before quantization where the
    layer records it, else the model config's dtype, else float32), and drop transformers' quantization markers
    so that `save_pretrained` writes a plain full-precision model. In place; returns the model."""
    from deltatune.quantized.layers import QuantizedLayer

    fallback = config_dtype(model)
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix) for prefix in done):
            continue
        if isinstance(module, QuantizedLayer):
            if module.backend is not None:
                module.dequantize_base(dtype or module.backend.original_dtype(module.base_layer) or fallback)
            done.append(f"{name}.")
            continue
        backend = backend_for(module)
        if backend is not None:
            dense = dense_linear(module, backend, dtype or backend.original_dtype(module) or fallback)
            _replace(model, name, dense)
            done.append(f"{name}.")
    _drop_quantization_markers(model)
    return model


def dense_linear(module: nn.Module, backend: type[QuantizedBackend], dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear with the dequantized weight (and the bias) of a quantized linear layer."""
    weight = backend.dequantize(module)
    in_features, out_features = backend.features(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=dtype), requires_grad=False)
    return linear


def config_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model config records for its weights (float32 when it records none)."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _drop_quantization_markers(model: nn.Module) -> None:
    """What transformers sets on a model it quantized, removed with its quantizer's own method where it has one."""
    for module in model.modules():
        quantizer = getattr(module, "hf_quantizer", None)
        remove: Callable[[nn.Module], None] | None = getattr(quantizer, "remove_quantization_config", None)
        if remove is not None:
            remove(module)
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
            if flag in vars(module):
                delattr(module, flag)


__all__ = [
    "DISPATCH_CHAIN",
    "QuantizedBackend",
    "RequantizationWarning",
    "backend_for",
    "dequantize_model",
    "parameter_count",
    "warn_requantization",
]
