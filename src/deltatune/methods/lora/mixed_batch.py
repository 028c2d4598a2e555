"""Mixed-adapter batches: one LoRA adapter per row (or the bare model, `BASE`) in a single forward.

Each LoRA Linear layer stacks the factors of all its loaded adapters, zero-padded to the largest rank, with the
scaling folded into B; the bare model is the all-zero entry 0. A forward then gathers every row's A and B and
applies them with two batched matmuls, so the cost does not grow with the number of distinct adapters and
there is no Python loop over sub-batches. Stacking every loaded adapter (not only the batch's) means any mix of
adapters in the next request reuses the same stacks, as a serving loop needs; the price is one padded copy of
the adapters' factors per layer, and the largest loaded rank sets the matmul size for every row. The stacks are
cached per layer (derived.py), so they are rebuilt after an optimizer step, a load, a hot-swap or an adapter
deleted and another loaded under its name. With gradients enabled they are built afresh each call from the
batch's adapters only (so gradients reach exactly those factors) and not cached.

The rows reach the layers through `mixed_rows` on each LoRA layer (the batch's adapter names, each row's index
into that layer's stack by batch size, and the stacks themselves when the call runs without gradients), set for
the duration of one call by `mixed_adapter_rows` (no patching of transformers); a layer whose `mixed_rows` is set
skips its active-adapter path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from deltatune.layers import adapter_layers
from deltatune.methods.lora.derived import DerivedCache

if TYPE_CHECKING:
    from deltatune.methods.lora.layers import LoraLinear
    from deltatune.peft_model import PeftModel

BASE = "__base__"


@contextmanager
def mixed_adapter_rows(peft_model: PeftModel, adapter_names: Sequence[str], batch_size: int, repeat: int = 1
                       ) -> Iterator[None]:
    """Route row i of every forward inside the block through adapter `adapter_names[i]` (BASE: no adapter);
    with `repeat`, the layers see each row `repeat` times in a row (generate()'s beams and returned sequences)."""
    from deltatune import injection
    from deltatune.methods.lora.layers import LoraLinear

    names = _check_request(peft_model, adapter_names, batch_size)
    model = peft_model.get_base_model()
    layers = [layer for _, layer in adapter_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("Mixed-adapter batches need unmerged adapters: call unmerge_adapter() first.")
    for layer in layers:
        present = layer.adapter_names
        used = [n for n in names if n in present]
        if used and not isinstance(layer, LoraLinear):
            raise ValueError(
                f"Mixed-adapter batches support LoRA on Linear / Conv1D layers only; adapter(s) {used} also "
                f"adapt a {type(layer.base_layer).__name__} layer."
            )
        dropped = [n for n in used if layer.training and not isinstance(layer.lora_dropout[n], torch.nn.Identity)]
        if dropped:
            raise ValueError(f"Mixed-adapter batches do not apply dropout; adapter(s) {dropped} use it in "
                             "training mode. Call model.eval() or use adapters without lora_dropout.")
    rows_by_slots: dict[tuple[tuple[str, ...], torch.device], dict[int, torch.Tensor]] = {}
    lora_layers = [layer for layer in layers if isinstance(layer, LoraLinear)]
    wrappers = [wrapper for _, wrapper in injection.wrappers(model)]
    others = [layer for layer in layers if not isinstance(layer, LoraLinear)]
    # Without gradients (inference, generate()), each layer's stacks are looked up once for the whole call rather
    # than checked against the weights in every forward: generate() runs one forward per new token.
    once = not torch.is_grad_enabled()
    try:  # the routing is undone even if setting it up fails halfway (out of memory while stacking)
        for layer in lora_layers:
            slots, device = tuple(layer.lora_A), layer.base_layer.weight.device
            if (slots, device) not in rows_by_slots:  # layers with the same adapters share one index tensor
                index = {name: i + 1 for i, name in enumerate(slots)}
                rows = torch.tensor([index.get(name, 0) for name in adapter_names])
                # An encoder-decoder's encoder sees the batch once, its decoder each row `repeat` times.
                rows_by_slots[slots, device] = {len(rows): rows.to(device),
                                                len(rows) * repeat: rows.repeat_interleave(repeat).to(device)}
            stacks = stacked_factors(layer, tuple(names), _factor_dtype(layer)) if once else None
            layer.mixed_rows = (tuple(names), rows_by_slots[slots, device], stacks)
        # modules_to_save copies take each row's adapter's copy; other methods' layers run as the bare model.
        per_row = list(adapter_names)
        for wrapper in wrappers:
            wrapper.mixed_rows = {len(per_row): per_row,
                                  len(per_row) * repeat: [n for n in per_row for _ in range(repeat)]}
        for layer in others:
            layer.disabled = True
        yield
    finally:
        for layer in others:
            layer.disabled = False
        for module in (*lora_layers, *wrappers):
            module.mixed_rows = None


def _check_request(peft_model: PeftModel, adapter_names: Sequence[str], batch_size: int) -> list[str]:
    """The distinct adapters (BASE left out) in request order, after refusing what a mixed batch cannot do."""
    if isinstance(adapter_names, str):
        raise ValueError(f"adapter_names takes a list with one adapter name per row, not a string: pass "
                         f"[{adapter_names!r}] * {batch_size} to run every row with {adapter_names!r}.")
    if len(adapter_names) != batch_size:
        raise ValueError(
            f"adapter_names needs one adapter name per row: got {len(adapter_names)} name(s) for a batch of "
            f"{batch_size}."
        )
    names = list(dict.fromkeys(n for n in adapter_names if n != BASE))
    configs = peft_model.peft_config
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown} in adapter_names. Loaded adapters: {sorted(configs)}, "
                         f"or {BASE!r} for the bare model.")
    for name in names:
        config = configs[name]
        if config.peft_type != "LORA":
            raise ValueError(f"Adapter {name!r} is a {config.peft_type} adapter; mixed-adapter batches support "
                             "LoRA adapters only.")
        if config.use_dora:
            raise ValueError(f"Adapter {name!r} uses DoRA; mixed-adapter batches support plain LoRA only.")
    base = peft_model.get_base_model()
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers' newer name
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    if torch.is_grad_enabled() and base.training and checkpointing:
        raise ValueError("Mixed-adapter batches cannot train with gradient checkpointing: its backward pass reruns "
                         "the forward after the rows' adapter routing has ended. Call gradient_checkpointing_disable() "
                         "or run the batch without gradients.")
    if peft_model._adapters_disabled:
        raise ValueError("adapter_names cannot be used inside disable_adapter(); pass '__base__' rows instead.")
    return names


