"""torchao: nn.Linear layers whose weight is a torchao quantized tensor.

int8 weight-only (`Int8Tensor`, from `quantize_(model, Int8WeightOnlyConfig())` or transformers'
`TorchAoConfig(quant_type=Int8WeightOnlyConfig())`) and NF4 (`NF4Tensor`, from `to_nf4`, as torchtune's QLoRA
uses it) can be merged into; other torchao weight types train and run, and merge after
`merge_and_unload(dequantize=True)`. Imported only once torchao itself is (`deltatune.quantized.DISPATCH_CHAIN`).
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization import Int8Tensor, NF4Tensor, PerGroup, PerRow, PerTensor, to_nf4
from torchao.utils import TorchAOBaseTensor

from deltatune.quantized import QuantizedBackend


def dispatch(module: nn.Module) -> type[QuantizedBackend] | None:
    if isinstance(module, nn.Linear) and isinstance(module.weight, TorchAOBaseTensor | NF4Tensor):
        return TorchAO
    return None


def _granularity(weight: Int8Tensor):
    """The granularity an Int8Tensor was made with, read back from its block size."""
    block, shape = list(weight.block_size), list(weight.shape)
    if block == shape:
        return PerTensor()
    if all(b == 1 for b in block[:-1]) and block[-1] == shape[-1]:
        return PerRow()
    return PerGroup(block[-1])


class TorchAO(QuantizedBackend):
    name = "torchao"

    @classmethod
    def describe(cls, module: nn.Module) -> str:
        weight = module.weight
        if isinstance(weight, NF4Tensor):
            return "torchao NF4"
        if isinstance(weight, Int8Tensor):
            return "torchao int8" if weight.act_quant_kwargs is None else "torchao int8 dynamic"
        return f"torchao {type(weight).__name__}"

    @classmethod
    def features(cls, module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.weight.shape
        return in_features, out_features

    @classmethod
    def dequantize(cls, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        if isinstance(weight, NF4Tensor):
            return weight.get_original_weight().float()
        return weight.dequantize().float()

    @classmethod
    def requantize(cls, module: nn.Module, weight: torch.Tensor) -> None:
        old = module.weight
        if isinstance(old, NF4Tensor):
            new = to_nf4(weight.to(old.dtype), old.block_size, old.scaler_block_size)
        elif isinstance(old, Int8Tensor):
            new = Int8Tensor.from_hp(weight.to(old.dtype), granularity=_granularity(old),
                                     act_quant_kwargs=old.act_quant_kwargs)
        else:
            raise NotImplementedError(
                f"deltatune cannot re-quantize a torchao {type(old).__name__} weight after merging; use "
                "merge_and_unload(dequantize=True) for a full-precision merged model."
            )
        module.weight = nn.Parameter(new, requires_grad=False)

    @classmethod
    def original_dtype(cls, module: nn.Module) -> torch.dtype | None:
        return module.weight.dtype
