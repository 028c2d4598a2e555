"""The bottleneck adapter layer: wraps a whole block and adds down-projection, non-linearity, up-projection.

The wrapped block keeps its own call signature and output structure: when it returns a tuple (attention
blocks return their attention weights too) only the first element, the hidden states, is adapted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from deltatune.layers import AdapterLayer, adapter_dtype
from deltatune.methods.bottleneck.config import NON_LINEARITIES, BottleneckConfig

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED_TYPES = (nn.Linear, Conv1D, *CONV_TYPES)
HIDDEN_SIZE_ATTRIBUTES = ("hidden_size", "hidden_dim", "embed_dim", "d_model")


@dataclass(frozen=True)
class Widths:
    """Feature widths of a block's input and output, and the axis that holds them (-1, or 1 for convs)."""

    in_features: int
    out_features: int
    in_axis: int = -1
    out_axis: int = -1


def block_widths(module: nn.Module) -> Widths | None:
    """The widths a bottleneck adapter around `module` works in; None when they cannot be told (an error when its
    layers disagree on the channel axis).

    A linear or convolution layer tells them by its weights. A transformers block (attention, MLP, MoE)
    records the model's hidden size on itself or a sub-module (`config.hidden_size`, or an attribute such as
    `hidden_dim`), which is safer than guessing from its layers: an MoE block's last linear layer is a gate.
    Any other module: the input of its first and the output of its last linear or convolution layer.
    """
    if isinstance(module, nn.Linear):
        return Widths(module.in_features, module.out_features)
    if isinstance(module, Conv1D):
        return Widths(module.weight.shape[0], module.weight.shape[1])
    if isinstance(module, CONV_TYPES):
        return Widths(module.in_channels, module.out_channels, 1, 1)
    leaves = [m for m in module.modules() if m is not module and isinstance(m, WEIGHTED_TYPES)]
    if len({isinstance(leaf, CONV_TYPES) for leaf in leaves}) > 1:
        # A ConvNext layer: convolutions (channels on axis 1) and linear layers (channels last), permuted between;
        # its layers cannot say on which axis its output carries the channels.
        raise ValueError(
            f"A {type(module).__name__} mixes convolution and linear layers, so the axis its output's channels lie "
            "on cannot be told from them. Target one of its linear or convolution layers instead."
        )
    if leaves:
        first, last = block_widths(leaves[0]), block_widths(leaves[-1])
        layers = Widths(first.in_features, last.out_features, first.in_axis, last.out_axis)
        if layers.in_features == layers.out_features:  # a block that keeps the width: its layers say which
            return layers
    # The recorded size where the layers disagree (an MoE block ends in its gate); a model-wide config.hidden_size
    # is only the last stage's width in a model whose stages widen (Swin), hence the layers first.
    hidden = _recorded_hidden_size(module)
    if hidden is not None:
        return Widths(hidden, hidden)
    return layers if leaves else None


