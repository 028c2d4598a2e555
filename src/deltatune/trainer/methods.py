"""The trainer's method names and the adapter config each one builds from a TrainConfig.

One table: `check_method` (config validation), `build_peft_config` (the loop) and the CLI help all read it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from deltatune import (
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)

if TYPE_CHECKING:
    from deltatune.trainer.config import TrainConfig


@dataclass(frozen=True)
class Method:
    # (config, task_type, tokenizer folder) -> adapter config; None for full fine-tuning (no adapter).
    build: Callable[[TrainConfig, str, str], PeftConfig] | None
    keys: tuple[str, ...]  # the TrainConfig fields the method reads


def _targets(c: TrainConfig, default: str | None = None) -> list[str] | str | None:
    """target_modules as the adapter configs take it: a list of names, or the "all-linear" shorthand."""
    if c.target_modules in (None, []):
        return default
    return "all-linear" if c.target_modules == ["all-linear"] else list(c.target_modules)


def _lora(c: TrainConfig, task: str, _: str, use_dora: bool = False) -> PeftConfig:
    return LoraConfig(task_type=task, r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                      target_modules=_targets(c, default="all-linear"), use_dora=use_dora)


def _dora(c: TrainConfig, task: str, tokenizer_path: str) -> PeftConfig:
    return _lora(c, task, tokenizer_path, use_dora=True)


def _ia3(c: TrainConfig, task: str, _: str) -> PeftConfig:
    return IA3Config(task_type=task, target_modules=_targets(c))


def _prompt_tuning(c: TrainConfig, task: str, tokenizer_path: str) -> PeftConfig:
    text = c.prompt_init_text
    return PromptTuningConfig(
        task_type=task, num_virtual_tokens=c.num_virtual_tokens, prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_path if text else None,
    )


def _prefix(c: TrainConfig, task: str, _: str) -> PeftConfig:
    return PrefixTuningConfig(task_type=task, num_virtual_tokens=c.num_virtual_tokens,
                              prefix_projection=c.prefix_projection, encoder_hidden_size=c.encoder_hidden_size)


def _p_tuning(c: TrainConfig, task: str, _: str) -> PeftConfig:
    return PromptEncoderConfig(task_type=task, num_virtual_tokens=c.num_virtual_tokens,
                               encoder_hidden_size=c.encoder_hidden_size)


def _bottleneck(c: TrainConfig, task: str, _: str) -> PeftConfig:
    return BottleneckConfig(task_type=task, reduction_factor=c.reduction_factor, placement=c.placement,
                            target_modules=_targets(c))


LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "loraplus_lr_ratio")
METHODS: dict[str, Method] = {
    "lora": Method(_lora, LORA_KEYS),
    "dora": Method(_dora, LORA_KEYS),
    "ia3": Method(_ia3, ("target_modules",)),
    "prompt-tuning": Method(_prompt_tuning, ("num_virtual_tokens", "prompt_init_text")),
    "prefix": Method(_prefix, ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size")),
    "p-tuning": Method(_p_tuning, ("num_virtual_tokens", "encoder_hidden_size")),
    "bottleneck": Method(_bottleneck, ("reduction_factor", "placement", "target_modules")),
    "full": Method(None, ()),
}


def check_method(config: TrainConfig) -> None:
    """Unknown method: error. A method setting changed for a method that ignores it: warning."""
    from deltatune.trainer.config import ConfigError, TrainConfig

    if config.method not in METHODS:
        raise ConfigError(f"Unknown method {config.method!r}. Use one of: {', '.join(METHODS)}.")
    used = set(METHODS[config.method].keys)
    method_keys = {k for m in METHODS.values() for k in m.keys}
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    ignored = sorted(k for k in method_keys - used if getattr(config, k) != defaults[k])
    if ignored:
        warnings.warn(f"Method {config.method!r} does not use {', '.join(ignored)}; ignoring them.", stacklevel=3)
    build = METHODS[config.method].build
    if build is not None:  # the adapter config's own checks (placement, ...) now, not after the model has loaded
        try:
            build(config, "CAUSAL_LM", config.model)  # the tokenizer folder is the model's, not opened here
        except ValueError as err:
            raise ConfigError(f"method {config.method!r}: {err}") from err


def build_peft_config(config: TrainConfig, task_type: str, tokenizer_path: str) -> PeftConfig | None:
    """The adapter config to train, or None for full fine-tuning."""
    build = METHODS[config.method].build
    return None if build is None else build(config, task_type, tokenizer_path)
