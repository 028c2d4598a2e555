"""Combining LoRA adapters into a new one (peft's add_weighted_adapter).

Pure functions over tensors (task arithmetic, TIES, DARE, magnitude pruning, and the LoRA-specific ways of
applying them to factors), the combined adapter's config, and `fill_combined`, which writes one layer's combined
factors. `deltatune.weighted_adapter` (PeftModel.add_weighted_adapter) checks the request, adds the new adapter
to the model and fills each layer with this.

Combination types, as peft defines them:
- "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune" combine the A factors and the B factors
  separately, each weighted by sqrt(|weight * scaling|) (the sign goes on A only). Approximate: the product of
  combined factors is not the combined product. All adapters need the same rank, which the result keeps.
- "cat" stacks the factors, A_i scaled by weight_i * scaling_i: exact, the rank is the sum of the ranks.
- "svd" and the "<type>_svd" variants combine the full delta weights (scaling included) and factor the result by a
  truncated SVD of rank `svd_rank` (default: the largest rank).
The new adapter has lora_alpha == r, so its scaling is 1.

DARE draws its masks from torch's global generator in peft's order (layer by layer in module order, A before B,
adapters in the given order), so a run after the same `torch.manual_seed` gives the same adapter as peft.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.init import mutates_base
from deltatune.methods.lora.layers import LoraEmbedding, LoraLayer

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("svd", "linear", "cat", *FACTOR_WISE[1:], *SVD_TYPES[1:])
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


# --- task arithmetic over tensors ---------------------------------------------------------------
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the others."""
    if density >= 1:
        return tensor
    flat = torch.zeros_like(tensor).reshape(-1)
    flat[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * flat.reshape(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and divide the survivors by it (expectation kept)."""
    if density >= 1:
        return tensor
    return tensor * torch.bernoulli(torch.full_like(tensor, density)) / density


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election over dim 0: the sign of the sum ("total") or of the sign count ("frequency")."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_mean(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted(torch.stack(list(tensors)), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([magnitude_pruned(t, density) for t in tensors], weights)


def dare_linear(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([randomly_pruned(t, density) for t in tensors], weights)


def _ties_merge(pruned: list[torch.Tensor], weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    stacked = torch.stack(pruned)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_mean(_weighted(stacked, weights), mask)


def ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    return _ties_merge([magnitude_pruned(t, density) for t in tensors], weights, majority_sign_method)


def dare_ties(tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: str = "total") -> torch.Tensor:
    return _ties_merge([randomly_pruned(t, density) for t in tensors], weights, majority_sign_method)


def combine_tensors(combination: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor,
                    density: float | None = None, majority_sign_method: str = "total") -> torch.Tensor:
    """One combined tensor; `combination` is a factor-wise type or an SVD type ("svd" is plain task arithmetic)."""
    kind = combination.removesuffix("_svd")
    if kind in ("svd", "linear"):
        return task_arithmetic(tensors, weights)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density)
    if kind == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method)
    raise ValueError(f"Unknown combination_type {combination!r}; choose one of {list(COMBINATION_TYPES)}.")


# --- LoRA factors ------------------------------------------------------------------------------
def factor_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights for A and for B: sqrt(|w * s|) each, the sign on A alone (so a negative weight subtracts)."""
    products = [w * s for w, s in zip(weights, scalings, strict=True)]
    roots = [math.sqrt(abs(p)) for p in products]
    signed = [root * (1 if p >= 0 else -1) for root, p in zip(roots, products, strict=True)]
    return torch.tensor(signed), torch.tensor(roots)


def _padded(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad the rank dimension up to `rank` (a no-op for the product B A)."""
    missing = rank - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def combine_factor_wise(combination: str, factors_a: Sequence[torch.Tensor], factors_b: Sequence[torch.Tensor],
                        weights: Sequence[float], scalings: Sequence[float], rank: int,
                        density: float | None = None, majority_sign_method: str = "total"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank `rank` for the factor-wise types; every adapter must have the same rank here."""
    ranks = {a.shape[0] for a in factors_a}
    if len(ranks) > 1:
        raise ValueError(
            f"combination_type={combination!r} combines A and B factors entry by entry, so the adapters need the "
            f"same rank in every layer; this layer has ranks {sorted(ranks)}. Use 'cat' or 'svd' instead."
        )
    weights_a, weights_b = factor_weights(weights, scalings)
    dtype = factors_a[0].dtype
    a = combine_tensors(combination, factors_a, weights_a.to(factors_a[0].device), density, majority_sign_method)
    b = combine_tensors(combination, factors_b, weights_b.to(factors_b[0].device), density, majority_sign_method)
    return _padded(a.to(dtype), rank, 0), _padded(b.to(dtype), rank, 1)


def concatenate_factors(factors_a: Sequence[torch.Tensor], factors_b: Sequence[torch.Tensor],
                        weights: Sequence[float], scalings: Sequence[float], rank: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """"cat": A = [w_i s_i A_i] stacked, B = [B_i] side by side, so B A = sum_i w_i s_i B_i A_i exactly."""
    a = torch.cat([a * w * s for a, w, s in zip(factors_a, weights, scalings, strict=True)], dim=0)
    b = torch.cat(list(factors_b), dim=1)
    return _padded(a, rank, 0), _padded(b, rank, 1)


def truncated_svd(delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                  driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B A the best rank-`rank` approximation of `delta` (B = U S, A = V^T).

    `clamp` is a quantile q: entries of A and B are clamped to +-(the q-quantile of all their entries). A rank above
    min(delta.shape) is zero-padded.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.numel())
    b = u[:, :k] @ torch.diag(s[:k])
    a = vh[:k, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return _padded(a, rank, 0), _padded(b, rank, 1)


def combine_svd(combination: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], rank: int,
                a_shape: Sequence[int], b_shape: Sequence[int], transposed: bool = False,
                density: float | None = None, majority_sign_method: str = "total", clamp: float | None = None,
                full_matrices: bool = True, driver: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank `rank`, shaped like the layer's factors (`a_shape`, `b_shape` up to the rank), for the SVD
    types.

    `deltas` are the adapters' delta weights (scaling included) in the base weight's layout, where peft combines
    them (DARE's masks depend on it); `transposed` says that layout is (in, out) (GPT-2's Conv1D, embeddings).
    """
    delta = combine_tensors(combination, deltas, torch.tensor(list(weights)).to(deltas[0].device), density,
                            majority_sign_method)
    matrix = delta.T if transposed else delta.flatten(1)
    a, b = truncated_svd(matrix, rank, clamp, full_matrices, driver)
    return a.reshape(rank, *a_shape[1:]), b.reshape(b_shape[0], rank, *b_shape[2:])


# --- adding the combined adapter to a model ------------------------------------------------------
def _factors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's factors at its rank `r` (views): hot-swapping may hold them zero-padded to a larger rank."""
    if isinstance(layer, LoraEmbedding):
        a, b = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    else:
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    r = layer.r[adapter_name]
    return a[:r], b[:, :r]


def max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _union(values: list, what: str):
    if all(isinstance(v, str) for v in values):
        return "|".join(f"({v})" for v in values)
    if any(isinstance(v, str) for v in values):
        raise ValueError(
            f"Cannot combine adapters whose {what} mix a regex string and a list of names; use one form for all."
        )
    return sorted(set().union(*(v or [] for v in values))) or None


def _covered_layers(configs: list[LoraConfig]) -> tuple[list[int] | int | None, list[str] | str | None]:
    """(layers_to_transform, layers_pattern) that cover every adapter's layers: the union of their indices where
    they all count layers the same way, else every layer."""
    first = configs[0]
    if all(c.layers_to_transform == first.layers_to_transform and c.layers_pattern == first.layers_pattern
           for c in configs):
        return first.layers_to_transform, first.layers_pattern
    if any(c.layers_to_transform in (None, []) or c.layers_pattern != first.layers_pattern for c in configs):
        return None, None  # an empty list adapts every layer too (injection.py)
    indices = [[c.layers_to_transform] if isinstance(c.layers_to_transform, int) else c.layers_to_transform
               for c in configs]
    return sorted(set().union(*indices)), first.layers_pattern


def combined_config(configs: list[LoraConfig], rank: int) -> LoraConfig:
    """The first adapter's config with rank `rank`, scaling 1, and what covers every adapter's layers: the union of
    their target modules and layers_to_transform, and exclude_modules only where all agree. (Modules that only the
    union reaches get zero factors.)

    Unlike peft, use_rslora is turned off (peft keeps it, which scales the result by sqrt(rank)), init_lora_weights
    is True when the first adapter's init rewrote the base weights, modules_to_save is the union, and the layers
    other adapters adapt outside the first one's layers_to_transform or exclude_modules are kept (peft drops them).
    """
    first = configs[0]
    init = True if mutates_base(first.init_lora_weights) else first.init_lora_weights
    layers, pattern = _covered_layers(configs)
    same_exclusions = all(c.exclude_modules == first.exclude_modules for c in configs)
    return dataclasses.replace(
        first, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
        target_modules=_union([c.target_modules for c in configs], "target_modules"),
        modules_to_save=_union([c.modules_to_save for c in configs], "modules_to_save"),
        layers_to_transform=layers, layers_pattern=pattern,
        exclude_modules=first.exclude_modules if same_exclusions else None,
        init_lora_weights=init,
    )


def fill_combined(layer: LoraLayer, adapters: list[str], weights: list[float], adapter_name: str, combination: str,
                  rank: int, density: float | None, majority_sign_method: str, clamp: float | None,
                  full_matrices: bool, driver: str | None) -> None:
    """Write into the layer's adapter `adapter_name` the combination of those of `adapters` it holds."""
    target_a, target_b = _factors(layer, adapter_name)
    present = [(name, w) for name, w in zip(adapters, weights, strict=True) if name in layer.adapter_names]
    with torch.no_grad():
        if not present:  # a module only the new config targets: leave it a no-op
            target_a.zero_()
            target_b.zero_()
            return
        factors_a, factors_b = zip(*(_factors(layer, name) for name, _ in present), strict=True)
        factors_a = [f.detach() for f in factors_a]
        factors_b = [f.detach() for f in factors_b]
        if combination not in ("cat", *SVD_TYPES):
            # An adapter hot-swapped for one that leaves this layer out has rank 0 here; as in peft, it takes
            # part as zero factors of its configured rank.
            factors_a = [a if a.shape[0] else a.new_zeros(rank, a.shape[1]) for a in factors_a]
            factors_b = [b if b.shape[1] else b.new_zeros(b.shape[0], rank) for b in factors_b]
        ws = [w for _, w in present]
        scalings = [layer.scaling[name] for name, _ in present]
        if combination == "cat":
            a, b = concatenate_factors(factors_a, factors_b, ws, scalings, rank)
        elif combination in SVD_TYPES:
            deltas = [layer.delta_weight(name).detach() for name, _ in present]
            transposed = isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False)
            a, b = combine_svd(combination, deltas, ws, rank, target_a.shape, target_b.shape, transposed,
                               density, majority_sign_method, clamp, full_matrices, driver)
        else:
            a, b = combine_factor_wise(combination, factors_a, factors_b, ws, scalings, rank, density,
                                       majority_sign_method)
        target_a.copy_(a)
        target_b.copy_(b)
