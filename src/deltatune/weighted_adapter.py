"""PeftModel.add_weighted_adapter: a new LoRA adapter that combines loaded ones (peft's combination types).

This is the model side: it checks the request against the model, adds the new adapter and fills each of its layers;
the combination math, per tensor and per layer, is `deltatune.methods.lora.merging`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

from deltatune import injection
from deltatune.layers import adapter_layers
from deltatune.methods.lora.config import LoraConfig
from deltatune.methods.lora.init import mutates_base
from deltatune.methods.lora.layers import LoraConv, LoraLayer
from deltatune.methods.lora.merging import (
    COMBINATION_TYPES,
    FACTOR_WISE,
    NEEDS_DENSITY,
    SIGN_METHODS,
    combined_config,
    fill_combined,
    max_rank,
)

if TYPE_CHECKING:
    from deltatune.peft_model import PeftModel


def add_weighted_adapter(
    model: PeftModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add `adapter_name`, a weighted combination of LoRA `adapters` (see the module docstring); it is not
    activated. A modules_to_save copy held by one of the adapters is copied into the new adapter.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile of the factors' entries, between 0 and 1; got {svd_clamp!r}.")
    configs = _check_arguments(model, adapters, weights, adapter_name, combination_type, density,
                               majority_sign_method)
    combination = "linear" if len(adapters) == 1 else combination_type
    rank = _new_rank(combination, configs, svd_rank)
    config = combined_config(configs, rank)
    # After a first adapter initialised from the base (PiSSA, OLoRA), inject with init False: it leaves the base
    # alone and draws what peft's injection draws, which keeps DARE's masks in step with peft.
    from_base = mutates_base(configs[0].init_lora_weights)
    model.add_adapter(adapter_name, dataclasses.replace(config, init_lora_weights=False) if from_base else config)
    model.peft_config[adapter_name].init_lora_weights = config.init_lora_weights
    try:
        _fill_layers(model, adapters, weights, adapter_name, combination, rank, density, majority_sign_method,
                     svd_clamp, svd_full_matrices, svd_driver)
        _copy_modules_to_save(model, adapters, adapter_name)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def _check_arguments(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str,
                     combination_type: str, density: float | None, majority_sign_method: str) -> list[LoraConfig]:
    if not adapters or len(adapters) != len(weights):
        raise ValueError(
            f"add_weighted_adapter needs one weight per adapter; got {len(adapters)} adapter(s) and "
            f"{len(weights)} weight(s)."
        )
    if adapter_name in model.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name for the new adapter.")
    unknown = [name for name in adapters if name not in model.peft_config]
    if unknown:
        raise ValueError(f"No adapter named {unknown[0]!r}. Loaded adapters: {sorted(model.peft_config)}.")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Unknown combination_type {combination_type!r}; choose one of {list(COMBINATION_TYPES)}.")
    configs = [model.peft_config[name] for name in adapters]
    for name, config in zip(adapters, configs, strict=True):
        if not isinstance(config, LoraConfig):
            raise ValueError(
                f"add_weighted_adapter combines LoRA adapters, but {name!r} is a {config.peft_type} adapter."
            )
        if getattr(config, "use_dora", False):
            raise ValueError(f"add_weighted_adapter does not support DoRA adapters ({name!r} uses DoRA).")
    if combination_type.removesuffix("_svd") in NEEDS_DENSITY and len(adapters) > 1:
        if density is None or not 0 < density <= 1:
            raise ValueError(
                f"combination_type={combination_type!r} prunes each adapter: pass density, the fraction of entries "
                f"to keep, above 0 and at most 1 (got {density!r})."
            )
        if density == 1:
            warnings.warn("density=1 keeps every entry: nothing is pruned.", stacklevel=3)
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}.")
    grouped = [name for name, layer in adapter_layers(model.get_base_model())
               if isinstance(layer, LoraConv) and layer.base_layer.groups > 1
               and any(adapter in layer.adapter_names for adapter in adapters)]
    if grouped:
        raise ValueError(
            f"add_weighted_adapter cannot combine adapters on grouped convolutions ({grouped}): their B factor holds "
            "one block per group, which none of the combination types handles. Train the adapters without those "
            "layers in target_modules, or merge them into the weights with merge_adapter instead."
        )
    shared = [
        name for name, wrapper in injection.wrappers(model.get_base_model())
        if sum(adapter in wrapper.modules_to_save for adapter in adapters) > 1
    ]
    if shared:
        raise ValueError(
            f"Several of the adapters have their own copy of {shared} (modules_to_save), and such copies cannot be "
            "combined. Combine adapters of which at most one trains each of these modules."
        )
    return configs


def _new_rank(combination: str, configs: list[LoraConfig], svd_rank: int | None) -> int:
    ranks = [max_rank(config) for config in configs]
    if combination in FACTOR_WISE:
        if len(set(ranks)) > 1:
            raise ValueError(
                f"combination_type={combination!r} needs adapters of the same rank; these have ranks {ranks}. "
                "Use 'cat' (rank = sum of ranks) or 'svd' (rank = svd_rank) to combine adapters of different ranks."
            )
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def _fill_layers(model: PeftModel, adapters: list[str], weights: list[float], adapter_name: str, combination: str,
                 rank: int, density: float | None, majority_sign_method: str, clamp: float | None,
                 full_matrices: bool, driver: str | None) -> None:
    for _, layer in adapter_layers(model.get_base_model()):
        if isinstance(layer, LoraLayer) and adapter_name in layer.adapter_names:
            fill_combined(layer, adapters, weights, adapter_name, combination, rank, density, majority_sign_method,
                          clamp, full_matrices, driver)


def _copy_modules_to_save(model: PeftModel, adapters: list[str], adapter_name: str) -> None:
    for _, wrapper in injection.wrappers(model.get_base_model()):
        owners = [name for name in adapters if name in wrapper.modules_to_save]
        if owners and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owners[0]].state_dict())
