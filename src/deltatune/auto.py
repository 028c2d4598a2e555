"""AutoPeftModel*: load the base model named in an adapter's config, then the adapter on top of it."""

from __future__ import annotations

import os
from typing import Any

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from deltatune.config import PeftConfig
from deltatune.peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    resolve_adapter_dir,
)


class _AutoPeftModel:
    auto_model_cls: Any = AutoModel
    peft_model_cls: type[PeftModel] = PeftModel

    def __init__(self) -> None:
        raise TypeError(f"Use {type(self).__name__}.from_pretrained(path).")

    @classmethod
    def from_pretrained(
        cls,
        adapter_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **model_kwargs: Any,
    ) -> PeftModel:
        directory = resolve_adapter_dir(adapter_path)
        config = PeftConfig.from_pretrained(directory)
        if not config.base_model_name_or_path:
            raise ValueError(
                f"The adapter config in {directory!r} names no base_model_name_or_path: load the base model "
                "yourself and call PeftModel.from_pretrained(model, path)."
            )
        base = cls.auto_model_cls.from_pretrained(
            config.base_model_name_or_path, revision=config.revision, **model_kwargs
        )
        return cls.peft_model_cls.from_pretrained(
            base, directory, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )


class AutoPeftModel(_AutoPeftModel):
    pass


class AutoPeftModelForCausalLM(_AutoPeftModel):
    auto_model_cls = AutoModelForCausalLM
    peft_model_cls = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_AutoPeftModel):
    auto_model_cls = AutoModelForSeq2SeqLM
    peft_model_cls = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_AutoPeftModel):
    auto_model_cls = AutoModelForSequenceClassification
    peft_model_cls = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_AutoPeftModel):
    auto_model_cls = AutoModelForTokenClassification
    peft_model_cls = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_AutoPeftModel):
    auto_model_cls = AutoModelForQuestionAnswering
    peft_model_cls = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_AutoPeftModel):
    auto_model_cls = AutoModel
    peft_model_cls = PeftModelForFeatureExtraction
