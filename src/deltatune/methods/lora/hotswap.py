"""Hot-swapping LoRA adapters: load another adapter's weights into a loaded one, in place.

Nothing is re-created: the factors are the same tensors, written with `copy_`, so a torch.compile'd model keeps
its graph (dynamo guards on tensor identity and shape, not on values). Two things would still recompile, and
`prepare_model_for_compiled_hotswap` (called once, before torch.compile) removes them: a different rank (the
factors change shape), so every layer is zero-padded to one declared maximum rank; and a different alpha / r
(a Python float is baked into the graph), so each scaling becomes a 0-d tensor updated in place. Zero rows of A
and zero columns of B add nothing, so a padded adapter computes what the unpadded one does.

A swap between an adapter without dropout and one with it replaces that layer's dropout module (a compiled
training graph recompiles once); equal kinds only update the probability.

Each layer's `r` stays the rank of the adapter now in the slot (0 where a swapped-in adapter leaves the layer out),
whatever the padded shape: save_pretrained cuts the factors back to it (LoraLayer.saved_parameters), so the files
written are those of the adapter itself, loadable by peft and deltatune alike.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from deltatune.checkpoint import (
    AdapterLoadError,
    adapter_parameter_map,
    base_model_of,
    load_adapter_weights,
    loadable_embedding_weights,
    resolve_adapter_dir,
)
from deltatune.config import PeftConfig
from deltatune.layers import adapter_layers
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.layers import LoraEmbedding, LoraLayer, lora_scaling, pattern_value


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [(n, layer) for n, layer in adapter_layers(base_model_of(model))
            if isinstance(layer, LoraLayer) and adapter_name in layer.adapter_names]


def _factors(layer: LoraLayer, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B): every LoRA layer type keeps the rank on dim 0 of A and dim 1 of B."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight


def _set_factors(layer: LoraLayer, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    old_a, old_b = _factors(layer, adapter_name)
    new_a = nn.Parameter(a, requires_grad=old_a.requires_grad)
    new_b = nn.Parameter(b, requires_grad=old_b.requires_grad)
    if isinstance(layer, LoraEmbedding):
        layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name] = new_a, new_b
        return
    module_a, module_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    module_a.weight, module_b.weight = new_a, new_b
    for module, attr, dim in ((module_a, "out_features", 0), (module_a, "out_channels", 0),
                              (module_b, "in_features", 1), (module_b, "in_channels", 1)):
        if hasattr(module, attr):
            setattr(module, attr, (a if module is module_a else b).shape[dim])


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: LoraConfig | dict[str, LoraConfig] | None = None,
                                       check_compiled: str = "error") -> None:
    """Pad every LoRA adapter of `model` to rank `target_rank` (default: the largest rank loaded) and turn each
    scaling into a tensor, so that later `hotswap_adapter` calls with ranks up to `target_rank` and any alpha do
    not recompile a torch.compile'd model. Call it before torch.compile.

    `config` is accepted as in peft, which rewrites the configs' rank to `target_rank`; deltatune leaves them
    alone, since each adapter keeps its own rank (the padding is cut off again on save). `check_compiled` says what
    to do with an already compiled model: "error", "warn" (go on; the swaps will recompile) or "ignore"."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}.")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        message = ("prepare_model_for_compiled_hotswap should run before torch.compile: on the compiled model, "
                   "the padding itself recompiles.")
        if check_compiled == "error":
            raise ValueError(message + " Pass check_compiled='warn' to go on anyway.")
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    layers = [layer for _, layer in adapter_layers(base_model_of(model)) if isinstance(layer, LoraLayer)]
    ranks = [_factors(layer, n)[0].shape[0] for layer in layers for n in layer.adapter_names]
    if not ranks:
        raise ValueError("The model has no LoRA layers to prepare for hot-swapping.")
    target = max(ranks) if target_rank is None else target_rank
    if target < max(ranks):
        raise ValueError(f"target_rank={target} is smaller than a loaded adapter's rank ({max(ranks)}).")
    dora = sorted({name for layer in layers for name in layer.lora_variant})
    if dora:  # refused before any layer is padded
        raise ValueError(f"Adapter(s) {dora} use DoRA, which hot-swapping does not support yet.")
    for layer in layers:
        for name in layer.adapter_names:
            a, b = _factors(layer, name)
            pad = target - a.shape[0]
            if pad:
                with torch.no_grad():
                    _set_factors(layer, name, torch.cat([a, a.new_zeros(pad, *a.shape[1:])]),
                                 torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1))
            scaling = layer.scaling[name]
            if not torch.is_tensor(scaling):
                layer.scaling[name] = torch.tensor(scaling, device=a.device)


