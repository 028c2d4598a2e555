"""Bottleneck adapters: small down/up projections after (or beside) attention and feed-forward blocks."""

from deltatune.methods.bottleneck.config import (
    ARCHITECTURE_BLOCKS,
    NON_LINEARITIES,
    PLACEMENTS,
    BottleneckConfig,
    complete_bottleneck_config,
)
from deltatune.methods.bottleneck.layers import BottleneckLayer, create_bottleneck_layer
from deltatune.registry import Method, register_method

register_method(
    Method(
        peft_type=BottleneckConfig.peft_type,
        config_cls=BottleneckConfig,
        layer_cls=BottleneckLayer,
        create_layer=create_bottleneck_layer,
        prepare_config=complete_bottleneck_config,
        in_peft=False,  # deltatune's own: peft cannot read these files
    )
)

__all__ = ["ARCHITECTURE_BLOCKS", "NON_LINEARITIES", "PLACEMENTS", "BottleneckConfig", "BottleneckLayer"]
