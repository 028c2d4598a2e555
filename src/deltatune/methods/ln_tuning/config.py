"""LNTuningConfig: the names, defaults and meanings of peft's LNTuningConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltatune.config import PeftConfig, ordered_names

# Used when target_modules is None, keyed by transformers' `config.model_type`.
DEFAULT_LN_TUNING_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": [
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
        "post_feedforward_layernorm", "norm",
    ],
    "gemma3_text": [
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
        "post_feedforward_layernorm", "norm",
    ],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bert": ["LayerNorm"],
    "roberta": ["LayerNorm"],
    "vit": ["layernorm_before", "layernorm_after", "layernorm"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "llava": [
        "multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
        "lm_head",
    ],
}


@dataclass
class LNTuningConfig(PeftConfig):
    """LayerNorm tuning: each adapter trains its own copy of the targeted normalisation layers.

    target_modules: module-name suffixes (list), a regex fully matched against the module's full name (str),
    or None for the architecture's norm layers (DEFAULT_LN_TUNING_TARGETS).
    """

    peft_type: ClassVar[str] = "LN_TUNING"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = ordered_names(self.target_modules)
        self.exclude_modules = ordered_names(self.exclude_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)
