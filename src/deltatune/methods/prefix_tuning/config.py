"""PrefixTuningConfig: names, defaults and meanings of peft's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltatune.prompt_learning import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Trained key/value prefixes for every layer, optionally produced by a small MLP (prefix_projection)."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    is_prefix: ClassVar[bool] = True

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}.")
