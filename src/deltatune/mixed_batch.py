"""Mixed-adapter batches, the model side: which LoRA adapter (or the bare model, `BASE`) each row of a batch runs.

`mixed_adapter_rows` checks the request against the PeftModel, then routes every row through its adapter for one
call by setting `mixed_rows` on the model's LoRA layers and modules_to_save copies, and takes it off again
afterwards (no patching of transformers). How a LoRA layer applies a row's adapter is the layer side,
`deltatune.methods.lora.mixed_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from deltatune import injection
from deltatune.layers import adapter_layers
from deltatune.methods.lora import mixed_batch as lora_rows
from deltatune.methods.lora.layers import LoraLinear

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel

BASE = "__base__"


@contextmanager
def mixed_adapter_rows(peft_model: PeftModel, adapter_names: Sequence[str], batch_size: int, repeat: int = 1
                       ) -> Iterator[None]:
    """Route row i of every forward inside the block through adapter `adapter_names[i]` (BASE: no adapter);
    with `repeat`, the layers see each row `repeat` times in a row (generate()'s beams and returned sequences)."""
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
            stacks = lora_rows.stacked_factors(layer, tuple(names), lora_rows.factor_dtype(layer)) if once else None
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
