"""Built-in methods; importing a method's package registers it."""

from deltatune.methods import lora  # noqa: F401