# The main input of text, vision and audio models, by the keyword transformers' models take it under.
MAIN_INPUTS = ("input_ids", "inputs_embeds", "inputs", "pixel_values", "input_features", "input_values")


def batch_size_of(args: tuple, kwargs: dict[str, Any]) -> int:
    encoder_outputs = kwargs.get("encoder_outputs")
    candidates = (*args[:1], *(kwargs.get(name) for name in MAIN_INPUTS),
                  encoder_outputs[0] if encoder_outputs is not None else None, kwargs.get("decoder_input_ids"))
    for value in candidates:
        if torch.is_tensor(value):
            return value.shape[0]
    raise ValueError(f"adapter_names needs the batch as a tensor to know its size: pass the inputs positionally or "
                     f"as one of {', '.join(MAIN_INPUTS)} or encoder_outputs.")


def generation_expansion(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows generate() makes of each input row: num_beams for beam search, else num_return_sequences."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returns = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return beams if beams > 1 else returns


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
        stacks = stacked_factors(layer, names, _factor_dtype(layer))
    stack_a, stack_b = stacks
    h = x.to(stack_a.dtype).reshape(x.shape[0], -1, x.shape[-1])
    a, b = stack_a.index_select(0, rows), stack_b.index_select(0, rows)  # cheaper than stack[rows] per call
    # The B product is accumulated into the output (baddbmm), as the single-adapter forward does with addmm.
    out = torch.baddbmm(result.reshape(h.shape[0], -1, result.shape[-1]).to(h.dtype), torch.bmm(h, a.transpose(1, 2)),
                        b.transpose(1, 2))
    return out.view(result.shape).to(result.dtype)


def _factor_dtype(layer: LoraLinear) -> torch.dtype:
    for module in layer.lora_A.values():
        return module.weight.dtype
    return layer.base_layer.weight.dtype
