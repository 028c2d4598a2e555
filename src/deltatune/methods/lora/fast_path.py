"""The LoRA fast path: a Linear (or GPT-2 Conv1D) base layer and one plain LoRA adapter as one autograd Function.

It computes what the plain path computes, y = base(x) + s * dropout(x) A^T B^T (the LoRA branch in the adapter's
dtype, rounded once to the base's), at less cost:
- the forward makes one base product, h = dropout(x) A^T, and accumulates s * h B^T into the base output in place
  (no output-sized temporary);
- the backward accumulates the LoRA branch's input gradient into the base's in place (addmm), instead of autograd
  summing two input-sized tensors, and picks the operand layouts BLAS runs fastest for the rank-sized products;
- it keeps for backward only x (a reference: q/k/v or gate/up share one) and the rank-sized h. With dropout it
  keeps no mask and no dropped copy of x: the mask is a hash of (seed, element) (dropout_mask.py), kept as the
  seed and, where the CPU kernel runs, the dropped elements' indices and values (about p of the elements). The
  products run on x itself and the dropped elements' share is taken out afterwards (kernel.py), so nothing
  input-sized is written for dropout;
- one autograd node and no submodule calls per layer, where the plain path has five.

`fast_forward` returns None where it does not apply; then the plain path in layers.py runs: DoRA, quantized bases,
mixed-adapter batches, several active adapters, hooks on the layer's modules, autocast, torch.compile tracing, a
trainable base weight, hot-swap's tensor scaling. With dropout 0 both paths give the same outputs and gradients up
to float rounding (tests/methods/lora/test_fast_path.py); with dropout both drop each element independently with
probability p, from different random streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_impl
from transformers.pytorch_utils import Conv1D

from deltatune.methods.lora import kernel
from deltatune.methods.lora.dropout_mask import draw_seed

if TYPE_CHECKING:
    from deltatune.methods.lora.layers import LoraLinear

_BASE_TYPES = (nn.Linear, Conv1D)
_DROPOUT_TYPES = (nn.Identity, nn.Dropout)


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module would run hooks (the fast path does not call it)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks
                or module_impl._global_backward_hooks or module_impl._global_backward_pre_hooks)


def _autocast(device: torch.device) -> bool:
    kind = device.type
    if kind in ("cpu", "cuda"):
        return torch.is_autocast_enabled(kind)
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def fast_forward(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output with adapter `name` (its only active adapter, plain LoRA) through the fast path, or None
    where the fast path does not apply (see the module docstring). Runs per layer and call: it reads the modules'
    dicts directly, as dora.py does."""
    modules = layer._modules
    base, lora_a, lora_b = modules["base_layer"], modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
    dropout = modules["lora_dropout"]._modules[name]
    weight, bias = base._parameters.get("weight"), base._parameters.get("bias")
    scaling = layer.scaling[name]
    if (type(base) not in _BASE_TYPES or type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear
            or type(dropout) not in _DROPOUT_TYPES or weight is None or weight.requires_grad
            or type(scaling) not in (float, int) or x.dtype != weight.dtype or x.device != weight.device
            or _hooked(layer) or _hooked(base) or _hooked(lora_a) or _hooked(lora_b) or _hooked(dropout)
            or _global_hooks() or torch.compiler.is_compiling() or _autocast(x.device)):
        return None
    a, b = lora_a._parameters["weight"], lora_b._parameters["weight"]
    p = dropout.p if dropout.training and type(dropout) is nn.Dropout else 0.0
    transposed = type(base) is Conv1D
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LoraLinear.apply(x, weight, bias, a, b, float(scaling), p, transposed)
    seed = draw_seed() if p > 0 else 0
    y, _, _ = _forward(x.reshape(-1, x.shape[-1]), weight, bias, a, b, float(scaling), p, seed, transposed)
    return y.view(*x.shape[:-1], y.shape[-1])


def _forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
             scaling: float, p: float, seed: int, transposed: bool
             ) -> tuple[torch.Tensor, torch.Tensor, kernel.Dropped | None]:
    """(y, h, dropped) for the 2-D input x2: y = base(x2) + scaling * h B^T with h = dropout(x2) A^T; `dropped` is
    what kernel.drop_forward_ gives the backward pass (None without dropout)."""
    if transposed:  # GPT-2's Conv1D: weight is (in, out)
        y = torch.mm(x2, weight) if bias is None else torch.addmm(bias, x2, weight)
    else:
        y = F.linear(x2, weight, bias)
    xa = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
    h = torch.mm(xa, a.t())
    dropped = None
    if p > 0:  # h = dropout(x) A^T = (x A^T - (x * dropped) A^T) / (1 - p)
        dropped = kernel.drop_forward_(h, xa.contiguous(), a, p, seed)
        h.mul_(1 / (1 - p))
    if y.dtype == b.dtype:
        y.addmm_(h, b.t(), alpha=scaling)
    else:  # a half-precision base beside float32 factors: add in float32, round once
        y = torch.addmm(y.to(b.dtype), h, b.t(), alpha=scaling).to(y.dtype)
    return y, h, dropped


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, p: float, transposed: bool) -> torch.Tensor:
        seed = draw_seed() if p > 0 else 0
        y, h, dropped = _forward(x.reshape(-1, x.shape[-1]), weight, bias, a, b, scaling, p, seed, transposed)
        ctx.save_for_backward(x, weight, a, b, h, *(dropped if dropped is not None else (None, None)))
        ctx.scaling, ctx.p, ctx.seed, ctx.transposed = scaling, p, seed, transposed
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, a, b, h, indices, values = ctx.saved_tensors
        dropped = None if indices is None else (indices, values)
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        scaling, p, seed = ctx.scaling, ctx.p, ctx.seed
        g2 = grad.reshape(-1, grad.shape[-1])
        ga = g2 if g2.dtype == a.dtype else g2.to(a.dtype)
        grad_x = grad_bias = grad_a = grad_b = None
        if need_b:  # (h^T g)^T: this layout runs faster than g^T h for a skinny h
            grad_b = torch.mm(h.t(), ga).mul_(scaling).t()
        if need_x or need_a:
            # d(loss)/dh, with dropout's 1 / (1 - p) folded in: h = (x * mask) A^T / (1 - p)
            gh = torch.mm(ga, b).mul_(scaling if p == 0 else scaling / (1 - p))
            if need_a:
                x2 = x.reshape(-1, x.shape[-1])
                xa = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
                grad_a = torch.mm(gh.t(), xa)
                if p > 0:
                    kernel.drop_grad_a_(grad_a, xa.contiguous(), gh, p, seed, dropped)
            if need_x:
                grad_x = torch.mm(g2, weight.t() if ctx.transposed else weight)
                if grad_x.dtype == a.dtype:
                    grad_x.addmm_(gh, a)
                else:
                    grad_x.add_(torch.mm(gh, a).to(grad_x.dtype))
                if p > 0:
                    kernel.drop_grad_x_(grad_x, gh, a, p, seed, dropped)
                grad_x = grad_x.view(x.shape)
        if need_bias:
            grad_bias = g2.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None
