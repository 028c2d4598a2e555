"""DoRA (weight-decomposed LoRA, https://arxiv.org/abs/2402.09353): W' = m * (W + s B A) / ||W + s B A||.

The norm is taken per output feature (per row of W for Linear and Conv, per embedding dimension for Embedding)
and is treated as a constant in the backward pass, as the paper (section 4.3) and peft do. The trainable
magnitude m starts at that norm, so a new adapter changes the layer exactly as its plain LoRA would. Files
and live parameter names match peft's: `lora_magnitude_vector.<adapter>.weight` in the model,
`lora_magnitude_vector` in adapter files.

Variants are kept out of the plain LoRA forward: a LoRA layer maps adapter names to a `LoraVariant` in
`lora_variant`, and its forward pays one dict lookup per adapter to learn that an adapter is plain.

Cost. The forward never builds W + s B A: the base output is rescaled instead, with the LoRA branch fused into
one addmm, out = g * (W x + s B A x) + (1 - g) * bias with g = m / ||W + s B A||. The norm needs one full copy
of the weight, so it is computed once and cached on the adapter (derived.py): it is recomputed after each
optimizer step or other change to W, A, B or the scaling, and reused by the micro-batches of a
gradient-accumulation step and by activation-checkpointing recomputation. On a GPU a DoRA step of a small model
waits on host time, not kernels (bench/README.md), so the forward also keeps Python lean: on Linear and Conv1D
it reads the factors' weights rather than calling the lora_A / lora_B modules (forward hooks on those do not run
there). Under FSDP, wrap whole decoder layers (as accelerate does), not the adapters' own modules.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.methods.lora.derived import DerivedCache

if TYPE_CHECKING:
    from deltatune.methods.lora.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear

# (W, P, Q, dim): the base weight as a 2-D view W2 with W2 + scaling * P @ Q the adapted weight in the same
# layout, and `dim` the axis the per-feature norm reduces over.
Operands = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


class LoraVariant:
    """How a LoRA variant changes a layer: its forward and its merge. Stateless, one instance per layer type;
    per-adapter state lives in the layer's adapter containers, so it is saved, trained and deleted with them."""

    @abstractmethod
    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        raise NotImplementedError

    @abstractmethod
    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output with this adapter applied on top of `result` (the base and earlier adapters), in the
        adapter's dtype: the layer rounds back to the base's dtype once, after all its adapters, as peft does."""
        raise NotImplementedError

    @abstractmethod
    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @abstractmethod
    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DoraMagnitude(nn.Module):
    """One adapter's magnitude vector (the trainable `weight`, peft's layout) and its cached weight norm."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)
        self.norm_cache = DerivedCache()
        # The norm the adapter was merged with: unmerging needs it, and it cannot be recomputed from merged weights.
        self.merged_norm: torch.Tensor | None = None

    def clear_norm_cache(self) -> None:
        self.norm_cache.clear()


def clear_norm_cache(model: nn.Module) -> None:
    """Forget every cached DoRA norm in `model` (needed only after writes the cache cannot see: derived.py)."""
    for module in model.modules():
        if isinstance(module, DoraMagnitude):
            module.clear_norm_cache()


def _autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast would run W + s B A in half precision, rounding W itself: the norm and merges are exact instead
    (the norm is cached, so a rounded one would outlive the autocast region)."""
    device = tensor.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _plus_low_rank(w2: torch.Tensor, p: torch.Tensor, q: torch.Tensor, scaling: float) -> torch.Tensor:
    """W2 + scaling * P @ Q as one new tensor (the only full-size copy), in the factors' dtype."""
    if w2.dtype == p.dtype:
        return torch.addmm(w2, p, q, alpha=scaling)
    return torch.mm(p, q).mul_(scaling).add_(w2)  # half-precision base beside float32 factors


