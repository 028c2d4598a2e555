"""BitFitConfig: deltatune's own method (peft has no BitFit); fields follow peft's naming conventions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltatune.config import PeftConfig, ordered_names

# The target_modules a config with None stands for: a regex matching every module; those without a bias
# are passed over, so this selects exactly the layers that have one.
EVERY_MODULE = ".*"


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit: train only the biases, as a per-adapter delta added to each targeted layer's bias.

    target_modules: module-name suffixes (list) or a regex fully matched against the module's full name (str);
    None for every layer that has a bias. Targeted layers without a bias are passed over.
    """

    peft_type: ClassVar[str] = "BITFIT"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = ordered_names(self.target_modules)
        self.exclude_modules = ordered_names(self.exclude_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def complete_bitfit_config(model: nn.Module, config: BitFitConfig) -> BitFitConfig:
    """Resolve target_modules=None to every module; fail early on a model without any bias."""
    if not any(has_bias(module) for module in model.modules()):
        raise ValueError(
            f"BitFit trains biases, and no layer of this {type(model).__name__} has one (Llama-style models "
            "use bias-free linear and norm layers). Use another method, such as LoRA or IA3."
        )
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=EVERY_MODULE)
