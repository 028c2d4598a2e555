"""Injection: find the modules a config targets, swap in adapter layers, and act on all of them at once.

These functions work on any nn.Module (a transformers model or a custom one); `PeftModel` calls them.
Module names are relative to the model passed in, as in peft's matching rules.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.checkpoint import adapter_parameter_map, check_adapter_name
from deltatune.config import PeftConfig
from deltatune.layers import AdapterLayer, adapter_layers, modules_of_type
from deltatune.modules_to_save import ModulesToSaveWrapper
from deltatune.quantized import keep_differentiable, warn_requantization
from deltatune.registry import Method, get_method

ALL_LINEAR = "all-linear"
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


# --- matching ----------------------------------------------------------------------------------
def _user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the internals of adapter layers and modules_to_save wrappers."""
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrappers):
            continue
        if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
            wrappers.append(name)
        if name:
            yield name, module


def _ends_with(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def is_target(name: str, config: PeftConfig, targets: list[str] | str) -> bool:
    """peft's matching rules: exclusions first, then regex / suffix matching, then layer selection."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            return False
        if not isinstance(exclude, str) and any(_ends_with(name, key) for key in exclude):
            return False
    for keep in getattr(config, "modules_to_save", None) or []:
        if re.match(rf"(^|.*\.){keep}($|\..*)", name):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:  # named in full: peft adapts it whatever layers_to_transform says
        return True
    if not any(_ends_with(name, key) for key in targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers is None or layers == []:
        return True
    index = _layer_index(name, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _output_head_names(model: nn.Module, config: PeftConfig) -> set[str]:
    heads: list[nn.Module] = []
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        heads.append(output)
    elif config.task_type == "SEQ_CLS":
        heads += [getattr(model, n) for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, module in model.named_modules() if any(module is head for head in heads)}


def resolve_targets(model: nn.Module, config: PeftConfig, method: Method) -> list[str] | str:
    """The concrete target_modules for this model: defaults filled in, "all-linear" expanded, sorted."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = method.default_targets or {}
        if model_type not in defaults:
            raise ValueError(
                f"target_modules is None and deltatune has no default {method.peft_type} targets for "
                f"model_type={model_type!r}. Set target_modules, e.g. to some of these layer names: "
                f"{_leaf_names(model, linear_only=True)}, or to 'all-linear'."
            )
        return sorted(defaults[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        excluded = _output_head_names(model, config)
        names = {
            name
            for name, module in _user_modules(model)
            if _is_linear(module) and name not in excluded
        }
        if not names:
            raise ValueError("target_modules='all-linear' found no linear layer in this model.")
        leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
        # Short leaf names when they select exactly the same layers, full names otherwise.
        same = {n for n, m in _user_modules(model) if _is_linear(m) and any(_ends_with(n, k) for k in leaves)}
        expanded = leaves if same == names else sorted(names)
        # IA3's feedforward_modules (dotted defaults such as "output.dense") must stay a subset of the saved
        # target_modules, or neither library loads the file back; they name layers already selected.
        feedforward = getattr(config, "feedforward_modules", None)
        return sorted({*expanded, *feedforward}) if isinstance(feedforward, list) else expanded
    return sorted(targets) if isinstance(targets, list) else targets  # a list is a set of names to peft


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, AdapterLayer):
        module = module.base_layer
    return isinstance(module, nn.Linear | Conv1D)


def _leaf_names(model: nn.Module, linear_only: bool = False, limit: int = 60) -> list[str]:
    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in _user_modules(model)
            if (_is_linear(module) if linear_only else not name.rsplit(".", 1)[-1].isdigit())
        }
    )
    return names[:limit]


