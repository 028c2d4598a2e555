"""Prefix tuning: learned key/value prefixes in every attention layer's cache."""

from deltatune.methods.prefix_tuning.config import PrefixTuningConfig
from deltatune.methods.prefix_tuning.encoder import PrefixEncoder, create_prefix_encoder
from deltatune.registry import Method, register_method

register_method(
    Method(peft_type=PrefixTuningConfig.peft_type, config_cls=PrefixTuningConfig,
           create_prompt_encoder=create_prefix_encoder)
)

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]
