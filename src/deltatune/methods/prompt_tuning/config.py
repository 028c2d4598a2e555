"""PromptTuningConfig: names, defaults and meanings of peft's."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from deltatune.prompt_learning import PromptLearningConfig


class PromptTuningInit(StrEnum):
    """peft's names for prompt_tuning_init (plain strings work as well)."""

    RANDOM = "RANDOM"
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"


VALID_INITS = tuple(kind.value for kind in PromptTuningInit)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Trainable virtual token embeddings; TEXT starts them from the model's embeddings of a text."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)
        if init not in VALID_INITS:
            raise ValueError(f"prompt_tuning_init must be one of {VALID_INITS}, got {init!r}.")
        self.prompt_tuning_init = init
        if init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text: the text whose token embeddings "
                "start the virtual tokens."
            )
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError(
                "prompt_tuning_init='TEXT' needs tokenizer_name_or_path: the tokenizer (folder or Hub id) that "
                "turns prompt_tuning_init_text into token ids."
            )
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'.")
