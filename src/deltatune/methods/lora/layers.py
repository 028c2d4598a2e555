"""LoRA layers for Linear, GPT-2 Conv1D, Embedding, Conv1d, Conv2d and Conv3d base layers.

Parameter layout and names follow peft (lora_A / lora_B modules, lora_embedding_A / _B parameters, DoRA's
lora_magnitude_vector), so state-dict keys map one to one onto peft's adapter files. Variants such as DoRA
live in their own files and are looked up per adapter in `lora_variant`. `QuantizedLoraLinear` is the Linear
layer on a bitsandbytes / torchao base (merging through `deltatune.quantized.layers`).
"""

from __future__ import annotations

import math
import re
from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.layers import AdapterLayer, adapter_dtype, check_fan_in_fan_out
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.dora import DoraConv, DoraEmbedding, DoraLinear, LoraVariant
from deltatune.methods.lora.fast_path import fast_forward
from deltatune.methods.lora.init import init_from_base_weight, mutates_base
from deltatune.methods.lora.mixed_batch import mixed_forward
from deltatune.quantized import QuantizedBackend, backend_for
from deltatune.quantized.layers import QuantizedLayer


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def add_scaled_product(result: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, scaling: float | torch.Tensor
                       ) -> torch.Tensor:
    """result + scaling * h @ weight.T in h's dtype, as one addmm over the flattened rows: the product is
    accumulated into the output instead of written, scaled and added in three passes over an output-sized tensor."""
    if torch.is_tensor(scaling):  # hot-swap keeps scaling as a tensor; scale the rank-sized operand instead
        h, scaling = h * scaling, 1
    out = torch.addmm(result.reshape(-1, result.shape[-1]).to(h.dtype), h.reshape(-1, h.shape[-1]), weight.T,
                      alpha=scaling)
    return out.view(result.shape)


