"""LoRA: low-rank updates injected into linear, embedding and convolution layers."""

from deltatune.methods.lora.config import DEFAULT_LORA_TARGETS, LoraConfig
from deltatune.methods.lora.init import refuse_tied_targets
from deltatune.methods.lora.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, create_lora_layer
from deltatune.registry import Method, register_method

register_method(
    Method(
        peft_type=LoraConfig.peft_type,
        config_cls=LoraConfig,
        layer_cls=LoraLayer,
        create_layer=create_lora_layer,
        default_targets=DEFAULT_LORA_TARGETS,
        prepare_config=refuse_tied_targets,
    )
)

__all__ = ["LoraConfig", "LoraConv", "LoraEmbedding", "LoraLayer", "LoraLinear"]
