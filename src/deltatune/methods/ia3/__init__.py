"""(IA)^3: learned vectors rescaling keys, values and feed-forward inputs."""

from deltatune.methods.ia3.config import DEFAULT_IA3_TARGETS, IA3_DEFAULTS, IA3Config, complete_ia3_config
from deltatune.methods.ia3.layers import IA3Conv, IA3Layer, IA3Linear, create_ia3_layer
from deltatune.registry import Method, register_method

register_method(
    Method(
        peft_type=IA3Config.peft_type,
        config_cls=IA3Config,
        layer_cls=IA3Layer,
        create_layer=create_ia3_layer,
        default_targets=DEFAULT_IA3_TARGETS,
        prepare_config=complete_ia3_config,
    )
)

__all__ = ["IA3_DEFAULTS", "IA3Config", "IA3Conv", "IA3Layer", "IA3Linear"]