def hotswap_adapter(model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                    torch_device: str | None = None, subfolder: str | None = None, revision: str | None = None
                    ) -> None:
    """Replace the weights of the loaded LoRA adapter `adapter_name` of `model` (a PeftModel) with those of the
    adapter saved at `model_name_or_path` (`subfolder` / `revision` as in from_pretrained), in place. The new
    adapter must target the same modules or a subset (layers it leaves out are zeroed), with a rank no larger than
    the loaded (or padded) one. `torch_device` is accepted as in peft; the weights always go to the device of the
    parameters they replace."""
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"No adapter named {adapter_name!r} to hot-swap. Loaded adapters: {sorted(model.peft_config)}."
        )
    if any(adapter_name in layer.merged_adapters for _, layer in _lora_layers(model, adapter_name)):
        raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before "
                         "hot-swapping it (a swap now would leave the old adapter merged in for good).")
    old_config = model.peft_config[adapter_name]
    directory = resolve_adapter_dir(model_name_or_path, subfolder, revision)
    config = PeftConfig.from_pretrained(directory)
    for which, cfg in (("loaded", old_config), ("new", config)):
        if cfg.peft_type != "LORA" or cfg.use_dora or cfg.modules_to_save:
            what = cfg.peft_type if cfg.peft_type != "LORA" else "DoRA" if cfg.use_dora else "has modules_to_save"
            raise ValueError(f"Hot-swapping supports plain LoRA adapters without modules_to_save; the {which} "
                             f"adapter is {what}.")
    state_dict, path = load_adapter_weights(directory)
    live = adapter_parameter_map(model, adapter_name)
    # peft writes the base weights of an adapted embed_tokens / lm_head beside the adapter; they go into the frozen
    # base layer in place, as a load would put them.
    base_weights = {k: p for k, p in loadable_embedding_weights(model, adapter_name).items() if k in state_dict}
    for key, param in base_weights.items():
        if state_dict[key].shape != param.shape:
            raise AdapterLoadError(f"{key} in {path} has shape {tuple(state_dict[key].shape)}, the model "
                                   f"{tuple(param.shape)}: hot-swapping cannot resize the vocabulary.")
    unknown = sorted(set(state_dict) - set(live) - set(base_weights))
    if unknown:
        raise AdapterLoadError(
            f"{path} adapts modules that adapter {adapter_name!r} does not ({len(unknown)} keys, e.g. "
            f"{unknown[:5]}); hot-swapping cannot add LoRA layers. Load it with load_adapter instead."
        )
    updates, ranks = _checked_updates(model, adapter_name, state_dict, path)
    updates += [(param, state_dict[key].to(device=param.device, dtype=param.dtype))
                for key, param in base_weights.items()]
    with torch.no_grad():
        for param, tensor in updates:
            param.zero_()
            if tensor is not None:
                param[tuple(slice(0, n) for n in tensor.shape)].copy_(tensor)
    for name, layer in _lora_layers(model, adapter_name):
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        scaling = lora_scaling(r, alpha, config.use_rslora)
        layer.r[adapter_name] = ranks[name]
        layer.lora_alpha[adapter_name] = alpha
        _set_dropout(layer, adapter_name, config.lora_dropout)
        if torch.is_tensor(layer.scaling[adapter_name]):
            layer.scaling[adapter_name].fill_(scaling)
        else:
            layer.scaling[adapter_name] = scaling
    config.inference_mode = old_config.inference_mode
    model.peft_config[adapter_name] = config


def _set_dropout(layer: LoraLayer, adapter_name: str, p: float) -> None:
    current = layer.lora_dropout[adapter_name]
    if isinstance(current, nn.Dropout) and p > 0:
        current.p = p
    elif isinstance(current, nn.Dropout) or p > 0:
        # a new module starts in training mode: it takes the layer's, or an eval model would drop out
        layer.lora_dropout[adapter_name] = (nn.Dropout(p) if p > 0 else nn.Identity()).train(layer.training)


def _checked_updates(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], path: str
                     ) -> tuple[list[tuple[nn.Parameter, torch.Tensor | None]], dict[str, int]]:
    """(live parameter, new value or None for zeros) pairs, after every shape check: a refused swap writes nothing.
    Also each layer's rank in the new adapter (0 where it has no factors), which save cuts the padding back to."""
    prefix = "base_model.model."
    updates = []
    ranks: dict[str, int] = {}
    for name, layer in _lora_layers(model, adapter_name):
        ranks[name] = 0
        for suffix, param in layer.adapter_parameters(adapter_name):
            key = f"{prefix}{name}.{suffix}"
            tensor = state_dict.get(key)
            if tensor is None:
                updates.append((param, None))
                continue
            rank_dim = 0 if suffix.endswith(("lora_A.weight", "lora_embedding_A")) else 1
            other = [d for d in range(param.dim()) if d != rank_dim]
            if tensor.dim() != param.dim() or any(tensor.shape[d] != param.shape[d] for d in other):
                raise AdapterLoadError(
                    f"{key} in {path} has shape {tuple(tensor.shape)}, the model {tuple(param.shape)}: only the "
                    "rank may differ. Was the adapter trained on another base model?"
                )
            if tensor.shape[rank_dim] > param.shape[rank_dim]:
                raise AdapterLoadError(
                    f"{path} has rank {tensor.shape[rank_dim]} at {key}, larger than the loaded rank "
                    f"{param.shape[rank_dim]}. Make room first with prepare_model_for_compiled_hotswap(model, "
                    f"target_rank={tensor.shape[rank_dim]}) (or more), once, before any torch.compile; or load the "
                    "adapter with load_adapter if the model is not compiled."
                )
            ranks[name] = max(ranks[name], tensor.shape[rank_dim])
            updates.append((param, tensor.to(device=param.device, dtype=param.dtype)))
    return updates, ranks
