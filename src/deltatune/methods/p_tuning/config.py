"""PromptEncoderConfig (P-tuning): names, defaults and meanings of peft's."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from deltatune.prompt_learning import PromptLearningConfig


class PromptEncoderReparameterizationType(StrEnum):
    """peft's names for encoder_reparameterization_type (plain strings work as well)."""

    MLP = "MLP"
    LSTM = "LSTM"


VALID_TYPES = tuple(kind.value for kind in PromptEncoderReparameterizationType)


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """Virtual token embeddings produced by a small MLP or LSTM over trainable inputs."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in VALID_TYPES:
            raise ValueError(f"encoder_reparameterization_type must be one of {VALID_TYPES}, got {kind!r}.")
        self.encoder_reparameterization_type = kind
