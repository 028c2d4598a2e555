"""AutoPeftModel*: load the base model named in an adapter's config, then the adapter on top of it."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from deltatune.checkpoint import resolve_adapter_dir
from deltatune.config import PeftConfig
from deltatune.peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# Libraries whose classes an adapter's auto_mapping may name (as peft's default import allowlist).
DEFAULT_IMPORT_ALLOWLIST = ("transformers", "diffusers", "lerobot", "megatron-core")


class _AutoPeftModel:
    auto_model_cls: Any = None  # None: the generic AutoPeftModel, which reads the class from the adapter config
    peft_model_cls: type[PeftModel] = PeftModel

    def __init__(self) -> None:
        raise TypeError(f"Use {type(self).__name__}.from_pretrained(path).")

    @classmethod
    def from_pretrained(
        cls,
        adapter_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **model_kwargs: Any,
    ) -> PeftModel:
        """Load the base model the adapter config names (at the config's `revision`; `revision` here is the
        adapter repo's), then the adapter. Other keywords go to the base model's from_pretrained."""
        directory = resolve_adapter_dir(adapter_path, subfolder=model_kwargs.pop("subfolder", None), revision=revision)
        config = config if config is not None else PeftConfig.from_pretrained(directory)
        if not config.base_model_name_or_path:
            raise ValueError(
                f"The adapter config in {directory!r} names no base_model_name_or_path: load the base model "
                "yourself and call PeftModel.from_pretrained(model, path)."
            )
        auto_cls = cls._base_class(config, import_allowlist or DEFAULT_IMPORT_ALLOWLIST)
        base = auto_cls.from_pretrained(config.base_model_name_or_path, revision=config.revision, **model_kwargs)
        return cls.peft_model_cls.from_pretrained(
            base, directory, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )

    @classmethod
    def _base_class(cls, config: PeftConfig, import_allowlist: Sequence[str]) -> Any:
        """The class that loads the base model, checked against the adapter's task_type as peft checks it."""
        task = config.task_type
        if task is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL.get(task)
            if cls.auto_model_cls is None:
                raise ValueError(f"The adapter's task_type is {task!r}: load it with the AutoPeftModel class of that "
                                 f"task (AutoPeftModelFor{(expected or PeftModel).__name__[len('PeftModelFor'):]}).")
            if expected is not None and expected is not cls.peft_model_cls:
                raise ValueError(f"The adapter's task_type {task!r} needs {expected.__name__}, but {cls.__name__} "
                                 f"builds a {cls.peft_model_cls.__name__}; use the AutoPeftModel class of that task.")
            return cls.auto_model_cls
        if cls.auto_model_cls is not None:
            return cls.auto_model_cls
        mapping = config.auto_mapping or {}
        library, name = mapping.get("parent_library"), mapping.get("base_model_class")
        if not library or not name:
            raise ValueError("The adapter config has neither a task_type nor an auto_mapping, so the model class to "
                             "load is unknown: load the base model yourself and call PeftModel.from_pretrained.")
        if library.split(".")[0] not in import_allowlist:
            raise ValueError(f"The adapter's auto_mapping wants to import {library!r}, which is not in the import "
                             f"allowlist {list(import_allowlist)}; pass import_allowlist=[...] if it is safe.")
        return getattr(importlib.import_module(library), name)


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
