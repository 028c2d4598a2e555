"""What an adapter layer on a quantized linear layer needs, for any backend of `deltatune.quantized` and any method.

A method's quantized layer (LoRA's and IA3's, in their own folders) mixes `QuantizedLayer` in before its linear
layer class. The forward stays the method's: the quantized module computes the base output, the adapter adds its
path in its own dtype (float32 beside a quantized base). What differs is how a layer learns its shape (a packed
weight does not tell it) and merging: the weight is dequantized, the adapter merged exactly in float32, and the
result re-quantized; the layer records how far rounding moved the weight from the exact merged one
(`requantization_error`), which the model-level merge reports in one warning. Unmerging puts the original
quantized weight back, so it is exact. Nothing here knows a method.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from deltatune.quantized import QuantizedBackend, dense_linear


class QuantizedLayer:
    """Merging through dequantize / requantize. Mixed in before the method's linear layer class.

    The first merge keeps the quantized weight it replaces, so unmerging restores it exactly (no second rounding;
    `disable_adapter()` and switching adapters on a merged model see the true base). That costs one more quantized
    copy of each merged layer while it stays merged; `merge_and_unload` drops it with the adapter layer.
    `backend` becomes None when `dequantize_base` swaps in a plain nn.Linear: the layer then merges as the plain
    layer does.
    """

    backend: type[QuantizedBackend] | None
    requantization_error: float | None
    base_layer: nn.Module

    def _init_quantized(self, base_layer: nn.Module, backend: type[QuantizedBackend]) -> None:
        self.backend = backend
        self.requantization_error = None
        self._unmerged_base: tuple | None = None  # (backend snapshot,): a tuple, so no Parameter gets registered
        self.fan_in_fan_out = False
        self.in_features, self.out_features = backend.features(base_layer)

    @abstractmethod
    def _merge_into(self, names: list[str], weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, new bias or None) with the adapters `names` merged into `weight` (float32, (out, in))."""
        raise NotImplementedError

    def _dense_weight(self) -> torch.Tensor:
        if self.backend is None:
            return self.base_layer.weight.detach().float()
        return self.backend.dequantize(self.base_layer)

    def _exact_merge(self, names: list[str], safe_merge: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self._merge_into(names, self._dense_weight())
        if safe_merge and not all(torch.isfinite(t).all() for t in (weight, bias) if t is not None):
            raise ValueError(
                f"Merging adapter(s) {names} would write NaN or inf into the base weights; nothing was changed."
            )
        return weight, bias

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        names = self._to_merge(adapter_names)
        if names:
            self._exact_merge(names, safe_merge=True)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if self.backend is None:
            return super().merge(adapter_names, safe_merge)
        names = self._to_merge(adapter_names)
        if not names:
            return
        weight, bias = self._exact_merge(names, safe_merge)
        if self._unmerged_base is None:
            base_bias = getattr(self.base_layer, "bias", None)
            bias_before = None if base_bias is None else base_bias.detach().clone()
            self._unmerged_base = (self.backend.snapshot(self.base_layer), bias_before)
        self.backend.requantize(self.base_layer, weight)
        error = (self.backend.dequantize(self.base_layer) - weight).abs().max().item()
        self.requantization_error = max(error, self.requantization_error or 0.0)
        if bias is not None:
            self.base_layer.bias.data = bias.to(self.base_layer.bias.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put back the quantized weight (and bias) from before the first merge."""
        if self.backend is None or self._unmerged_base is None:
            return super().unmerge()
        snapshot, bias = self._unmerged_base
        self.backend.restore(self.base_layer, snapshot)
        if bias is not None:
            self.base_layer.bias.data = bias
        self._unmerged_base = None
        self.merged_adapters.clear()

    def dequantize_base(self, dtype: torch.dtype) -> None:
        """Swap the quantized base layer for an nn.Linear with its dequantized weight, in `dtype`; adapters that
        were merged are merged again into the dequantized weight, without rounding."""
        merged = list(self.merged_adapters)
        self.unmerge()
        self.base_layer = dense_linear(self.base_layer, self.backend, dtype)
        self.backend = None
        if merged:
            self.merge(merged)