# --- swapping ----------------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def inject_adapter(model: nn.Module, config: PeftConfig, adapter_name: str) -> PeftConfig:
    """Wrap every targeted module with the method's adapter layer; returns the config as resolved.

    The caller's config is never modified: the returned copy holds the concrete target list.
    """
    check_adapter_name(adapter_name)
    method = get_method(config.peft_type)
    if method.prepare_config is not None:
        config = method.prepare_config(model, config)
    targets = resolve_targets(model, config, method)
    # Set, not dataclasses.replace: the config was checked as the user wrote it, and re-running its checks on the
    # expanded names would compare them with the unexpanded ones (IA3's feedforward_modules subset check).
    resolved = copy.deepcopy(config)
    resolved.target_modules = targets
    matched = 0
    wrapped: list[str] = []  # names wrapped so far: a target inside one would be lost in its base layer
    for name, module in list(_user_modules(model)):
        if not is_target(name, resolved, targets):
            continue
        outer = next((w for w in wrapped if name.startswith(w + ".")), None)
        if outer is not None:
            raise ValueError(
                f"target_modules selects both {outer} and {name}, which sits inside it; adapter layers never nest. "
                "Target one of the two."
            )
        if isinstance(module, AdapterLayer) and not isinstance(module, method.layer_cls):
            raise ValueError(
                f"{name} already carries a {type(module).__name__} adapter; one module cannot hold adapters "
                f"of two methods. Exclude it from target_modules for {method.peft_type}."
            )
        new = method.create_layer(module, adapter_name, resolved, name)
        if new is not module and isinstance(new, AdapterLayer):
            _refuse_nesting(name, module, method)
        if new is None:
            if isinstance(targets, list) and not any(name == t or name.endswith("." + t) for t in targets):
                continue
            raise ValueError(
                f"Target module {name} is a {type(module).__name__}, which {method.peft_type} cannot wrap. "
                f"Leave it out of target_modules, or target layers of a kind {method.peft_type} adapts."
            )
        if new is module and not isinstance(new, AdapterLayer):
            continue  # the method passes over this module (BitFit: a layer without a bias)
        if new is not module:
            _replace(model, name, new)
            wrapped.append(name)
        matched += 1
    if matched == 0:
        hidden = _targets_inside_adapter_layers(model, resolved, targets)
        if hidden:
            raise ValueError(
                f"target_modules={targets!r} matches only modules inside another adapter's layer ({hidden[0]}); "
                "adapter layers never nest. Delete that adapter first, or target other modules."
            )
        raise ValueError(
            f"target_modules={targets!r} matched no module of this model that {method.peft_type} can adapt. "
            f"Module names that exist: "
            f"{_leaf_names(model)}"
        )
    _record_weight_layout(model, resolved, adapter_name)
    for _, layer in adapter_layers(model):  # new layers and adapters follow the mode of the model around them
        if adapter_name in layer.adapter_names:
            layer.train(layer.base_layer.training)
    keep_differentiable(model)  # quantized layers
    tie = getattr(resolved, "ensure_weight_tying", False)
    if tie:
        _refuse_tied_targets(model, adapter_name)
    if getattr(resolved, "modules_to_save", None):
        add_modules_to_save(model, resolved.modules_to_save, adapter_name, tie=tie)
    return resolved


def _record_weight_layout(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """The layers read their weight layout from their own type (check_fan_in_fan_out warns on a mismatch); the
    saved config states it too, as peft's does, when every adapted layer agrees (GPT-2's Conv1D: true)."""
    if not hasattr(config, "fan_in_fan_out"):
        return
    layouts = {getattr(layer, "fan_in_fan_out", None) for _, layer in adapter_layers(model)
               if adapter_name in layer.adapter_names}
    if len(layouts) == 1 and None not in layouts:
        config.fan_in_fan_out = layouts.pop()


def _refuse_tied_targets(model: nn.Module, adapter_name: str) -> None:
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names and next(_tied_partners(model, layer.base_layer), None) is not None:
            raise ValueError(
                f"ensure_weight_tying=True with a LoRA target ({name}) whose weight is tied to another module: "
                "deltatune ties modules_to_save copies only. Put that module in modules_to_save instead, or set "
                "ensure_weight_tying=False."
            )


def _targets_inside_adapter_layers(model: nn.Module, config: PeftConfig, targets: list[str] | str) -> list[str]:
    """Names of target modules that sit inside an adapter layer's base module (a block a bottleneck wraps)."""
    found = []
    for name, layer in adapter_layers(model):
        for inner, _ in layer.base_layer.named_modules():
            if inner and is_target(f"{name}.{inner}", config, targets):
                found.append(f"{name}.base_layer.{inner}")
    return found


def _refuse_nesting(name: str, module: nn.Module, method: Method) -> None:
    """Adapter layers never nest: one inside another would escape disable_adapter, set_adapter and delete."""
    inner = next((n for n, m in module.named_modules() if m is not module and isinstance(m, AdapterLayer)), None)
    if inner is not None:
        raise ValueError(
            f"{name} holds adapter layers of another adapter ({name}.{inner}); {method.peft_type} cannot wrap it. "
            "Target modules that no adapter has reached into yet, or delete that adapter first."
        )


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str, tie: bool = False) -> None:
    """Give each named module a trainable copy for this adapter.

    A module whose weight the model ties to another's (lm_head and embed_tokens) gets an untied copy, as in peft
    by default: the partner keeps the original weight. With `tie` (LoraConfig's ensure_weight_tying) the partner
    is wrapped too and shares the copy's weights, so tying holds through training, saving and merging."""
    found = False
    for name, _ in list(_user_modules(model)):
        if not any(_ends_with(name, key) for key in names):
            continue
        found = True
        module = model.get_submodule(name)  # may have been wrapped earlier in this loop
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        if wrapper is not module:
            _replace(model, name, wrapper)
        if adapter_name in wrapper.modules_to_save:
            continue  # already added as the tied partner of an earlier target
        if not tie:
            wrapper.add_copy(adapter_name)
            partners = [n for n, _ in _tied_partners(model, wrapper.original_module, skip=wrapper)]
            if partners:
                warnings.warn(f"{name} shares its weight with {partners}: its modules_to_save copy is trained apart "
                              "and the tie is broken, as in peft. Set ensure_weight_tying=True (LoraConfig) to keep "
                              "them tied.", stacklevel=3)
            continue
        wrapper.add_copy(adapter_name, shared_from=_tied_owner(model, wrapper, adapter_name))
        _wrap_tied_partners(model, name, wrapper, adapter_name, names)
    if not found:
        raise ValueError(f"modules_to_save={names} matched no module. Module names that exist: {_leaf_names(model)}")


