"""LoRA+ (https://huggingface.co/papers/2402.12354): B factors learn `loraplus_lr_ratio` times faster than A.

The parameter groups are peft's, in peft's order: A factors and other matrices at `lr`; LoRA embedding factors
at `loraplus_lr_embedding`; B factors and other 1-D parameters (biases, norms) at lr * ratio, split by whether
they take weight decay (biases and LayerNorm parameters do not). Groups are found from the LoRA layers' own
containers, not from parameter names.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

from deltatune.methods.lora.layers import LoraEmbedding, LoraLayer


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters that take no weight decay, as transformers' Trainer and peft decide: LayerNorm parameters, and
    every parameter with "bias" anywhere in its full name (a module called bias_head included)."""
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, tuple(ALL_LAYERNORM_LAYERS)):
            out.update(id(p) for p in module.parameters())
    for name, param in model.named_parameters(remove_duplicate=False):
        if "bias" in name:
            out.add(id(param))
    return out


def _factor_ids(model: nn.Module) -> tuple[set[int], set[int]]:
    """(ids of LoRA B factors, ids of every factor of a LoRA embedding layer)."""
    b_factors: set[int] = set()
    embedding: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraEmbedding):
            embedding.update(id(p) for p in module.lora_embedding_A.parameters())
            embedding.update(id(p) for p in module.lora_embedding_B.parameters())
        elif isinstance(module, LoraLayer):
            b_factors.update(id(p) for p in module.lora_B.parameters())
    return b_factors, embedding


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                          loraplus_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The four groups (A, embedding, B with decay, B without decay) over the trainable parameters."""
    b_factors, embedding = _factor_ids(model)
    no_decay = _no_decay_ids(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            groups["embedding"].append(param)
        elif id(param) in b_factors or param.ndim == 1:
            groups["B_no_decay" if id(param) in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    return [
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                              loraplus_weight_decay: float = 0.0, **kwargs: Any) -> Optimizer:
    """An `optimizer_cls` over the model's trainable parameters with LoRA+ learning rates (see the module doc).

    Weight decay comes from `loraplus_weight_decay`: every group sets its own, so a `weight_decay` keyword only
    reaches the optimizer's defaults, as in peft. Other keywords go to the optimizer.
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be positive (the paper uses about 16), got {loraplus_lr_ratio}.")
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, loraplus_weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("The model has no trainable parameters: is an adapter active and in training mode?")
    return optimizer_cls(groups, lr=lr, **kwargs)
