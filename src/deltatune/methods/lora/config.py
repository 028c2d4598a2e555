"""LoraConfig: the names, defaults and meanings of peft's LoraConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from deltatune.config import PeftConfig
from deltatune.methods.lora.init import mutates_base

# Used when target_modules is None, keyed by transformers' `config.model_type`.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "vit": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

VALID_BIAS = ("none", "all", "lora_only")
VALID_INITS = (True, False, "gaussian", "pissa", "pissa_niter_[number of iters]", "olora")


def _valid_init(init: object) -> bool:
    return init is True or init is False or init == "gaussian" or mutates_base(init)


@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adapters: W x + (alpha / r) * B A x, with B starting at zero so a new adapter is a no-op.

    target_modules: module-name suffixes (list), a regex fully matched against the module's full name (str),
    "all-linear" (every linear layer but the output head), or None for the architecture's defaults.
    rank_pattern / alpha_pattern: {regex matching the end of a module name: r or alpha} overrides.
    use_dora: weight-decomposed LoRA (DoRA), on every supported layer type (see methods/lora/dora.py).
    """

    peft_type: ClassVar[str] = "LORA"
    # peft keys for features deltatune does not implement, with peft's defaults (see PeftConfig).
    peft_only_defaults: ClassVar[dict[str, Any]] = {
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "corda_config": None,
        "eva_config": None,
        "kasa_config": None,
        "layer_replication": None,
        "loftq_config": {},
        "lora_bias": False,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_qalora": False,
        "velora_config": None,
    }

    r: int = 8
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    use_rslora: bool = False
    # DoRA: W' = m * (W + s B A) / ||W + s B A|| per output feature, m trainable (methods/lora/dora.py).
    use_dora: bool = False
    init_lora_weights: bool | str = True
    # With tied weights (lm_head and embed_tokens), a modules_to_save copy of one keeps the other tied to it.
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}.")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in VALID_BIAS:
            raise ValueError(f"bias must be one of {VALID_BIAS}, got {self.bias!r}.")
        if not _valid_init(self.init_lora_weights):
            raise ValueError(
                f"init_lora_weights must be one of {VALID_INITS}, got {self.init_lora_weights!r}."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be combined with a regex target_modules: "
                "put the layer indices in the regex instead, or pass target_modules as a list."
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both.")
        # Sets (peft accepts them) serialise in random order: store a sorted list.
        if isinstance(self.target_modules, set | tuple):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, set | tuple):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)
