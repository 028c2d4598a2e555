"""(IA)^3 layers for Linear, GPT-2 Conv1D, Conv2d and Conv3d base layers.

Each adapter is one vector `ia3_l`, shaped as in peft's files: (out, 1) scaling a linear layer's output,
(1, in) scaling a feedforward layer's input, (1, channels, 1, ...) for convolutions. Merging multiplies it
into the base weight (and, for output scaling, the bias), so it replaces the additive merge of AdapterLayer.
"""

from __future__ import annotations

import re
from abc import abstractmethod

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.layers import AdapterLayer, adapter_dtype, check_fan_in_fan_out
from deltatune.methods.ia3.config import IA3Config
from deltatune.quantized import QuantizedBackend, backend_for
from deltatune.quantized.layers import QuantizedLayer


class IA3Layer(AdapterLayer):
    adapter_param_containers = ("ia3_l",)
    adapter_state_attributes = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        # Per adapter, so two adapters on one layer may scale different sides of it.
        self.is_feedforward: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, is_feedforward: bool, init_ia3_weights: bool) -> None:
        self.is_feedforward[adapter_name] = is_feedforward
        vector = torch.randn(self._vector_shape(is_feedforward))
        if init_ia3_weights:
            nn.init.ones_(vector)
        weight = self.base_layer.weight
        self.ia3_l[adapter_name] = nn.Parameter(vector.to(device=weight.device, dtype=adapter_dtype(weight)))

    # --- what each base layer type defines ---------------------------------------------------------
    @abstractmethod
    def _vector_shape(self, is_feedforward: bool) -> tuple[int, ...]:
        raise NotImplementedError

    @abstractmethod
    def _activation_scale(self, vector: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply the layer's input or output."""
        raise NotImplementedError

    @abstractmethod
    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to multiply the base weight."""
        raise NotImplementedError

    # --- forward ------------------------------------------------------------------------------------
    def _scale(self, feedforward: bool) -> torch.Tensor | None:
        """Product of the active adapters' vectors on one side of the layer; None when there are none."""
        scale = None
        for name in self.active_adapters:
            if self.is_feedforward[name] == feedforward:
                vector = self._activation_scale(self.ia3_l[name])
                scale = vector if scale is None else scale * vector
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.use_base_only():
            return self.base_layer(x, *args, **kwargs)
        input_scale = self._scale(feedforward=True)
        if input_scale is not None:
            x = (x.to(input_scale.dtype) * input_scale).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        output_scale = self._scale(feedforward=False)
        if output_scale is not None:
            result = (result * output_scale).to(result.dtype)
        return result

    # --- merging ------------------------------------------------------------------------------------
    def _scaled_base(self, adapter_name: str, divide: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Base weight and bias with the adapter multiplied in (or divided out); the bias only on output."""
        weight_scale = self._weight_scale(adapter_name)
        bias_scale = self.ia3_l[adapter_name].detach().flatten()
        if divide:  # a zero entry cannot be divided out: leave those rows as the merge left them
            weight_scale = torch.where(weight_scale == 0, 1.0, weight_scale)
            bias_scale = torch.where(bias_scale == 0, 1.0, bias_scale)
        weight = self.base_layer.weight
        weight_op = torch.div if divide else torch.mul
        new_weight = weight_op(weight.data, weight_scale).to(weight.dtype)
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or self.is_feedforward[adapter_name]:
            return new_weight, None
        return new_weight, weight_op(bias.data, bias_scale).to(bias.dtype)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        for name in self._to_merge(adapter_names):
            merged = self._scaled_base(name, divide=False)
            if not all(torch.isfinite(t).all() for t in merged if t is not None):
                raise ValueError(
                    f"Merging adapter {name!r} would write NaN or inf into the base weights; "
                    "nothing was changed."
                )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self.check_merge(adapter_names)
        for name in self._to_merge(adapter_names):
            weight, bias = self._scaled_base(name, divide=False)
            self.base_layer.weight.data = weight
            if bias is not None:
                self.base_layer.bias.data = bias
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Divide the vectors back out: exact up to float rounding, except where a vector entry is zero."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight, bias = self._scaled_base(name, divide=True)
            self.base_layer.weight.data = weight
            if bias is not None:
                self.base_layer.bias.data = bias


class IA3Linear(IA3Layer):
    """(IA)^3 on nn.Linear, or on transformers' Conv1D whose weight is stored (in, out): fan_in_fan_out."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]

    def _vector_shape(self, is_feedforward: bool) -> tuple[int, ...]:
        return (1, self.in_features) if is_feedforward else (self.out_features, 1)

    @abstractmethod
    def _activation_scale(self, vector: torch.Tensor) -> torch.Tensor:
        return vector.flatten()

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        # (out, 1) scales the rows of an (out, in) weight, (1, in) its columns; Conv1D stores the transpose.
        vector = self.ia3_l[adapter_name].detach()
        return vector.T if self.fan_in_fan_out else vector


class IA3Conv(IA3Layer):
    """(IA)^3 on nn.Conv2d / nn.Conv3d: one factor per channel."""

    def _vector_shape(self, is_feedforward: bool) -> tuple[int, ...]:
        base = self.base_layer
        channels = base.in_channels if is_feedforward else base.out_channels
        return (1, channels) + (1,) * len(base.kernel_size)

    @abstractmethod
    def _activation_scale(self, vector: torch.Tensor) -> torch.Tensor:
        return vector

    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        vector = self.ia3_l[adapter_name].detach()
        if not self.is_feedforward[adapter_name]:
            return vector.transpose(0, 1)  # (out, 1, k...): one factor per output channel
        base = self.base_layer
        if base.groups == 1:
            return vector  # (1, in, k...): one factor per input channel
        # Grouped: the weight is (out, in / groups, k...), each output channel reading its group's inputs.
        in_per_group, out_per_group = base.in_channels // base.groups, base.out_channels // base.groups
        grouped = vector.reshape(base.groups, 1, in_per_group, *vector.shape[2:])
        grouped = grouped.expand(base.groups, out_per_group, in_per_group, *vector.shape[2:])
        return grouped.reshape(base.out_channels, in_per_group, *vector.shape[2:])


class QuantizedIA3Linear(QuantizedLayer, IA3Linear):
    """IA3 on a quantized linear layer: merging scales the dequantized weight and re-quantizes it."""

    def __init__(self, base_layer: nn.Module, backend: type[QuantizedBackend]) -> None:
        IA3Layer.__init__(self, base_layer)  # not IA3Linear's: it reads the shape off the (packed) weight
        self._init_quantized(base_layer, backend)

    def _merge_into(self, names: list[str], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        base_bias = getattr(self.base_layer, "bias", None)
        bias = None if base_bias is None else base_bias.detach().float()
        for name in names:
            weight = weight * self._weight_scale(name).float()
            if bias is not None and not self.is_feedforward[name]:
                bias = bias * self.ia3_l[name].detach().flatten().float()
        return weight, bias


def is_feedforward(feedforward_modules: list[str] | str | None, module_name: str) -> bool:
    """peft's rule, kept exactly so both libraries give a layer the same vector shape: a regex is fully
    matched against the module's name; list entries match by plain string suffix."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module_name) is not None
    return any(module_name.endswith(key) for key in feedforward_modules or [])


def create_ia3_layer(target: nn.Module, adapter_name: str, config: IA3Config, module_name: str):
    """Wrap `target` (or add an adapter to an existing IA3 layer); None if the module type is unsupported."""
    if isinstance(target, IA3Layer):
        layer = target
    elif (backend := backend_for(target)) is not None:  # before nn.Linear: quantized layers subclass it
        layer = QuantizedIA3Linear(target, backend)
    elif isinstance(target, nn.Linear | Conv1D):
        check_fan_in_fan_out(target, config.fan_in_fan_out, module_name)
        layer = IA3Linear(target)
    elif isinstance(target, nn.Conv2d | nn.Conv3d):
        layer = IA3Conv(target)
    else:
        return None
    layer.update_layer(
        adapter_name,
        is_feedforward=is_feedforward(config.feedforward_modules, module_name),
        init_ia3_weights=config.init_ia3_weights,
    )
    return layer
