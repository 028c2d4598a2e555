"""Prompt tuning: trainable virtual token embeddings in front of the input."""

from deltatune.methods.prompt_tuning.config import PromptTuningConfig, PromptTuningInit
from deltatune.methods.prompt_tuning.encoder import PromptEmbedding, create_prompt_embedding
from deltatune.registry import Method, register_method

register_method(
    Method(peft_type=PromptTuningConfig.peft_type, config_cls=PromptTuningConfig,
           create_prompt_encoder=create_prompt_embedding)
)

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]
