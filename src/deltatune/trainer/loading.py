"""Loading what every command needs: a tokenizer, a base model for the task, and adapters on top of it.

A classification adapter's head size is not in peft's files, so the trainer writes the label names beside
the adapter (`labels.json`) and inference rebuilds the base model with that head.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModelError(ValueError):
    """A base model that cannot be loaded from the name given."""


@contextmanager
def _loading(what: str, path: str) -> Iterator[None]:
    """Turns transformers' errors for a missing or incomplete model (OSError: no such folder or file; ValueError:
    a config.json without model_type) into one line that says what to give."""
    try:
        yield
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"Cannot load the {what} of model {path!r}: {reason} Give an embedded model name "
                         "(`deltatune models`), a local model folder, or a Hub id.") from err


def model_folder(name: str) -> str:
    """An embedded model's prepared folder; any other name (local folder, Hub id) as given."""
    from deltatune.embedded import resolve_model

    return resolve_model(name)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    with _loading("tokenizer", path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of {path!r} has neither a pad nor an end-of-sequence token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def task_type(label_names: list[str] | None) -> str:
    return "SEQ_CLS" if label_names else "CAUSAL_LM"


def load_base_model(path: str, label_names: list[str] | None = None, pad_token_id: int | None = None,
                    quantize: str | None = None) -> nn.Module:
    """The model in float32 (mixed precision autocasts from there): a causal LM, or a classifier over labels.

    With `quantize`, the frozen weights are loaded quantized (the memory with and without is reported).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltatune.quantized.loading import load_base_model as load_quantized

    kwargs = {"dtype": torch.float32}
    if label_names:
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)})
    model_class = AutoModelForSequenceClassification if label_names else AutoModelForCausalLM
    with _loading("weights", path):
        if quantize and quantize != "none":
            from deltatune.quantized.training import prepare_model_for_kbit_training

            model = load_quantized(path, quantize, model_class=model_class, **kwargs)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model = model_class.from_pretrained(path, **kwargs)
    if not label_names:
        return model
    if pad_token_id is not None:  # the classifier reads the last non-pad token of each row
        model.config.pad_token_id = pad_token_id
    return model


LABELS_FILE = "labels.json"


def save_label_names(directory: str, label_names: list[str] | None) -> None:
    if label_names:
        from deltatune.checkpoint import atomic_write_text

        atomic_write_text(os.path.join(directory, LABELS_FILE), json.dumps(list(label_names)) + "\n")


def read_label_names(directory: str) -> list[str] | None:
    path = os.path.join(directory, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_adapter_task(adapters: dict[str, str], classification: bool, data: str) -> None:
    """Refuse to score a text-generation adapter on classification data, or a classifier on generation data:
    one would get a fresh random head, the other a head that matches nothing."""
    from deltatune.config import PeftConfig
    from deltatune.trainer.config import ConfigError

    kinds = {"SEQ_CLS": "a classifier", "CAUSAL_LM": "a text-generation adapter"}
    for path in adapters.values():
        task = "SEQ_CLS" if read_label_names(path) else PeftConfig.from_pretrained(path).task_type
        if task in kinds and (task == "SEQ_CLS") != classification:
            kind = "classification data (text and label)" if classification else "text-generation data"
            raise ConfigError(f"{path} is {kinds[task]}, but {data} holds {kind}: evaluate it on data of its kind.")


def adapter_label_names(adapters: dict[str, str]) -> list[str] | None:
    """The label names saved beside the first classification adapter, if any."""
    return next((names for path in adapters.values() if (names := read_label_names(path))), None)


def load_with_adapters(path: str, adapters: dict[str, str], label_names: list[str] | None,
                       pad_token_id: int | None) -> nn.Module:
    """The base model with each named adapter loaded, the first one active; in eval mode."""
    from deltatune import PeftModel

    model = load_base_model(path, label_names, pad_token_id)
    for index, (name, adapter_path) in enumerate(adapters.items()):
        if index == 0:
            model = PeftModel.from_pretrained(model, adapter_path, adapter_name=name)
        else:
            model.load_adapter(adapter_path, name)
    if adapters:
        model.set_adapter(next(iter(adapters)))
    return model.eval()


def load_for_inference(model_name: str, adapters: dict[str, str] | None = None):
    """(model, tokenizer, label names) for a model name as the user gives it, with adapters {name: folder}."""
    path = model_folder(model_name)
    tokenizer = load_tokenizer(path)
    adapters = adapters or {}
    label_names = adapter_label_names(adapters)
    return load_with_adapters(path, adapters, label_names, tokenizer.pad_token_id), tokenizer, label_names