class LoraLayer(AdapterLayer):
    adapter_param_containers = ("lora_A", "lora_B", "lora_magnitude_vector")
    adapter_state_attributes = ("lora_dropout", "scaling", "r", "lora_alpha", "lora_variant")
    dora_variant: ClassVar[LoraVariant]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA's per-adapter state
        # Adapters that are not plain LoRA: the forward looks each adapter up here once.
        self.lora_variant: dict[str, LoraVariant] = {}

    def update_layer(
        self, adapter_name: str, r: int, alpha: float, dropout: float, init: bool | str, use_rslora: bool,
        use_dora: bool = False,
    ) -> None:
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._create_factors(adapter_name, r)
        self._init_factors(adapter_name, init)
        weight = self.base_layer.weight
        for _, param in self.adapter_parameters(adapter_name):
            param.data = param.data.to(device=weight.device, dtype=adapter_dtype(weight))
        self.lora_variant.pop(adapter_name, None)
        if adapter_name in self.lora_magnitude_vector:  # ModuleDict.pop takes no default
            del self.lora_magnitude_vector[adapter_name]
        if use_dora:
            self.lora_variant[adapter_name] = self.dora_variant
            self.dora_variant.init(self, adapter_name)

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[str, nn.Parameter]]:
        # peft saves the DoRA magnitude (a module's `weight`, like its live name) under the container name alone.
        for suffix, param in super().adapter_parameters(adapter_name):
            yield ("lora_magnitude_vector" if suffix == "lora_magnitude_vector.weight" else suffix), param

    def saved_parameters(self, adapter_name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The factors cut back to the adapter's rank `r`: hot-swapping may hold them zero-padded to a larger rank
        (see hotswap.py), and the file must fit the config. r == 0 (a hot-swapped adapter that leaves this layer
        out) writes nothing, as the adapter's own file has nothing for it."""
        r = self.r.get(adapter_name)
        if r == 0:
            return
        for suffix, tensor in super().saved_parameters(adapter_name):
            if suffix.startswith(("lora_A.", "lora_embedding_A")):
                tensor = tensor[:r]
            elif suffix.startswith(("lora_B.", "lora_embedding_B")):
                tensor = tensor[:, :r]
            yield suffix, tensor

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().merged_weight(adapter_name, weight)
        return variant.merged_weight(self, adapter_name, weight)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        variant = self.lora_variant.get(adapter_name)
        if variant is None:
            return super().unmerged_weight(adapter_name, weight)
        return variant.unmerged_weight(self, adapter_name, weight)

    @abstractmethod
    def _create_factors(self, adapter_name: str, r: int) -> None:
        raise NotImplementedError

    def _init_factors(self, adapter_name: str, init: bool | str) -> None:
        # init=False keeps the factors' default (kaiming) init: a non-identity adapter, drawn as peft draws it.
        if init is False:
            return
        if mutates_base(init):
            init_from_base_weight(self, adapter_name, init)
            return
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, or on transformers' Conv1D whose weight is stored (in, out): fan_in_fan_out."""

    dora_variant = DoraLinear()
    # Whether a single plain adapter may run through fast_path.py (where fast_forward says it can).
    fast_path: ClassVar[bool] = True
    # (adapter names, {batch size: per-row index tensor}, stacks or None) while a mixed-adapter batch runs; see
    # mixed_batch.py.
    mixed_rows: tuple[tuple[str, ...], dict[int, torch.Tensor], tuple[torch.Tensor, ...] | None] | None = None

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape if self.fan_in_fan_out else weight.shape[::-1]

    def _create_factors(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight
        delta = delta * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters
        if (self.fast_path and len(active) == 1 and self.mixed_rows is None and not args and not kwargs
                and not self.use_base_only() and active[0] not in self.lora_variant):
            out = fast_forward(self, active[0], x)
            if out is not None:
                return out
        result = self.base_layer(x, *args, **kwargs)
        if self.mixed_rows is not None:
            return mixed_forward(self, x, result)
        if self.use_base_only():
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            variant = self.lora_variant.get(name)
            if variant is not None:
                result = variant.forward(self, name, x, result)
                continue
            lora_A = self.lora_A[name]
            h = lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype)))
            result = add_scaled_product(result, h, self.lora_B[name].weight, self.scaling[name])
        return result if result.dtype == dtype else result.to(dtype)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A is (r, num_embeddings) and is looked up like an embedding table."""

    adapter_param_containers = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    dora_variant = DoraEmbedding()

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        # The magnitudes are registered again after the factors, so that parameters() lists them in peft's order:
        # an optimizer's state then moves between the libraries slot by slot.
        magnitude = self._modules.pop("lora_magnitude_vector")
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = magnitude

    def _create_factors(self, adapter_name: str, r: int) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))

    def _init_factors(self, adapter_name: str, init: bool | str) -> None:
        # Every other init (PiSSA and OLoRA included, as in peft) is the standard one for embeddings.
        if init is not False:
            nn.init.zeros_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.lora_embedding_B[adapter_name] @ self.lora_embedding_A[adapter_name]
        return delta.T * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.use_base_only():
            return result
        base, dtype = self.base_layer, result.dtype
        for name in self.active_adapters:
            variant = self.lora_variant.get(name)
            if variant is not None:
                result = variant.forward(self, name, x, result)
                continue
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type,
                                  base.scale_grad_by_freq, base.sparse)
            result = result + (after_a @ b.T) * self.scaling[name]  # in the adapter's dtype: rounded once below
        return result.to(dtype)


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base's kernel, B a 1x1 conv."""

    dora_variant = DoraConv()

    def __init__(self, base_layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(base_layer)

    def update_layer(self, adapter_name: str, r: int, alpha: float, dropout: float, init: bool | str,
                     use_rslora: bool, use_dora: bool = False) -> None:
        groups = self.base_layer.groups
        if groups > 1 and (r % groups or use_dora):
            what = "DoRA" if use_dora else f"rank {r}, which groups={groups} does not divide"
            raise ValueError(
                f"LoRA on a grouped convolution (groups={groups}) needs a rank divisible by the groups and no DoRA "
                f"(as in peft); got {what}. Pick another rank for it (rank_pattern) or leave it out of target_modules."
            )
        super().update_layer(adapter_name, r, alpha, dropout, init, use_rslora, use_dora)

    def _create_factors(self, adapter_name: str, r: int) -> None:
        # On a grouped convolution (a depthwise one, say), B is grouped like the base and A reads every input
        # channel, as in peft: each group of output channels gets r / groups of the rank.
        base = self.base_layer
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        self.lora_A[adapter_name] = conv(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
        )
        self.lora_B[adapter_name] = conv(r, base.out_channels, ones, ones, groups=base.groups, bias=False)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        if self.base_layer.groups > 1:  # A reads every input channel: no kernel of the base's grouped shape holds it
            raise ValueError(f"LoRA on a grouped convolution (groups={self.base_layer.groups}) cannot be merged "
                             "into its weights, as in peft; keep the adapter unmerged.")
        # B is pointwise, so the composed kernel is B applied to A at every kernel position.
        b = self.lora_B[adapter_name].weight.flatten(1)
        delta = torch.einsum("or,r...->o...", b, self.lora_A[adapter_name].weight)
        return delta * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.use_base_only():
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            variant = self.lora_variant.get(name)
            if variant is not None:
                result = variant.forward(self, name, x, result)
                continue
            lora_A = self.lora_A[name]
            h = self.lora_dropout[name](x.to(lora_A.weight.dtype))
            result = result + self.lora_B[name](lora_A(h)) * self.scaling[name]  # in the adapter's dtype
        return result.to(dtype)


class QuantizedLoraLinear(QuantizedLayer, LoraLinear):
    """LoRA on a quantized linear layer (bitsandbytes, torchao): merging goes through dequantize / requantize."""

    fast_path = False  # the base output comes from the quantized module's own forward

    def __init__(self, base_layer: nn.Module, backend: type[QuantizedBackend]) -> None:
        LoraLayer.__init__(self, base_layer)  # not LoraLinear's: it reads the shape off the (packed) weight
        self._init_quantized(base_layer, backend)

    def update_layer(self, adapter_name: str, *args, **kwargs) -> None:
        use_dora, init = kwargs.get("use_dora", False), kwargs.get("init", True)
        what = "DoRA (use_dora=True)" if use_dora else f"init_lora_weights={init!r}" if mutates_base(init) else None
        if what is not None and self.backend is not None:
            raise ValueError(
                f"{what} reads and rewrites the base weight, which deltatune does not support on a "
                f"{self.backend.describe(self.base_layer)} layer yet. Drop that option, or load the base model "
                "without quantization."
            )
        super().update_layer(adapter_name, *args, **kwargs)

    def _merge_into(self, names: list[str], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        for name in names:
            weight = self.merged_weight(name, weight)
        return weight, None


def pattern_value(patterns: dict, module_name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def create_lora_layer(target: nn.Module, adapter_name: str, config: LoraConfig, module_name: str):
    """Wrap `target` (or add an adapter to an existing LoRA layer); None if the module type is unsupported."""
    if isinstance(target, LoraLayer):
        layer = target
    elif (backend := backend_for(target)) is not None:  # before nn.Linear: quantized layers subclass it
        layer = QuantizedLoraLinear(target, backend)
    elif isinstance(target, nn.Linear | Conv1D):
        check_fan_in_fan_out(target, config.fan_in_fan_out, module_name)
        layer = LoraLinear(target)
    elif isinstance(target, nn.Embedding):
        layer = LoraEmbedding(target)
    elif isinstance(target, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        layer = LoraConv(target)
    else:
        return None
    layer.update_layer(
        adapter_name,
        r=pattern_value(config.rank_pattern, module_name, config.r),
        alpha=pattern_value(config.alpha_pattern, module_name, config.lora_alpha),
        dropout=config.lora_dropout,
        init=config.init_lora_weights,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )
    return layer
