"""P-tuning: virtual tokens produced by a small trainable encoder."""

from deltatune.methods.p_tuning.config import PromptEncoderConfig, PromptEncoderReparameterizationType
from deltatune.methods.p_tuning.encoder import PromptEncoder, create_prompt_encoder
from deltatune.registry import Method, register_method

register_method(
    Method(peft_type=PromptEncoderConfig.peft_type, config_cls=PromptEncoderConfig,
           create_prompt_encoder=create_prompt_encoder)
)

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]
