"""bitsandbytes: LLM.int8() (`Linear8bitLt`) and 4-bit NF4 / FP4 (`Linear4bit`) layers, on GPU and on CPU.

Imported only once bitsandbytes itself is (see `deltatune.quantized.DISPATCH_CHAIN`).
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from torch import nn

from deltatune.quantized import QuantizedBackend


def dispatch(module: nn.Module) -> type[QuantizedBackend] | None:
    if isinstance(module, Linear4bit):
        return BitsAndBytes4bit
    if isinstance(module, Linear8bitLt):
        return BitsAndBytes8bit
    return None


class BitsAndBytes8bit(QuantizedBackend):
    """Int8 rows with one float scale each (SCB). The scale lives on the weight until the first forward, then on
    the layer's matmul state; the int8 data stays in `weight.data` throughout."""

    name = "bitsandbytes 8-bit"

    @classmethod
    def _scales(cls, module: Linear8bitLt) -> torch.Tensor | None:
        scb = getattr(module.weight, "SCB", None)
        return scb if scb is not None else module.state.SCB

    @classmethod
    def dequantize(cls, module: Linear8bitLt) -> torch.Tensor:
        weight = module.weight
        if weight.dtype.is_floating_point:  # has_fp16_weights=True: quantized on the fly in each forward
            return weight.detach().float().clone()
        scb = cls._scales(module)
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()

    @classmethod
    def requantize(cls, module: Linear8bitLt, weight: torch.Tensor) -> None:
        old = module.weight
        device = old.device
        if old.dtype.is_floating_point:
            module.weight = Int8Params(weight.to(old.dtype), requires_grad=False, has_fp16_weights=True)
            return
        # Int8Params quantizes when it moves from the CPU (in float16, as bitsandbytes does when loading).
        new = Int8Params(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(device)
        module.state.reset_grads()  # forget the old CB / SCB: the next forward takes them from the new weight

    @classmethod
    def snapshot(cls, module: Linear8bitLt) -> tuple[Int8Params, torch.Tensor | None]:
        return module.weight, cls._scales(module)

    @classmethod
    def restore(cls, module: Linear8bitLt, snapshot: tuple[Int8Params, torch.Tensor | None]) -> None:
        weight, scales = snapshot
        if not weight.dtype.is_floating_point:
            weight.CB, weight.SCB = weight.data, scales
        module.weight = weight
        module.state.reset_grads()

    @classmethod
    def state_tensors(cls, module: Linear8bitLt) -> list[torch.Tensor]:
        scb = cls._scales(module)
        return [] if scb is None else [scb]


class BitsAndBytes4bit(QuantizedBackend):
    """4-bit codes packed two per byte, with one absmax per block (itself 8-bit quantized with double quantization).

    On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place for its CPU kernel at the first no-grad
    forward in eval mode (block scales rounded to bfloat16). Dequantizing converts a copy back to the standard
    layout, so the layer itself is never changed and restoring a snapshot gives back exactly what ran before.
    """

    name = "bitsandbytes 4-bit"

    @classmethod
    def describe(cls, module: Linear4bit) -> str:
        return f"{cls.name} {module.weight.quant_type}"

    @classmethod
    def _standard_layout(cls, weight: Params4bit) -> tuple[torch.Tensor, object]:
        """(packed data, quant state) of the weight in bitsandbytes' standard layout, without changing it."""
        state = weight.quant_state
        if not getattr(state, "packing_format_for_cpu", False):
            return weight.data, state
        unpack = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
        if unpack is None:
            raise NotImplementedError(
                f"bitsandbytes {bnb.__version__} repacked this 4-bit weight for its CPU kernel and offers no way "
                "back; merge in training mode (model.train()) or install bitsandbytes 0.49-0.50."
            )
        return unpack(weight.data, copy.deepcopy(state))

    @classmethod
    def dequantize(cls, module: Linear4bit) -> torch.Tensor:
        data, state = cls._standard_layout(module.weight)
        return bnb.functional.dequantize_4bit(data, state).float()

    @classmethod
    def requantize(cls, module: Linear4bit, weight: torch.Tensor) -> None:
        old = module.weight
        new = Params4bit(
            weight.to(cls.original_dtype(module)), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(old.device)  # Params4bit quantizes on its first move to a device
        module.quant_state = module.weight.quant_state

    @classmethod
    def restore(cls, module: Linear4bit, snapshot: Params4bit) -> None:
        module.weight = snapshot
        module.quant_state = snapshot.quant_state

    @classmethod
    def original_dtype(cls, module: Linear4bit) -> torch.dtype | None:
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return state.original_dtype
        return state.dtype

    @classmethod
    def keep_differentiable(cls, module: Linear4bit) -> None:
        """bitsandbytes' CPU kernel for a repacked weight has no backward: after an evaluation pass had repacked it,
        training would silently stop gradients at the layer (or fail on a bias); and its block scales are rounded
        to bfloat16, so outputs move by about 1e-3. Repacking is turned off, and a weight already repacked goes
        back to the standard layout (its scales stay rounded)."""
        module.support_avx512bf16_for_cpu = False
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = cls._standard_layout(module.weight)
            module.quant_state = module.weight.quant_state

    @classmethod
    def state_tensors(cls, module: Linear4bit) -> list[torch.Tensor]:
        state = module.weight.quant_state
        tensors = [state.absmax, state.code, getattr(state, "offset", None)]
        nested = getattr(state, "state2", None)
        if nested is not None:
            tensors += [nested.absmax, nested.code]
        return [t for t in tensors if isinstance(t, torch.Tensor)]