def _direct_parameter_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters(recurse=False)}


def _tied_owner(model: nn.Module, wrapper: ModulesToSaveWrapper, adapter_name: str):
    """(original, copy) of another wrapper whose original shares weights with this one, if any."""
    mine = {id(p) for p in wrapper.original_module.parameters()}
    for _, other in wrappers(model):
        if other is not wrapper and adapter_name in other.modules_to_save:
            if mine & {id(p) for p in other.original_module.parameters()}:
                return other.original_module, other.modules_to_save[adapter_name]
    return None


def _tied_partners(model: nn.Module, original: nn.Module, skip: nn.Module | None = None
                   ) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the other modules that own a parameter of `original` (an input embedding tied to
    lm_head); a modules_to_save wrapper is judged by its original module."""
    params = {id(p) for p in original.parameters()}
    for name, module in list(_user_modules(model)):
        if module is skip or module is original or isinstance(module, AdapterLayer):
            continue
        inner = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        if inner is not original and _direct_parameter_ids(inner) & params:
            yield name, module


def _wrap_tied_partners(
    model: nn.Module, owner_name: str, owner: ModulesToSaveWrapper, adapter_name: str, requested: list[str]
) -> None:
    """Wrap the modules that own a parameter tied to the owner's (an input embedding tied to lm_head)."""
    for name, module in _tied_partners(model, owner.original_module, skip=owner):
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        if wrapper is not module:
            _replace(model, name, wrapper)
        if adapter_name not in wrapper.modules_to_save:
            wrapper.add_copy(adapter_name, shared_from=(owner.original_module, owner.modules_to_save[adapter_name]))
        if not any(_ends_with(name, key) for key in requested):
            wrapper.tied_to = owner_name


# --- acting on every adapter layer ------------------------------------------------------------
def mark_trainable(model: nn.Module, adapter_name: str, config: PeftConfig | None) -> None:
    """Freeze everything, then unfreeze what the adapter saves: trained == saved, by construction."""
    for param in model.parameters():
        param.requires_grad_(False)
    if config is None or config.inference_mode:
        return
    for param in adapter_parameter_map(model, adapter_name, getattr(config, "bias", "none")).values():
        param.requires_grad_(True)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Add an adapter to any nn.Module in place (no wrapper); only the adapter stays trainable."""
    config = inject_adapter(model, peft_config, adapter_name)
    set_active_adapters(model, [adapter_name])
    mark_trainable(model, adapter_name, config)
    return model


def wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    return modules_of_type(model, ModulesToSaveWrapper)


def set_active_adapters(model: nn.Module, adapter_names: list[str]) -> None:
    for _, layer in adapter_layers(model):
        layer.set_adapter(adapter_names)
    for _, wrapper in wrappers(model):
        wrapper.set_adapter(next((n for n in adapter_names if n in wrapper.modules_to_save), None))


def set_disabled(model: nn.Module, disabled: bool) -> None:
    for _, module in [*adapter_layers(model), *wrappers(model)]:
        module.disabled = disabled


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    for _, module in [*adapter_layers(model), *wrappers(model)]:
        module.delete_adapter(adapter_name)
    # Layers left without any adapter go back to their base module.
    for name, layer in list(adapter_layers(model)):
        if not layer.adapter_names:
            _replace(model, name, layer.base_layer)
    for name, wrapper in list(wrappers(model)):
        if not wrapper.modules_to_save:
            _replace(model, name, wrapper.original_module)


def merge_adapters(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False
                   ) -> None:
    layers = [layer for _, layer in adapter_layers(model)]
    if safe_merge:  # check every layer before changing any: a refused merge leaves the model as it was
        for layer in layers:
            layer.check_merge(adapter_names)
    for layer in layers:
        layer.merge(adapter_names, safe_merge=safe_merge)
    warn_requantization(model, "merging")


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
           ) -> nn.Module:
    """Remove every adapter module. With merge, active adapters and modules_to_save copies are kept."""
    if merge:
        merge_adapters(model, adapter_names, safe_merge)
    for name, layer in list(adapter_layers(model)):
        _replace(model, name, layer.base_layer)
    for name, wrapper in list(wrappers(model)):
        _replace(model, name, wrapper.active_module() if merge else wrapper.original_module)
    return model