def _recorded_hidden_size(module: nn.Module) -> int | None:
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if isinstance(config, PretrainedConfig) and isinstance(getattr(config, "hidden_size", None), int):
            return config.hidden_size
        for attr in HIDDEN_SIZE_ATTRIBUTES:
            value = getattr(sub, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


class BottleneckLayer(AdapterLayer):
    """out + scaling * up(act(down(h))), h being the block's output (sequential) or its input (parallel)."""

    adapter_param_containers = ("adapter_down", "adapter_up")
    adapter_state_attributes = ("adapter_act", "scaling", "parallel")

    def __init__(self, base_layer: nn.Module, widths: Widths) -> None:
        super().__init__(base_layer)
        self.widths = widths
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.parallel: dict[str, bool] = {}

    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        size = bottleneck_size(config, self.widths.out_features, module_name)
        in_features = self.widths.in_features if config.parallel else self.widths.out_features
        down, up = nn.Linear(in_features, size), nn.Linear(size, self.widths.out_features)
        if config.init_weights:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        reference = next(self.base_layer.parameters(), None)
        if reference is not None:
            down.to(device=reference.device, dtype=adapter_dtype(reference))
            up.to(device=reference.device, dtype=adapter_dtype(reference))
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_act[adapter_name] = NON_LINEARITIES[config.non_linearity]()
        self.scaling[adapter_name] = config.scaling
        self.parallel[adapter_name] = config.parallel

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.use_base_only():
            return output
        hidden = first_element(output)
        for name in self.active_adapters:
            source = block_input(args, kwargs) if self.parallel[name] else hidden
            added = self.adapter_output(name, source)
            if added.shape != hidden.shape:
                raise ValueError(
                    f"A parallel adapter adds a function of a {type(self.base_layer).__name__}'s input to its output, "
                    f"but this block maps shape {tuple(source.shape)} to {tuple(hidden.shape)} (it downsamples). "
                    "Use a sequential placement (houlsby or pfeiffer) there, or target blocks that keep the shape."
                )
            hidden = hidden + added.to(hidden.dtype)
        return with_first_element(output, hidden)

    def adapter_output(self, adapter_name: str, source: torch.Tensor) -> torch.Tensor:
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        axis = self.widths.in_axis if self.parallel[adapter_name] else self.widths.out_axis
        h = source.to(down.weight.dtype).movedim(axis, -1)
        h = up(self.adapter_act[adapter_name](down(h))) * self.scaling[adapter_name]
        return h.movedim(-1, self.widths.out_axis)

    # A non-linear adapter has no weight delta: merging is refused, and there is never anything to unmerge.
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if self._to_merge(adapter_names):
            raise ValueError(
                "Bottleneck adapters are non-linear and cannot be merged into the base weights. Keep the "
                "adapter loaded, or call unload() to get the base model back without it."
            )

    def unmerge(self) -> None:
        pass


def bottleneck_size(config: BottleneckConfig, hidden: int, module_name: str) -> int:
    if config.bottleneck_size is not None:
        return config.bottleneck_size
    if hidden % config.reduction_factor:
        divisors = [d for d in range(2, hidden + 1) if hidden % d == 0][:12]
        raise ValueError(
            f"reduction_factor={config.reduction_factor} does not divide the hidden size {hidden} of "
            f"{module_name}. Pick one that does (divisors of {hidden}: {divisors}), or set bottleneck_size."
        )
    return hidden // config.reduction_factor


def first_element(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        "A bottleneck adapter wraps blocks that return a tensor or a tuple whose first element is the "
        f"hidden states; this one returned {type(output).__name__}. Target another module."
    )


def with_first_element(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    if hasattr(output, "_replace"):  # a namedtuple
        return output._replace(**{output._fields[0]: hidden})
    return type(output)([hidden, *output[1:]])


def block_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block was called with: its first positional argument, or `hidden_states=`."""
    source = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(source, torch.Tensor):
        raise TypeError(
            "A parallel bottleneck adapter reads the block's input, but this block was called without a "
            "tensor as first argument or hidden_states=. Use a sequential placement ('houlsby', 'pfeiffer')."
        )
    return source


def create_bottleneck_layer(target: nn.Module, adapter_name: str, config: BottleneckConfig, module_name: str):
    """Wrap `target` (or add an adapter to an existing bottleneck layer)."""
    if isinstance(target, BottleneckLayer):
        layer = target
    else:
        if isinstance(target, nn.ModuleList | nn.ModuleDict):
            raise ValueError(
                f"{module_name} is a {type(target).__name__}, a container without a forward of its own; "
                "target the blocks inside it (e.g. their attention or feed-forward sub-modules) instead."
            )
        widths = block_widths(target)
        if widths is None:
            raise ValueError(
                f"Cannot tell the hidden size of {module_name} ({type(target).__name__}): it holds no linear "
                "or convolution layer and records no hidden size. Target a block that does, e.g. an MLP."
            )
        layer = BottleneckLayer(target, widths)
    layer.update_layer(adapter_name, config, module_name)
    return layer
