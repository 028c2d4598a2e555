"""The model wrapper users hold: adapters by name, switching, merging, saving and loading.

`PeftModel.base_model.model` is the wrapped transformers model, as in peft, so state-dict keys
(`base_model.model.…`) and user code that reaches into the model are the same in both libraries.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deltatune import injection, prompt_learning
from deltatune.checkpoint import (
    MODEL_CARD_NAME,
    adapter_parameter_map,
    check_adapter_name,
    get_peft_model_state_dict,
    load_adapter_weights,
    resolve_adapter_dir,
    save_adapter_folder,
    set_peft_model_state_dict,
)
from deltatune.config import CONFIG_NAME, PeftConfig
from deltatune.layers import adapter_layers
from deltatune.mixed_batch import batch_size_of, generation_expansion, mixed_adapter_rows
from deltatune.quantized import dequantize_model, parameter_count
from deltatune.registry import Method, get_method
from deltatune.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from deltatune.weighted_adapter import add_weighted_adapter


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
        self._setup(model, adapter_name)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    def _setup(self, model: nn.Module, adapter_name: str) -> None:
        self.base_model = TunedModel(model)
        # Prompt-learning adapters keep their encoders here; layer adapters live inside the model.
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self._adapters_disabled = False

    @classmethod
    def _from_file(cls, model: nn.Module, directory: str, adapter_name: str, config: PeftConfig) -> PeftModel:
        """A PeftModel whose first adapter is built to receive saved weights (prompt tables, no init work)."""
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model._setup(model, adapter_name)
        peft_model.add_adapter(adapter_name, config, _from_file=True)
        peft_model.set_adapter(adapter_name)
        peft_model._load_weights(directory, adapter_name)
        return peft_model

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

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, _from_file: bool = False) -> None:
        """Add a new adapter, inactive unless no other is loaded (the first one, or one added after deleting all
        others). The caller's config is not modified."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"An adapter named {adapter_name!r} already exists. Pick another name, or call "
                f"delete_adapter({adapter_name!r}) first."
            )
        if hasattr(nn.ModuleDict(), adapter_name):  # adapters are ModuleDict keys, which cannot shadow its attributes
            raise ValueError(f"Adapter name {adapter_name!r} clashes with a torch.nn.Module attribute; pick another.")
        only = not self.peft_config
        if only:
            self.active_adapter = adapter_name
        config = self._with_task_defaults(peft_config)
        method = get_method(config.peft_type)
        if method.create_prompt_encoder is not None:
            self.peft_config[adapter_name] = self._add_prompt_encoder(method, config, adapter_name, _from_file)
        else:
            self.peft_config[adapter_name] = injection.inject_adapter(self.get_base_model(), config, adapter_name)
        if only:
            injection.set_active_adapters(self.get_base_model(), [adapter_name])
        else:
            injection.set_active_adapters(self.get_base_model(), [self.active_adapter])
        self._mark_trainable()  # a new inactive adapter stays frozen, as in peft

    def _add_prompt_encoder(self, method: Method, config: PeftConfig, adapter_name: str, from_file: bool
                            ) -> PeftConfig:
        model = self.get_base_model()
        config = prompt_learning.resolve_dims(config, model)
        if config.is_prefix:
            prompt_learning.check_can_carry_prefix(model)
        word_embeddings = model.get_input_embeddings()
        encoder = method.create_prompt_encoder(config, word_embeddings, from_file)
        self.prompt_encoder[adapter_name] = encoder.to(word_embeddings.weight.device)
        if config.modules_to_save:
            injection.add_modules_to_save(model, config.modules_to_save, adapter_name)
        return config

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Switch the active adapter and make it the trainable one, or keep it frozen with `inference_mode=True`
        (as peft). Merged weights hold the old adapter, so they are unmerged first (as peft)."""
        self._check_known(adapter_name)
        if self._prompt_tables_only():
            self._switch_prompt_table(adapter_name, inference_mode)
            return
        merged = any(layer.merged for _, layer in adapter_layers(self.get_base_model()))
        if merged and adapter_name != self.active_adapter:
            warnings.warn(
                f"Adapter {self.active_adapter!r} is merged into the base weights; unmerging it to switch to "
                f"{adapter_name!r}.",
                stacklevel=2,
            )
            injection.unmerge_adapters(self.get_base_model())
        self.active_adapter = adapter_name
        injection.set_active_adapters(self.get_base_model(), [adapter_name])
        self._mark_trainable(frozen=inference_mode)

    def _prompt_tables_only(self) -> bool:
        """True when every adapter is a prompt encoder with nothing inside the model (no layers, no copies)."""
        return all(
            name in self.prompt_encoder and not getattr(config, "modules_to_save", None)
            for name, config in self.peft_config.items()
        )

    def _switch_prompt_table(self, adapter_name: str, frozen: bool = False) -> None:
        """Switching between prompt encoders touches only them: no walk over the model (task switching cost)."""
        self.active_adapter = adapter_name
        trainable = not (frozen or self.peft_config[adapter_name].inference_mode)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_known(adapter_name)
        injection.delete_adapter(self.get_base_model(), adapter_name)
        if adapter_name in self.prompt_encoder:  # ModuleDict.pop takes no default
            del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        if adapter_name == self.active_adapter and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"No adapter named {adapter_name!r}. Loaded adapters: {sorted(self.peft_config)}."
            )

    def _mark_trainable(self, frozen: bool = False) -> None:
        config = None if frozen else self.peft_config.get(self.active_adapter)
        injection.mark_trainable(self, self.active_adapter, config)
        if self.active_adapter in self.prompt_encoder and config is not None and not config.inference_mode:
            self.prompt_encoder[self.active_adapter].requires_grad_(True)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Unfreeze (or freeze) whole adapters, active or not, as peft's method of that name (which refuses
        prompt-learning adapters; they are accepted here). The next set_adapter trains only the active one."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._check_known(name)
        for name in names:
            if name in self.prompt_encoder:
                self.prompt_encoder[name].requires_grad_(requires_grad)
            # the adapter's own tensors only: biases trained under bias="all" / "lora_only" belong to the base model
            # (and to every adapter with that option), so they stay as they are, as in peft
            for param in adapter_parameter_map(self.get_base_model(), name).values():
                param.requires_grad_(requires_grad)

    def disable_adapter_layers(self) -> None:
        """Run the bare base model until enable_adapter_layers(), as peft's method of that name; merged adapters
        are unmerged first (with a warning, as in peft). disable_adapter() does the same for one block."""
        model = self.get_base_model()
        if any(layer.merged for _, layer in adapter_layers(model)):
            warnings.warn("Unmerging the merged adapters to disable them.", stacklevel=2)
            injection.unmerge_adapters(model)
        injection.set_disabled(model, True)
        self._adapters_disabled = True

    def enable_adapter_layers(self) -> None:
        injection.set_disabled(self.get_base_model(), False)
        self._adapters_disabled = False

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model (a reference model for free, without copying it)."""
        model = self.get_base_model()
        merged = [(layer, list(layer.merged_adapters)) for _, layer in adapter_layers(model)]
        injection.unmerge_adapters(model)
        injection.set_disabled(model, True)
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = False
            injection.set_disabled(model, False)
            for layer, names in merged:
                layer.merge(names)

    # --- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names or [self.active_adapter]
        self._refuse_prompt_merge(names)
        injection.merge_adapters(self.get_base_model(), names, safe_merge)

    def _refuse_prompt_merge(self, names: list[str]) -> None:
        prompt = [name for name in names if name in self.prompt_encoder]
        if prompt:
            raise ValueError(f"Adapter(s) {prompt} are prompt-learning adapters: their virtual tokens or prefix go "
                             "into the input or the KV cache, not into any weight, so they cannot be merged. Keep the "
                             "PeftModel, or call unload() to drop them.")

    def unmerge_adapter(self) -> None:
        injection.unmerge_adapters(self.get_base_model())

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Fold the adapter(s) into the base weights and return the plain transformers model.

        On a quantized base, merging dequantizes each adapted layer, merges exactly and re-quantizes, warning with
        the rounding error that costs; `dequantize=True` instead returns a full-precision model (every quantized
        layer dequantized, the adapters merged without rounding, transformers' quantization config dropped).
        """
        names = adapter_names or [self.active_adapter]
        self._refuse_prompt_merge(names)
        model = self.get_base_model()
        if dequantize:
            if safe_merge:  # refuse before anything changes
                for _, layer in adapter_layers(model):
                    layer.check_merge(names)
            dequantize_model(model)
        return injection.unload(model, merge=True, safe_merge=safe_merge, adapter_names=names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        return injection.unload(self.get_base_model(), merge=False)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs: Any) -> None:
        """Add a LoRA adapter combining `adapters` with `weights` (peft's combination types and keyword
        arguments: svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    # --- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = parameter_count(self)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """Each adapter layer's adapters: active, merged, trainable, devices (status.py)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The layers' status folded into one value per field, "irregular" where they disagree (status.py)."""
        return get_model_status(self)

    # --- forward -------------------------------------------------------------------------------
    @property
    def _prompt_active(self) -> bool:
        return self.active_adapter in self.prompt_encoder and not self._adapters_disabled

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """With adapter_names, row i runs with LoRA adapter adapter_names[i] ("__base__": none) in one batch."""
        if adapter_names is not None:
            with mixed_adapter_rows(self, adapter_names, batch_size_of(args, kwargs)):
                return self.base_model(*args, **kwargs)
        if not self._prompt_active:
            return self.base_model(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("With a prompt-learning adapter, pass inputs after input_ids as keywords.")
        return self.base_model(**self._prompt_inputs(kwargs))

    def _prompt_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's inputs with this adapter's virtual tokens added."""
        config = self.peft_config[self.active_adapter]
        table = self.prompt_encoder[self.active_adapter]()
        model = self.get_base_model()
        if config.is_prefix:
            return prompt_learning.prefix_inputs(model, config, table, kwargs)
        return prompt_learning.embedding_inputs(model, config, table, kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """generate() as the task classes run it (adapter_names, prompt adapters), for a PeftModel made without a
        task_type: the model's config says whether it is an encoder-decoder."""
        config = getattr(self.get_base_model(), "config", None)
        task_class = PeftModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else PeftModelForCausalLM
        return task_class.generate(self, *args, adapter_names=adapter_names, **kwargs)

    def _generate_mixed(self, adapter_names: list[str], args: tuple, kwargs: dict[str, Any]) -> Any:
        """generate() with one LoRA adapter per input row; generate() repeats a row for each beam or returned
        sequence, and its adapter with it (an encoder-decoder's encoder sees each row once)."""
        model = self.get_base_model()
        kwargs = _generate_keywords(model, args, kwargs)
        expand = generation_expansion(model, kwargs)
        # generate() runs without gradients anyway; entering the block without them too lets the layers take their
        # adapter stacks once for the whole call.
        with torch.no_grad(), mixed_adapter_rows(self, adapter_names, batch_size_of((), kwargs), repeat=expand):
            return model.generate(**kwargs)

    def _generate_with_prefix(self, kwargs: dict[str, Any]) -> Any:
        """transformers' generate() with the prefix as the starting KV cache of the (decoder's) self-attention.

        No placeholder ids stand for the prefix, so the output holds real tokens only: a decoder-only model's
        attention mask covers the prefix too, and being longer than the input ids it makes generate() feed them all
        rather than cut the cache's length off them; an encoder-decoder's decoder starts from its start token.
        generate() repeats each input row for beams and returned sequences but not a cache it is handed, so the
        cache is built with that many rows; with use_cache=False, generate() re-feeds the whole sequence every step,
        so the cache keeps only the prefix rather than growing with each re-fed copy.
        """
        model = self.get_base_model()
        if _generation_setting(model, kwargs, "cache_implementation") is not None:
            raise ValueError(
                "generate() with a prefix adapter hands transformers a dynamic KV cache holding the prefix, so it "
                "cannot build one from cache_implementation: drop cache_implementation (from the call or the "
                "generation_config)."
            )
        config = self.peft_config[self.active_adapter]
        table = self.prompt_encoder[self.active_adapter]()
        repeat = generation_expansion(model, kwargs)
        grow = _generation_setting(model, kwargs, "use_cache") is not False
        prepared = prompt_learning.prefix_inputs(model, config, table, kwargs, repeat, grow)
        prepared["use_cache"] = grow  # generate() must step the way the cache was built for
        return model.generate(**prepared)

    # --- files ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        save_embedding_layers: bool | str = "auto",
        **_: Any,
    ) -> None:
        """Write each adapter in peft's layout: the default at the top, others in a subfolder of their name.

        With path_initial_model_for_weight_conversion (the folder a PiSSA / OLoRA adapter was saved to right after
        initialisation), each adapter is written as the equivalent plain LoRA adapter for the original base model.
        save_embedding_layers (True, False or "auto") also writes the base model's input and output embedding
        weights, as peft does: needed to load an adapter trained after resizing the vocabulary.
        """
        if save_embedding_layers not in (True, False, "auto"):
            raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}.")
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
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            if config.task_type is None:  # how AutoPeftModel (here and in peft) finds the model class to load
                base = type(self.get_base_model())
                config.auto_mapping = {"base_model_class": base.__name__, "parent_library": base.__module__}
            card = None if os.path.exists(os.path.join(out, MODEL_CARD_NAME)) else _model_card(config)
            tensors = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            if path_initial_model_for_weight_conversion is not None:
                from deltatune.methods.lora.init import convert_to_plain_lora

                tensors, config = convert_to_plain_lora(
                    tensors, config, os.fspath(path_initial_model_for_weight_conversion)
                )
            save_adapter_folder(out, tensors, config.to_json_string(), card, safe_serialization)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload adapter", revision: str | None = None,
                    selected_adapters: list[str] | None = None, **_: Any) -> Any:
        """Upload the adapter files (what save_pretrained writes, never the base model) to the Hub repo `repo_id`,
        creating it if needed; returns huggingface_hub's commit info."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     revision=revision)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        all_adapters: bool = False,
        subfolder: str | None = None,
        revision: str | None = None,
        **_: Any,
    ) -> PeftModel:
        """Load an adapter onto `model` (from `subfolder` of a folder or Hub repo, at the repo's `revision`). With
        all_adapters, also load the adapters saved in subfolders."""
        directory = resolve_adapter_dir(model_id, subfolder=subfolder, revision=revision)
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        if cls is PeftModel:
            cls = MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type, PeftModel)
        peft_model = cls._from_file(model, directory, adapter_name, config)
        if all_adapters:
            for sub in sorted(os.listdir(directory)):
                if os.path.isfile(os.path.join(directory, sub, CONFIG_NAME)) and sub not in peft_model.peft_config:
                    peft_model.load_adapter(os.path.join(directory, sub), sub, is_trainable=is_trainable)
        if not is_trainable:
            peft_model.eval()  # as peft: a model loaded for inference runs without dropout
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, revision: str | None = None, **_: Any) -> None:
        directory = resolve_adapter_dir(model_id, subfolder=subfolder, revision=revision)
        config = PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config, _from_file=True)
        try:
            self._load_weights(directory, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()  # as peft

    def _load_weights(self, directory: str, adapter_name: str) -> None:
        """Read an adapter's files into the adapter `adapter_name`, which must already exist."""
        state_dict, path = load_adapter_weights(directory)
        set_peft_model_state_dict(self, state_dict, adapter_name, source=path)


def _model_card(config: PeftConfig) -> str:
    in_peft = get_method(config.peft_type).in_peft
    readers = "deltatune or peft" if in_peft else "deltatune (peft has no such method)"
    return (
        "---\n"
        f"base_model: {config.base_model_name_or_path or 'unknown'}\n"
        f"library_name: {'peft' if in_peft else 'deltatune'}\n"
        "---\n\n"
        f"# {config.peft_type} adapter\n\nTrained with deltatune; loads with {readers}.\n"
    )


def _named_forward(*names: str) -> Callable[..., Any]:
    """PeftModel.forward under a signature that names the inputs a task's models take, as peft's task classes do:
    callers that read it (transformers.Trainer keeps only the dataset columns it names) see them."""

    def forward(self: PeftModel, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        return PeftModel.forward(self, *args, adapter_names=adapter_names, **kwargs)

    kind = inspect.Parameter
    forward.__signature__ = inspect.Signature([
        kind("self", kind.POSITIONAL_OR_KEYWORD),
        *(kind(name, kind.POSITIONAL_OR_KEYWORD, default=None) for name in names),
        kind("adapter_names", kind.KEYWORD_ONLY, default=None),
        kind("kwargs", kind.VAR_KEYWORD),
    ])
    return forward


TEXT_INPUTS = ("input_ids", "attention_mask", "inputs_embeds")


class PeftModelForCausalLM(PeftModel):
    forward = _named_forward(*TEXT_INPUTS, "labels")

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """transformers' generate(); with a prompt adapter the output holds the input and new tokens only.

        With adapter_names (one per input row), each row generates with its own LoRA adapter; generate() repeats
        a row for each beam or returned sequence, and its adapter with it.

        With return_dict_in_generate, `.sequences` is what the plain call returns and the per-step fields (scores,
        logits, beam_indices) cover the new tokens, as without an adapter. With prompt tuning or P-tuning the first
        step's attentions and hidden states, and the returned cache, include the virtual tokens; with a prefix
        adapter the returned cache starts with the prefix."""
        if adapter_names is not None:
            return self._generate_mixed(adapter_names, args, kwargs)
        if not self._prompt_active:
            return self.get_base_model().generate(*args, **kwargs)
        kwargs = _prompt_generate_kwargs(self.get_base_model(), args, kwargs)
        if self.peft_config[self.active_adapter].is_prefix:
            return self._generate_with_prefix(kwargs)
        input_ids = kwargs.pop("input_ids")
        prepared = self._prompt_inputs({"input_ids": input_ids, "attention_mask": kwargs.pop("attention_mask", None)})
        prepared.pop("position_ids", None)  # generate() derives the same positions from the attention mask
        if kwargs.get("max_length") is not None:  # generate() counts the virtual tokens in; the caller did not
            kwargs["max_length"] += self.peft_config[self.active_adapter].num_virtual_tokens
        # From inputs_embeds, generate() returns the new tokens only, a row per returned sequence: put each row's
        # input ids in front.
        out = self.get_base_model().generate(**prepared, **kwargs)
        new_tokens = out if isinstance(out, torch.Tensor) else out.sequences
        sequences = torch.cat([input_ids.repeat_interleave(len(new_tokens) // len(input_ids), dim=0), new_tokens], 1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out


class PeftModelForSeq2SeqLM(PeftModel):
    forward = _named_forward(*TEXT_INPUTS, "decoder_input_ids", "decoder_attention_mask", "labels")
    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> torch.Tensor:
        """transformers' generate(); a prefix adapter goes in as the decoder's starting KV cache. With
        adapter_names (one per input row), each row generates with its own LoRA adapter."""
        if adapter_names is not None:
            return self._generate_mixed(adapter_names, args, kwargs)
        if not self._prompt_active:
            return self.get_base_model().generate(*args, **kwargs)
        kwargs = _prompt_generate_kwargs(self.get_base_model(), args, kwargs)
        if self.peft_config[self.active_adapter].is_prefix:
            return self._generate_with_prefix(kwargs)
        prepared = self._prompt_inputs(
            {"input_ids": kwargs.pop("input_ids"), "attention_mask": kwargs.pop("attention_mask", None)}
        )
        return self.get_base_model().generate(**prepared, **kwargs)


def _generate_keywords(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate()'s arguments all as keywords, positional ones (inputs, generation_config, ...) under the names
    the model's generate() gives them, so that the options read here are the ones generate() will use."""
    if not args:
        return dict(kwargs)
    positional = [p.name for p in inspect.signature(model.generate).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional):
        raise TypeError(f"generate() takes at most {len(positional)} positional arguments ({positional}); "
                        f"got {len(args)}.")
    named = dict(zip(positional, args, strict=False))
    twice = sorted(named.keys() & kwargs.keys())
    if twice:
        raise TypeError(f"generate() got multiple values for {twice}.")
    return {**named, **kwargs}


def _prompt_generate_kwargs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = _generate_keywords(model, args, kwargs)
    if torch.is_tensor(kwargs.get("inputs")) and kwargs.get("input_ids") is None:
        kwargs["input_ids"] = kwargs.pop("inputs")
    if kwargs.get("input_ids") is None:
        raise ValueError("generate() with a prompt-learning adapter needs input_ids.")
    given_cache = any(kwargs.get(name) is not None for name in prompt_learning.CACHE_ARGUMENTS)
    if kwargs.get("inputs_embeds") is not None or given_cache:
        raise ValueError("generate() with a prompt-learning adapter builds inputs_embeds and the cache itself.")
    return kwargs


def _generation_setting(model: nn.Module, kwargs: dict[str, Any], name: str) -> Any:
    """A generate() option as generate() resolves it: the keyword, else the given or the model's generation_config."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return getattr(config, name, None)


class PeftModelForSequenceClassification(PeftModel):
    task_heads = ("classifier", "score")
    forward = _named_forward(*TEXT_INPUTS, "token_type_ids", "labels")


class PeftModelForTokenClassification(PeftModel):
    task_heads = ("classifier", "score")
    forward = _named_forward(*TEXT_INPUTS, "token_type_ids", "labels")


class PeftModelForQuestionAnswering(PeftModel):
    task_heads = ("qa_outputs",)
    forward = _named_forward(*TEXT_INPUTS, "token_type_ids", "start_positions", "end_positions")


class PeftModelForFeatureExtraction(PeftModel):
    forward = _named_forward(*TEXT_INPUTS, "token_type_ids")


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   revision: str | None = None, **_: Any) -> PeftModel:
    """Wrap `model` with a new adapter; the PeftModel subclass follows the config's task_type.

    As in peft, the saved config names the model actually wrapped (its `name_or_path`; a different name in the
    config is replaced, with a warning) and `revision`, the base model's revision, if given."""
    peft_config = copy.deepcopy(peft_config)
    name = model.__dict__.get("name_or_path") or getattr(model, "name_or_path", None) or None
    old = peft_config.base_model_name_or_path
    if old is not None and name is not None and old != name:
        warnings.warn(f"The config's base_model_name_or_path {old!r} is replaced by the wrapped model's {name!r}.",
                      stacklevel=2)
    if name is not None:
        peft_config.base_model_name_or_path = name
    if revision is not None:
        if peft_config.revision not in (None, revision):
            warnings.warn(f"The config's revision {peft_config.revision!r} is replaced by {revision!r}.", stacklevel=2)
        peft_config.revision = revision
    cls = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name)
