"""BitFit layer: a trainable per-adapter delta on the frozen base layer's bias.

The base layer runs with `bias + delta` in place of its bias (through torch.func.functional_call), so any
layer type works whatever axis its bias broadcasts over, and a fresh all-zero delta leaves every output
bit-identical. Merging adds the delta into the bias (AdapterLayer's additive merge on `merged_parameter`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from deltatune.layers import AdapterLayer, adapter_dtype
from deltatune.methods.bitfit.config import BitFitConfig, has_bias


class BitFitLayer(AdapterLayer):
    adapter_param_containers = ("bias_delta",)
    merged_parameter = "bias"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bias_delta = nn.ParameterDict()

    def update_layer(self, adapter_name: str) -> None:
        bias = self.base_layer.bias
        self.bias_delta[adapter_name] = nn.Parameter(torch.zeros_like(bias, dtype=adapter_dtype(bias)))

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.bias_delta[adapter_name].detach()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.use_base_only():
            return self.base_layer(x, *args, **kwargs)
        base_bias = self.base_layer.bias
        bias = base_bias
        for name in self.active_adapters:
            bias = bias + self.bias_delta[name]
        return functional_call(self.base_layer, {"bias": bias.to(base_bias.dtype)}, (x, *args), kwargs)


def create_bitfit_layer(target: nn.Module, adapter_name: str, config: BitFitConfig, module_name: str):
    """Wrap `target` (or add an adapter to an existing layer); a module without a bias is returned as is, and so
    is one whose submodules have biases of their own (BERT's prediction head, whose bias is its decoder's): those
    are wrapped instead, since adapter layers do not nest."""
    if isinstance(target, BitFitLayer):
        layer = target
    elif has_bias(target) and not any(has_bias(m) for m in target.modules() if m is not target):
        layer = BitFitLayer(target)
    else:
        return target
    layer.update_layer(adapter_name)
    return layer
