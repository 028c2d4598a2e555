"""IA3Config: the names, defaults and meanings of peft's IA3Config, and the per-architecture defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltatune.config import PeftConfig, ordered_names

# model_type: (target_modules, feedforward_modules), used where the config leaves them None.
# Feedforward modules get their vector on the input (the paper's FFN rescaling), the others on the output.
IA3_DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "vit": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
}
DEFAULT_IA3_TARGETS: dict[str, list[str]] = {model_type: t for model_type, (t, _) in IA3_DEFAULTS.items()}


@dataclass
class IA3Config(PeftConfig):
    """(IA)^3: learned vectors that rescale the activations of the targeted layers, starting at ones.

    target_modules: module-name suffixes (list), a regex fully matched against the module's full name (str),
    "all-linear", or None for the architecture's defaults (IA3_DEFAULTS).
    feedforward_modules: the targets whose vector scales the layer's input instead of its output; suffixes
    (list) or a regex (str), with peft's matching rules. None: the architecture's defaults, restricted to the
    targets; no feedforward module for an architecture the table does not know.
    init_ia3_weights: False starts the vectors random instead of at ones (for tests and research).
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = ordered_names(self.target_modules)
        self.exclude_modules = ordered_names(self.exclude_modules)
        self.feedforward_modules = ordered_names(self.feedforward_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            strays = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if strays:
                raise ValueError(
                    f"feedforward_modules must be a subset of target_modules; {strays} are not in "
                    f"target_modules={self.target_modules}. Add them to target_modules or drop them."
                )


def complete_ia3_config(model: nn.Module, config: IA3Config) -> IA3Config:
    """Fill feedforward_modules from the architecture's defaults when the config leaves it None.

    Defaults outside an explicit target list are left out (peft keeps them, and then cannot reload the
    file it wrote: its own subset check refuses it); they would select nothing anyway.
    """
    if config.feedforward_modules is not None:
        return config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default_targets, feedforward = IA3_DEFAULTS.get(model_type, ([], []))
    targets = config.target_modules if config.target_modules is not None else default_targets
    if isinstance(targets, list):
        feedforward = [name for name in feedforward if name in targets]
    return dataclasses.replace(config, feedforward_modules=sorted(feedforward))
