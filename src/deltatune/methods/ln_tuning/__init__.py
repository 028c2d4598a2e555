"""LayerNorm tuning: train per-adapter copies of the model's normalisation layers, nothing else."""

from deltatune.methods.ln_tuning.config import DEFAULT_LN_TUNING_TARGETS, LNTuningConfig
from deltatune.methods.ln_tuning.layers import LNTuningLayer, create_ln_tuning_layer
from deltatune.registry import Method, register_method

register_method(
    Method(
        peft_type=LNTuningConfig.peft_type,
        config_cls=LNTuningConfig,
        layer_cls=LNTuningLayer,
        create_layer=create_ln_tuning_layer,
        default_targets=DEFAULT_LN_TUNING_TARGETS,
    )
)

__all__ = ["LNTuningConfig", "LNTuningLayer"]
