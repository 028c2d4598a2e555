"""Built-in methods; importing a method's package registers it."""

from deltatune.methods import (  # noqa: F401
    bitfit,
    bottleneck,
    ia3,
    ln_tuning,
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
