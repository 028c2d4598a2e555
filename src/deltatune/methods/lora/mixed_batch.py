"""Mixed-adapter batches, the layer side: one LoRA adapter per row of a Linear / Conv1D layer's input.

Each LoRA Linear layer stacks the factors of all its loaded adapters, zero-padded to the largest rank, with the
scaling folded into B; the bare model is the all-zero entry 0. A forward then gathers every row's A and B and
applies them with two batched matmuls, so the cost does not grow with the number of distinct adapters and
there is no Python loop over sub-batches. Stacking every loaded adapter (not only the batch's) means any mix of
adapters in the next request reuses the same stacks, as a serving loop needs; the price is one padded copy of
the adapters' factors per layer, and the largest loaded rank sets the matmul size for every row. The stacks are
cached per layer (derived.py), so they are rebuilt after an optimizer step, a load, a hot-swap or an adapter
deleted and another loaded under its name. With gradients enabled they are built afresh each call from the
batch's adapters only (so gradients reach exactly those factors) and not cached.

The rows reach a layer through its `mixed_rows` (the batch's adapter names, each row's index into that layer's
stack by batch size, and the stacks themselves when the call runs without gradients), set for the duration of
one call by `deltatune.mixed_batch.mixed_adapter_rows`, the model side; a layer whose `mixed_rows` is set skips
its active-adapter path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from deltatune.methods.lora.derived import DerivedCache

if TYPE_CHECKING:
    from deltatune.methods.lora.layers import LoraLinear


def stacked_factors(layer: LoraLinear, names: tuple[str, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(A, B): (n + 1, R, in) and (n + 1, out, R) over the layer's n adapters in `layer.lora_A` order, entry 0
    zeros (the bare model), B scaled, ranks zero-padded to the largest.

    Without gradients every adapter is stacked (cached); with them, adapters outside `names` are zero entries,
    so that only the batch's factors receive gradients."""
    # Runs per layer and call, so it reads the containers' dicts directly rather than through Module.__getattr__
    # (the weights themselves as attributes: under FSDP an entry may be a wrapper).
    mods_a, mods_b, scaling = layer.lora_A._modules, layer.lora_B._modules, layer.scaling
    grad = torch.is_grad_enabled() and any(
        p.requires_grad for n in names if n in mods_a for p in (mods_a[n].weight, mods_b[n].weight))
    factors = [(i + 1, mod.weight, mods_b[n].weight, scaling[n])
               for i, (n, mod) in enumerate(mods_a.items()) if not grad or n in names]
    sources = [t for _, a, b, s in factors for t in (a, b, s) if torch.is_tensor(t)]
    key = (dtype, tuple((i, None if torch.is_tensor(s) else s) for i, _, _, s in factors))
    cache = layer.__dict__.get("_mixed_cache")
    if cache is None:
        cache = layer._mixed_cache = DerivedCache()
    if not grad and (cached := cache.get(sources, key)) is not None:
        return cached
    rank = max((mod.weight.shape[0] for mod in mods_a.values()), default=1)
    weight = layer.base_layer.weight
    zero_a = torch.zeros(rank, layer.in_features, dtype=dtype, device=weight.device)
    zero_b = torch.zeros(layer.out_features, rank, dtype=dtype, device=weight.device)
    parts_a, parts_b = [zero_a] * (len(mods_a) + 1), [zero_b] * (len(mods_a) + 1)
    with torch.set_grad_enabled(grad):
        for i, a, b, s in factors:
            pad = rank - a.shape[0]
            parts_a[i] = F.pad(a.to(dtype), (0, 0, 0, pad))
            parts_b[i] = F.pad((b * s).to(dtype), (0, pad))
        stacks = torch.stack(parts_a), torch.stack(parts_b)
    if not grad:
        cache.put(sources, stacks, key)
    return stacks


def mixed_forward(layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` plus, for each row of `x`, that row's adapter: two batched matmuls over gathered factors."""
    names, rows_by_size, stacks = layer.mixed_rows
    rows = rows_by_size.get(x.shape[0])
    if rows is None:
        raise ValueError(
            f"A mixed-adapter batch was set up for {' or '.join(map(str, sorted(rows_by_size)))} rows, but a layer "
            f"got {x.shape[0]}; the model changed the batch size (beam search or num_return_sequences outside "
            "generate()?)."
        )
    if stacks is None or torch.is_grad_enabled():
        stacks = stacked_factors(layer, names, factor_dtype(layer))
    stack_a, stack_b = stacks
    h = x.to(stack_a.dtype).reshape(x.shape[0], -1, x.shape[-1])
    a, b = stack_a.index_select(0, rows), stack_b.index_select(0, rows)  # cheaper than stack[rows] per call
    # The B product is accumulated into the output (baddbmm), as the single-adapter forward does with addmm; without
    # gradients, into the base output itself (a fresh tensor of the base layer's), saving an output-sized copy.
    if not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous():
        result.view(h.shape[0], -1, result.shape[-1]).baddbmm_(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))
        return result
    out = torch.baddbmm(result.reshape(h.shape[0], -1, result.shape[-1]).to(h.dtype), torch.bmm(h, a.transpose(1, 2)),
                        b.transpose(1, 2))
    return out.view(result.shape).to(result.dtype)


def factor_dtype(layer: LoraLinear) -> torch.dtype:
    for module in layer.lora_A.values():
        return module.weight.dtype
    return layer.base_layer.weight.dtype