class _Dora(LoraVariant):
    """What every DoRA layer type shares: the norm, its cache, init and merging. Subclasses say how the adapted
    weight is laid out (`operands`) and write the forward."""

    @abstractmethod
    def operands(self, layer: LoraLayer, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Operands:
        raise NotImplementedError

    def factors(self, layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _entry(layer, "lora_A", adapter_name).weight, _entry(layer, "lora_B", adapter_name).weight

    def _norm_of(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """||weight + s B A|| per output feature, detached (1-D; DoraConv shapes it like its magnitude)."""
        w2, p, q, dim = self.operands(layer, weight, *(factors or self.factors(layer, adapter_name)))
        with _autocast_off(w2):  # detached operands rather than no_grad(): a microsecond less per layer and step
            return torch.linalg.vector_norm(
                _plus_low_rank(w2.detach(), p.detach(), q.detach(), layer.scaling[adapter_name]), dim=dim)

    def weight_norm(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """||W + s B A|| per output feature, detached, in the magnitude's shape; cached until W, A, B or s change."""
        return self._cached_norm(layer, adapter_name, layer.lora_magnitude_vector[adapter_name],
                                 layer.base_layer.weight, self.factors(layer, adapter_name))

    def _cached_norm(self, layer: LoraLayer, adapter_name: str, magnitude: DoraMagnitude, weight: torch.Tensor,
                     factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """weight_norm from the tensors the forward already holds."""
        return magnitude.norm_cache.get_or_compute(
            (weight, *factors), lambda: self._norm_of(layer, adapter_name, weight, factors),
            layer.scaling[adapter_name])

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        layer.lora_magnitude_vector[adapter_name] = DoraMagnitude(
            self._norm_of(layer, adapter_name, layer.base_layer.weight))

    def _unmerged_norm(self, layer: LoraLayer, adapter_name: str) -> torch.Tensor:
        """The norm forward uses: of the base weight without the adapters merged into it so far."""
        if not layer.merged_adapters:
            return self.weight_norm(layer, adapter_name)
        weight = layer.base_layer.weight.detach()
        for name in reversed(layer.merged_adapters):
            weight = layer.unmerged_weight(name, weight)
        return self._norm_of(layer, adapter_name, weight)

    def _factor(self, magnitude: DoraMagnitude, norm: torch.Tensor, dim: int) -> torch.Tensor:
        """m / norm as a column (dim=1) or row (dim=0) that broadcasts over the 2-D weight layout."""
        return (magnitude.weight.detach() / norm).reshape(-1).unsqueeze(dim)

    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        magnitude = layer.lora_magnitude_vector[adapter_name]
        norm = self._unmerged_norm(layer, adapter_name)
        w2, p, q, dim = self.operands(layer, weight, *self.factors(layer, adapter_name))
        with torch.no_grad(), _autocast_off(w2):
            merged = _plus_low_rank(w2, p, q, layer.scaling[adapter_name]).mul_(self._factor(magnitude, norm, dim))
        magnitude.merged_norm = norm
        magnitude.clear_norm_cache()  # the weight's storage is about to be replaced
        return merged.view(weight.shape).to(weight.dtype)

    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        magnitude = layer.lora_magnitude_vector[adapter_name]
        if magnitude.merged_norm is None:
            raise RuntimeError(f"DoRA adapter {adapter_name!r} was never merged into this layer: cannot unmerge it.")
        w2, p, q, dim = self.operands(layer, weight, *self.factors(layer, adapter_name))
        with torch.no_grad(), _autocast_off(w2):
            # weight / g - s P Q, built in one tensor
            unmerged = torch.mm(p, q).mul_(-layer.scaling[adapter_name])
            unmerged.addcdiv_(w2, self._factor(magnitude, magnitude.merged_norm, dim))
        magnitude.clear_norm_cache()
        return unmerged.view(weight.shape).to(weight.dtype)


def _rescaled(z: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, bias_shape: tuple[int, ...]) -> torch.Tensor:
    """g * z + (1 - g) * bias: the base output z (bias included) and the LoRA term rescaled, the bias kept."""
    if bias is None:
        return z * g
    return torch.addcmul(bias.view(bias_shape) * (1 - g), z, g)


def _entry(layer: LoraLayer, container: str, adapter_name: str) -> nn.Module:
    """layer.<container>[adapter_name], read from the modules' dicts: this runs per layer and call, and host time is
    what a DoRA step on a GPU waits for (bench/README.md); Module.__getattr__ and ModuleDict.__getitem__ cost a
    microsecond between them. Read parameters of the entry as attributes: under FSDP it may be a wrapper."""
    return layer._modules[container]._modules[adapter_name]


def _active_dropout(layer: LoraLayer, adapter_name: str) -> nn.Module | None:
    """The adapter's dropout module if it does anything now (training, p > 0), else None."""
    if not layer.training:
        return None
    dropout = _entry(layer, "lora_dropout", adapter_name)
    return None if isinstance(dropout, nn.Identity) else dropout


class DoraLinear(_Dora):
    """nn.Linear (weight (out, in)) and GPT-2's Conv1D (weight (in, out), fan_in_fan_out)."""

    def operands(self, layer: LoraLinear, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Operands:
        return (weight, a.T, b.T, 0) if layer.fan_in_fan_out else (weight, b, a, 1)

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # Host time is what this step waits for on a GPU (see bench/README.md), so each module is looked up once.
        base_layer = layer.base_layer
        factors = a, b = self.factors(layer, adapter_name)
        magnitude = _entry(layer, "lora_magnitude_vector", adapter_name)
        g = magnitude.weight / self._cached_norm(layer, adapter_name, magnitude, base_layer.weight, factors)
        scaling = layer.scaling[adapter_name]
        out_shape = result.shape
        if x.dtype != a.dtype:  # a no-op .to() still costs a dispatch
            x = x.to(a.dtype)
        dropout = _active_dropout(layer, adapter_name)
        if dropout is not None:  # on the input as it comes, so that a seed draws the same mask as peft's
            x = dropout(x)
        # Flat rows from here: a 3-D input would cost lora_A a fold into 2-D and back, and autograd a view node each.
        x = x.reshape(-1, x.shape[-1])
        result = result.reshape(-1, out_shape[-1])
        if result.dtype != x.dtype:
            result = result.to(x.dtype)
        if dropout is not None:
            # As peft: the rescaled base term sees the dropped-out input too, so it needs its own product.
            weight = base_layer.weight.to(x.dtype)
            base = F.linear(x, weight.T if layer.fan_in_fan_out else weight)
            z = torch.addmm(base, F.linear(x, a), b.T, alpha=scaling)
            out = torch.addcmul(result - base, z, g)
        else:
            z = torch.addmm(result, F.linear(x, a), b.T, alpha=scaling)
            out = _rescaled(z, g, base_layer.bias, (-1,))
        return out.view(out_shape)


class DoraEmbedding(_Dora):
    """nn.Embedding: the norm is per embedding dimension (a column of the table), as in peft."""

    def factors(self, layer: LoraEmbedding, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]

    def operands(self, layer: LoraEmbedding, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Operands:
        # a: (r, num), b: (dim, r)
        return weight, a.T, b.T, 0

    def forward(self, layer: LoraEmbedding, adapter_name: str, x: torch.Tensor, result: torch.Tensor
                ) -> torch.Tensor:
        a, b = self.factors(layer, adapter_name)
        base = layer.base_layer
        g = layer.lora_magnitude_vector[adapter_name].weight / self.weight_norm(layer, adapter_name)
        after_a = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
        dim = result.shape[-1]
        z = torch.addmm(result.reshape(-1, dim).to(a.dtype), after_a.reshape(-1, a.shape[0]), b.T,
                        alpha=layer.scaling[adapter_name])
        return (z * g).view(result.shape)


class DoraConv(_Dora):
    """nn.Conv1d / Conv2d / Conv3d: the norm is per output channel; the magnitude is (1, out, 1, ...) as in peft."""

    def _norm_of(self, layer: LoraConv, adapter_name: str, weight: torch.Tensor,
                 factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        norm = super()._norm_of(layer, adapter_name, weight, factors)
        return norm.view((1, -1) + (1,) * (weight.dim() - 2))

    def operands(self, layer: LoraConv, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Operands:
        # a: (r, in, k...), b: (out, r, 1...)
        return weight.flatten(1), b.flatten(1), a.flatten(1), 1

    def forward(self, layer: LoraConv, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        scaling = layer.scaling[adapter_name]
        g = layer.lora_magnitude_vector[adapter_name].weight / self.weight_norm(layer, adapter_name)
        x = x.to(lora_A.weight.dtype)
        base_layer = layer.base_layer
        if (dropout := _active_dropout(layer, adapter_name)) is not None:
            x = dropout(x)
            base = base_layer._conv_forward(x, base_layer.weight.to(x.dtype), None)
            z = torch.add(base, lora_B(lora_A(x)), alpha=scaling)
            out = torch.addcmul(result - base, z, g)
        else:
            z = torch.add(result.to(x.dtype), lora_B(lora_A(x)), alpha=scaling)
            out = _rescaled(z, g, base_layer.bias, g.shape)
        return out
