"""The model wrapper users hold: adapters by name, switching, merging, saving and loading.

`PeftModel.base_model.model` is the wrapped transformers model, as in peft, so state-dict keys
(`base_model.model.…`) and user code that reaches into the model are the same in both libraries.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deltatune import injection
from deltatune.checkpoint import (
    AdapterLoadError,
    atomic_write_text,
    get_peft_model_state_dict,
    load_adapter_weights,
    save_tensors,
    set_peft_model_state_dict,
)
from deltatune.config import CONFIG_NAME, PeftConfig
from deltatune.layers import adapter_layers


class TunedModel(nn.Module):
    """Holds the transformers model at `.model`, peft's attribute path; forward passes straight through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A base model with named adapters, one of them active.

    Attributes the wrapper does not define (config, generation_config, activation checkpointing ...) are
    read from the transformers model, so trainers and generation utilities see the model they expect.
    """

    # Modules a task adds to modules_to_save (a fresh classification head must be trained and saved).
    task_heads: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = TunedModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    # --- attribute fallback -------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "_modules", "_parameters", "_buffers"}:
                raise
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    # --- adapters ------------------------------------------------------------------------------
    def _with_task_defaults(self, config: PeftConfig) -> PeftConfig:
        config = copy.deepcopy(config)
        if config.base_model_name_or_path is None:
            name = getattr(self.get_base_model(), "name_or_path", None)
            config.base_model_name_or_path = name or None
        if self.task_heads and hasattr(config, "modules_to_save"):
            extra = [h for h in self.task_heads if h not in (config.modules_to_save or [])]
            config.modules_to_save = [*(config.modules_to_save or []), *extra]
        return config

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter (inactive unless it is the first one). The caller's config is not modified."""
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists. Pick another name, or call "
                f"delete_adapter({adapter_name!r}) first."
            )
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"Adapter names must be non-empty strings without '.', got {adapter_name!r}.")
        config = self._with_task_defaults(peft_config)
        self.peft_config[adapter_name] = injection.inject_adapter(self.get_base_model(), config, adapter_name)
        if adapter_name == self.active_adapter:
            self._mark_trainable()
        else:
            injection.set_active_adapters(self.get_base_model(), [self.active_adapter])

    def set_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        self.active_adapter = adapter_name
        injection.set_active_adapters(self.get_base_model(), [adapter_name])
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        injection.delete_adapter(self.get_base_model(), adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name == self.active_adapter and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"No adapter named {adapter_name!r}. Loaded adapters: {sorted(self.peft_config)}."
            )

    def _mark_trainable(self) -> None:
        injection.mark_trainable(self, self.active_adapter, self.peft_config.get(self.active_adapter))

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model (a reference model for free, without copying it)."""
        model = self.get_base_model()
        merged = [(layer, list(layer.merged_adapters)) for _, layer in adapter_layers(model)]
        injection.unmerge_adapters(model)
        injection.set_disabled(model, True)
        try:
            yield
        finally:
            injection.set_disabled(model, False)
            for layer, names in merged:
                layer.merge(names)

    # --- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        injection.merge_adapters(self.get_base_model(), adapter_names or [self.active_adapter], safe_merge)

    def unmerge_adapter(self) -> None:
        injection.unmerge_adapters(self.get_base_model())

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold the adapter(s) into the base weights and return the plain transformers model."""
        return injection.unload(
            self.get_base_model(), merge=True, safe_merge=safe_merge, adapter_names=adapter_names or [self.active_adapter]
        )

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        return injection.unload(self.get_base_model(), merge=False)

    # --- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- forward -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    # --- files ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **_: Any,
    ) -> None:
        """Write each adapter in peft's layout: the default at the top, others in a subfolder of their name."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder.")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._check_known(name)
        if not is_main_process:
            return
        for name in names:
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            save_tensors(out, get_peft_model_state_dict(self, name), safe_serialization)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(out)
            if not os.path.exists(os.path.join(out, "README.md")):
                atomic_write_text(os.path.join(out, "README.md"), _model_card(config))

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        all_adapters: bool = False,
        **_: Any,
    ) -> PeftModel:
        """Load an adapter onto `model`. With all_adapters, also load the adapters saved in subfolders."""
        directory = resolve_adapter_dir(model_id)
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel)
        peft_model = cls(model, config, adapter_name)
        peft_model._load_weights(directory, adapter_name)
        if all_adapters:
            for sub in sorted(os.listdir(directory)):
                if os.path.isfile(os.path.join(directory, sub, CONFIG_NAME)) and sub not in peft_model.peft_config:
                    peft_model.load_adapter(os.path.join(directory, sub), sub, is_trainable=is_trainable)
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **_: Any) -> None:
        directory = resolve_adapter_dir(model_id)
        config = PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        try:
            self._load_weights(directory, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _load_weights(self, directory: str, adapter_name: str) -> None:
        state_dict, path = load_adapter_weights(directory)
        set_peft_model_state_dict(self, state_dict, adapter_name, source=path)


def resolve_adapter_dir(model_id: str | os.PathLike) -> str:
    """A local adapter folder as is; otherwise a Hub id, fetched (respects HF_HUB_OFFLINE)."""
    model_id = os.fspath(model_id)
    if os.path.isdir(model_id):
        return model_id
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as err:
        raise AdapterLoadError(
            f"{model_id!r} is not a local folder and could not be fetched from the Hub ({err})."
        ) from err


def _model_card(config: PeftConfig) -> str:
    return (
        "---\n"
        f"base_model: {config.base_model_name_or_path or 'unknown'}\n"
        "library_name: peft\n"
        "---\n\n"
        f"# {config.peft_type} adapter\n\nTrained with deltatune; loads with deltatune or peft.\n"
    )


class PeftModelForCausalLM(PeftModel):
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.get_base_model().generate(*args, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.get_base_model().generate(*args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    task_heads = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    task_heads = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    task_heads = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **_: Any) -> PeftModel:
    """Wrap `model` with a new adapter; the PeftModel subclass follows the config's task_type."""
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name)
