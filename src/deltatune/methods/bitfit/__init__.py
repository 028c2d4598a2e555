"""BitFit: fine-tune only the biases (deltatune's own method; peft has no equivalent)."""

from deltatune.methods.bitfit.config import BitFitConfig, complete_bitfit_config
from deltatune.methods.bitfit.layers import BitFitLayer, create_bitfit_layer
from deltatune.registry import Method, register_method

register_method(
    Method(
        peft_type=BitFitConfig.peft_type,
        config_cls=BitFitConfig,
        layer_cls=BitFitLayer,
        create_layer=create_bitfit_layer,
        prepare_config=complete_bitfit_config,
        in_peft=False,  # deltatune's own: peft cannot read these files
    )
)

__all__ = ["BitFitConfig", "BitFitLayer"]
