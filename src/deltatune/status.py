"""`get_layer_status` / `get_model_status`: what every adapter layer holds and does, in peft's fields.

For a model that behaves unexpectedly after loading, switching or merging: an adapter active on some layers only,
a merge left behind, adapter weights frozen where they should train, or spread over devices. The model status
folds the layers' into one value per field, "irregular" where the layers disagree. Field names and meanings are
peft's, so inspection code moves over unchanged; `module_type` is deltatune's class name ("LoraLinear" where peft
says "lora.Linear") and `adapter_model_type` the wrapper's ("TunedModel" where peft names a tuner class). A layer
lists only the active adapters it holds, so after `set_adapter` to an adapter that covers fewer layers than
another, the model's active adapters read as that adapter, where peft says "irregular". `quantization_backend`
names the layer's backend ("bitsandbytes 4-bit nf4") where peft 0.21 reports None for bitsandbytes layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from torch import nn

from deltatune.layers import AdapterLayer, modules_of_type
from deltatune.modules_to_save import ModulesToSaveWrapper
from deltatune.quantized import parameter_count

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]  # per adapter: all its parameters train, none do, or a mix
    available_adapters: list[str]
    devices: dict[str, list[str]]  # per adapter: the device types its parameters are on
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular


def _agree(values: Iterable[bool]) -> bool | Irregular:
    values = set(values)
    return values.pop() if len(values) == 1 else "irregular"


def _adapter_parameters(module: nn.Module, adapter: str) -> Iterator[nn.Parameter]:
    if isinstance(module, AdapterLayer):
        yield from (param for _, param in module.adapter_parameters(adapter))
    else:
        yield from module.modules_to_save[adapter].parameters()


def _layer_status(name: str, module: AdapterLayer | ModulesToSaveWrapper) -> TunerLayerStatus:
    if isinstance(module, AdapterLayer):
        available, active, merged = module.adapter_names, module.active_adapters, module.merged_adapters
        backend = getattr(module, "backend", None)
        quantization = backend.describe(module.base_layer) if backend is not None else None
    else:
        available, merged, quantization = list(module.modules_to_save), [], None
        active = [module.active_adapter] if module.active_adapter is not None else []
    params = {adapter: list(_adapter_parameters(module, adapter)) for adapter in available}
    return TunerLayerStatus(
        name=name,
        module_type=type(module).__name__,
        enabled=not module.disabled,
        active_adapters=list(active),
        merged_adapters=list(merged),
        requires_grad={adapter: _agree(p.requires_grad for p in ps) for adapter, ps in params.items() if ps},
        available_adapters=sorted(available),
        devices={adapter: sorted({p.device.type for p in ps}) for adapter, ps in params.items() if ps},
        quantization_backend=quantization,
    )


def _tuned(model: nn.Module) -> nn.Module:
    """Where layer names start: a PeftModel's `base_model`, so that they read "model.layers.0…" as in peft."""
    from deltatune.peft_model import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of each adapter layer (and modules_to_save wrapper) of a PeftModel, or of a model that adapters
    were injected into (`inject_adapter_in_model`), in module order."""
    layers = [_layer_status(name, module)
              for name, module in modules_of_type(_tuned(model), (AdapterLayer, ModulesToSaveWrapper))]
    if not layers:
        prompt = sorted(getattr(model, "prompt_encoder", {}))
        hint = (f" Its adapters {prompt} are prompt-learning adapters: they live in model.prompt_encoder, not in "
                "layers." if prompt else " Wrap it with get_peft_model or inject adapters (inject_adapter_in_model).")
        raise ValueError(f"No adapter layers in this {type(model).__name__}.{hint}")
    return layers


def _active_everywhere(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """The active adapters, or "irregular" if a layer that holds one of them does not run it (or runs another).
    A layer without an active adapter runs its base alone, as it should: that is not irregular."""
    active = list(dict.fromkeys(name for layer in layers for name in layer.active_adapters))
    for layer in layers:
        if layer.active_adapters != [name for name in active if name in layer.available_adapters]:
            return "irregular"
    return active


def _merged_everywhere(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """The adapters merged on some layer, or "irregular" if one of them sits unmerged on another layer."""
    merged = sorted({name for layer in layers for name in layer.merged_adapters})
    for layer in layers:
        if set(merged) & (set(layer.available_adapters) - set(layer.merged_adapters)):
            return "irregular"
    return merged


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The layers' status folded into one value per field: "irregular" where layers disagree, which means the
    model is in an inconsistent state (an adapter active or merged on some layers only)."""
    from deltatune.peft_model import PeftModel

    layers = get_layer_status(model)
    peft_types: dict[str, str] = {}
    if isinstance(model, PeftModel):
        peft_types = {name: str(config.peft_type) for name, config in model.peft_config.items()}
    adapters = sorted({name for layer in layers for name in layer.requires_grad})
    # modules_to_save copies are never quantized: they do not make a quantized model's backend irregular
    backends = {layer.quantization_backend for layer in layers if layer.module_type != ModulesToSaveWrapper.__name__}
    return TunerModelStatus(
        base_model_type=_base_model_type(model.get_base_model() if isinstance(model, PeftModel) else model),
        adapter_model_type=type(model.base_model).__name__ if isinstance(model, PeftModel) else "None",
        peft_types=peft_types,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=parameter_count(model),
        num_adapter_layers=len(layers),
        enabled=_agree(layer.enabled for layer in layers),
        active_adapters=_active_everywhere(layers),
        merged_adapters=_merged_everywhere(layers),
        requires_grad={name: _irregular_or(layer.requires_grad.get(name) for layer in layers) for name in adapters},
        available_adapters=sorted({name for layer in layers for name in layer.available_adapters}),
        devices={name: sorted({d for layer in layers for d in layer.devices.get(name, [])}) for name in adapters},
        quantization_backend=backends.pop() if len(backends) == 1 else ("irregular" if backends else None),
    )


def _base_model_type(model: nn.Module) -> str:
    """The transformers model class, or "other" for any other module, as peft says."""
    from transformers import PreTrainedModel

    return type(model).__name__ if isinstance(model, PreTrainedModel) else "other"


def _irregular_or(values: Iterable[bool | Irregular | None]) -> bool | Irregular:
    """One layer's "irregular" makes the model's irregular too; layers without the adapter do not count."""
    present = [value for value in values if value is not None]
    return "irregular" if "irregular" in present else _agree(present)


__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]
