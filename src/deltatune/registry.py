"""The one table of PEFT methods. Each method folder registers itself here when it is imported, which importing
the `deltatune` package does for every built-in method (deltatune.methods); the table imports no method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from deltatune.config import PeftConfig


@dataclass(frozen=True)
class Method:
    """What the generic machinery needs from a method.

    `layer_cls` is the base class of the method's injected layers.
    `create_layer(target, adapter_name, config, module_name)` wraps one matched module in the method's
    adapter layer; returning None means "this module type is not supported" (the injector reports it);
    returning the module unchanged means "nothing to adapt here, pass over it" (BitFit, a layer without bias).
    `default_targets` maps a transformers `model_type` to the module names used when target_modules is None.
    `prepare_config(model, config)`, if given, returns a copy of the config completed with what only the model
    can tell (IA3's feedforward_modules for the architecture); it runs before target matching and must not
    modify its argument.
    `create_prompt_encoder(config, word_embeddings, table_only)` builds a prompt-learning method's encoder, a
    module whose forward() returns its table of virtual-token vectors; `table_only` (loading a saved table)
    asks for the plain table form.
    `in_peft` says whether peft knows the method, and so reads its adapter files.
    """

    peft_type: str
    config_cls: type[PeftConfig]
    layer_cls: type[nn.Module] | None = None
    create_layer: Callable[[nn.Module, str, PeftConfig, str], nn.Module | None] | None = None
    default_targets: dict[str, list[str]] | None = None
    prepare_config: Callable[[nn.Module, PeftConfig], PeftConfig] | None = None
    create_prompt_encoder: Callable[[PeftConfig, nn.Module, bool], nn.Module] | None = None
    in_peft: bool = True


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.peft_type in _METHODS:
        raise ValueError(f"A PEFT method named {method.peft_type!r} is already registered.")
    _METHODS[method.peft_type] = method
    return method


def get_method(peft_type: str) -> Method:
    if peft_type not in _METHODS:
        raise ValueError(f"Unknown peft_type {peft_type!r}. deltatune knows: {sorted(_METHODS)}.")
    return _METHODS[peft_type]


def known_methods() -> list[str]:
    return sorted(_METHODS)
