"""What every injected adapter layer shares: a frozen base layer, named adapters, activation, merging.

A method's layer subclasses `AdapterLayer`, declares which attributes hold per-adapter state, and writes
`update_layer`, `delta_weight` and `forward`. Everything that walks the model (trainability, the
checkpoint key mapping, deleting an adapter) reads those declarations, never parameter names.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class AdapterLayer(nn.Module):
    # Attributes (nn.ModuleDict / nn.ParameterDict keyed by adapter name) that hold trainable parameters.
    adapter_param_containers: tuple[str, ...] = ()
    # Other per-adapter attributes (plain dicts or ModuleDicts without parameters), removed on delete.
    adapter_state_attributes: tuple[str, ...] = ()
    # The base layer's parameter that `delta_weight` changes when merging (BitFit changes the bias).
    merged_parameter: str = "weight"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # --- bookkeeping ----------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_param_containers[0]).keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # Model code reads these on the layers it owns (T5 checks `wo.weight.dtype`): answer for the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(suffix, parameter) pairs of one adapter; the suffix is the checkpoint key without the adapter."""
        for container_name in self.adapter_param_containers:
            container = getattr(self, container_name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter):
                yield container_name, item
            else:
                for name, param in item.named_parameters():
                    yield f"{container_name}.{name}", param

    def saved_parameters(self, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(suffix, tensor) pairs that save writes for one adapter. The live parameters, detached, unless a
        layer holds them in another shape than the adapter's file has (LoRA factors padded for hot-swapping)."""
        for suffix, param in self.adapter_parameters(adapter_name):
            yield suffix, param.detach()

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [name for name in adapter_names if name in self.adapter_names]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights: unmerge it first.")
        for attr in self.adapter_param_containers + self.adapter_state_attributes:
            container = getattr(self, attr)
            if adapter_name in container:  # ModuleDict.pop takes no default
                del container[adapter_name]
        self.active_adapters = [name for name in self.active_adapters if name != adapter_name]

    # --- merging --------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change this adapter makes to the base layer's `merged_parameter`, in that tensor's layout."""
        raise NotImplementedError(f"{type(self).__name__} does not support merging")

    def _to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = adapter_names if adapter_names is not None else self.active_adapters
        return [name for name in names if name not in self.merged_adapters and name in self.adapter_names]

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise ValueError if merging would write NaN or inf into the base layer.

        safe_merge runs this on every layer before it changes any, so a refused merge leaves the whole model as
        it was. Layers that override `merge` do their own check there.
        """
        if type(self).merge is not AdapterLayer.merge:
            return
        weight = getattr(self.base_layer, self.merged_parameter)
        merged = weight.data
        for name in self._to_merge(adapter_names):
            merged = self.merged_weight(name, merged)
            if not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging adapter {name!r} would write NaN or inf into the base weights; "
                    "nothing was changed."
                )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self.check_merge(adapter_names)
        weight = getattr(self.base_layer, self.merged_parameter)
        for name in self._to_merge(adapter_names):
            weight.data = self.merged_weight(name, weight.data)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = getattr(self.base_layer, self.merged_parameter)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = self.unmerged_weight(name, weight.data)

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` with the adapter merged in, as a new tensor. Adding `delta_weight` unless a method (LoRA's
        DoRA variant) rescales as well."""
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of `merged_weight`."""
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    def use_base_only(self) -> bool:
        """True when forward must return the base layer's output alone (disabled, or already merged)."""
        return self.disabled or self.merged or not self.active_adapters


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 beside a half-precision or quantized (integer-stored) base, as peft does;
    otherwise in the base's dtype."""
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype


def modules_of_type(model: nn.Module, kind: type[M] | tuple[type, ...]) -> Iterator[tuple[str, M]]:
    """(name, module) of every `kind` in `model`, in named_modules() order, without descending into adapter
    layers (adapters never nest). Their adapter containers hold most of a model's modules, so this is what
    keeps per-call walks (mixed-adapter batches, disable_adapter) cheap beside named_modules()."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, kind):
            yield name, module
        if isinstance(module, AdapterLayer):
            continue
        children = module._modules.items()
        stack.extend((f"{name}.{child_name}" if name else child_name, child)
                     for child_name, child in reversed(children) if child is not None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    return modules_of_type(model, AdapterLayer)


def check_fan_in_fan_out(target: nn.Module, fan_in_fan_out: bool, module_name: str) -> None:
    """Warn when the config's weight layout disagrees with the layer's: the layer's own layout is used."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(target, Conv1D) != fan_in_fan_out:
        warnings.warn(
            f"{module_name}: fan_in_fan_out={fan_in_fan_out} does not fit a {type(target).__name__} layer; "
            "using the layer's own weight layout.",
            stacklevel=4,
        )
