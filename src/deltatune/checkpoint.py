"""Checkpoint I/O: the map between live adapter parameters and peft's file keys, and safe file writing.

One walk of the live module tree names each parameter of one adapter with its file key (the model key with
the adapter name removed). Saving reads through it and loading writes through it, so the two directions
cannot drift apart; saving takes each layer's `saved_parameters`, which differ from the live ones only where
a layer stores them padded (LoRA prepared for hot-swapping).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.config import CONFIG_NAME
from deltatune.layers import AdapterLayer
from deltatune.modules_to_save import ModulesToSaveWrapper

WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_KEY = "prompt_embeddings"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
MODEL_CARD_NAME = "README.md"
# Layer names that make peft save the embedding base weights beside an adapter (see embedding_weights).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model, or cannot be read."""


def check_adapter_name(name: object) -> None:
    """Refuse a name that cannot be a plain folder name: save_pretrained writes each adapter but the default into a
    subfolder of that name, so a separator, an absolute path or ".." would write outside the folder asked for. A
    "." is refused too: names are keys of the layers' module dicts, where a dot reads as a submodule path."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is not a non-empty string"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name) or os.path.splitdrive(name)[0]:
        problem = "it holds a path separator or drive"
    elif "." in name:
        problem = "it holds a '.'"
    elif "\0" in name:
        problem = "it holds a NUL character"
    elif len(name.encode("utf-8")) > 255:
        problem = "it is longer than 255 bytes"
    if problem is not None:
        raise ValueError(
            f"Invalid adapter name {name!r}: {problem}. Adapter names become folder names: use letters, digits, '-' "
            "and '_' (no '/', '\\', '.', NUL; at most 255 bytes)."
        )


def adapter_parameter_map(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, nn.Parameter]:
    """{file key: live parameter} for one adapter, in peft's key layout.

    Keys are relative to `model`: pass the PeftModel to get peft's `base_model.model.` prefix.
    `bias` is LoRA's bias option: "all" adds every bias of the model, "lora_only" those of adapted layers.
    """
    return _walk(model, adapter_name, bias, saving=False)


def _walk(model: nn.Module, adapter_name: str, bias: str, saving: bool) -> dict[str, torch.Tensor]:
    """adapter_parameter_map's walk; with `saving`, adapter layers give what save writes (see saved_parameters)."""
    out: dict[str, torch.Tensor] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, AdapterLayer):
            items = list(module.saved_parameters(adapter_name) if saving else module.adapter_parameters(adapter_name))
            for suffix, param in items:
                out[prefix + suffix] = param
            if bias == "lora_only" and items:
                base_bias = getattr(module.base_layer, "bias", None)
                if isinstance(base_bias, nn.Parameter):
                    out[f"{prefix}base_layer.bias"] = base_bias
            skip += [f"{prefix}{c}." for c in module.adapter_param_containers]
        elif isinstance(module, ModulesToSaveWrapper):
            skip.append(prefix)
            if module.tied_to is None:
                for suffix, param in module.adapter_parameters(adapter_name):
                    out[prefix + suffix] = param
        elif bias == "all" and isinstance(getattr(module, "bias", None), nn.Parameter):
            out[f"{prefix}bias"] = module.bias
    return out


def _persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, buffer) of what module.state_dict() holds besides parameters (BatchNorm's running statistics)."""
    for owner_name, owner in module.named_modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                yield (f"{owner_name}.{name}" if owner_name else name), buffer


def adapter_buffers(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The persistent buffers of an adapter's module copies (modules_to_save, LN tuning), under file keys.

    peft saves a copy's whole state_dict, so a BatchNorm copy brings its running statistics; they are state, not
    trainable parameters, which is why adapter_parameter_map leaves them out."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, AdapterLayer):
            for container in module.adapter_param_containers:
                items = getattr(module, container)
                item = items[adapter_name] if adapter_name in items else None
                if isinstance(item, nn.Module):
                    out.update({f"{prefix}{container}.{k}": b for k, b in _persistent_buffers(item)})
        elif isinstance(module, ModulesToSaveWrapper) and module.tied_to is None:
            if adapter_name in module.modules_to_save:
                out.update({prefix + k: b for k, b in _persistent_buffers(module.modules_to_save[adapter_name])})
    return out


def _prompt_encoder(model: nn.Module, adapter_name: str) -> nn.Module | None:
    encoders = getattr(model, "prompt_encoder", None)
    return encoders[adapter_name] if isinstance(encoders, nn.ModuleDict) and adapter_name in encoders else None


def _bias_option(model: nn.Module, adapter_name: str, bias: str | None) -> str:
    if bias is None:
        config = getattr(model, "peft_config", {}).get(adapter_name)
        bias = getattr(config, "bias", "none")
    return bias


def _peft_wrapper_bias_copies(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Extra keys peft writes with bias="all": each modules_to_save wrapper's biases once more, under
    `original_module.` and `modules_to_save.` (peft picks every key containing "bias").

    deltatune writes them so the files match peft's key for key, and skips them on load: the first is the
    frozen base bias, the second repeats the copy's own key.
    """
    out: dict[str, nn.Parameter] = {}
    for name, wrapper in model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or adapter_name not in wrapper.modules_to_save:
            continue
        prefix = f"{name}." if name else ""
        parts = {"original_module": wrapper.original_module, "modules_to_save": wrapper.modules_to_save[adapter_name]}
        for part, module in parts.items():
            for key, param in module.named_parameters():
                if key.rpartition(".")[2] == "bias":
                    out[f"{prefix}{part}.{key}"] = param
    return out


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers (or custom) model inside a PeftModel; any other module as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _tied_copies(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The modules_to_save copies tied to another one (ensure_weight_tying): the walk names the shared weights
    once, under their owner; peft also writes them under the tied module's key, and so does deltatune."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and module.tied_to is not None:
            prefix = f"{name}." if name else ""
            out.update((prefix + suffix, param) for suffix, param in module.adapter_parameters(adapter_name))
    return out


def embedding_weights(model: nn.Module, adapter_name: str, save_embedding_layers: bool | str = "auto"
                      ) -> dict[str, torch.Tensor]:
    """{file key: base weight} of the input and output embeddings that peft writes beside an adapter (its
    `save_embedding_layers`), so that an adapter trained on a resized vocabulary carries the rows it needs.

    peft's rule: "auto" means True when target_modules names embed_tokens or lm_head (then only those embedding
    layers the adapter adapts, as `<layer>.base_layer.weight`), or when the model's vocabulary differs from its
    base model's config.json (read only from a local folder: nothing is fetched); True writes both embedding
    layers, adapted or not (`<layer>.weight`). Embeddings held as modules_to_save copies are saved as such.
    """
    config = getattr(model, "peft_config", {}).get(adapter_name)
    base = base_model_of(model)
    if config is None or _prompt_encoder(model, adapter_name) is not None or not hasattr(base, "get_input_embeddings"):
        return {}
    targeted = _embeddings_targeted(base, config)
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted or _vocabulary_resized(base, config)
    return _embedding_layer_weights(model, base, adapted_only=targeted) if save_embedding_layers else {}


def loadable_embedding_weights(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every embedding base weight an adapter file may hold (see embedding_weights), whatever rule wrote it."""
    if _prompt_encoder(model, adapter_name) is not None:
        return {}
    base = base_model_of(model)
    return _embedding_layer_weights(model, base, adapted_only=False) if hasattr(base, "get_input_embeddings") else {}


def _embedding_layer_weights(model: nn.Module, base: nn.Module, adapted_only: bool) -> dict[str, torch.Tensor]:
    names = {id(module): name for name, module in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for layer in (base.get_input_embeddings(), base.get_output_embeddings()):
        if layer is None or isinstance(layer, ModulesToSaveWrapper):
            continue
        adapted = isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, nn.Embedding | nn.Linear)
        if adapted_only and not adapted:
            continue
        module = layer.base_layer if adapted else layer
        prefix = f"{names[id(module)]}." if names.get(id(module)) else ""
        out.update((prefix + key, param) for key, param in module.named_parameters())
    return out


def _embeddings_targeted(base: nn.Module, config: object) -> bool:
    """Whether target_modules names an embedding layer, as peft decides it (exact names in a list; a pattern that
    matches a module called embed_tokens or lm_head)."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets == "all-linear":
            return False
        return any(re.fullmatch(targets, name) for name, _ in base.named_modules()
                   if re.fullmatch(rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})", name))
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocabulary_resized(base: nn.Module, config: object) -> bool:
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    origin = getattr(config, "base_model_name_or_path", None)
    path = os.path.join(origin, "config.json") if origin else ""
    if not vocab or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    saved = saved.get("text_config", saved) if "vocab_size" not in saved else saved
    return saved.get("vocab_size", vocab) != vocab


def _file_parameter_map(model: nn.Module, adapter_name: str, bias: str | None, saving: bool = False,
                        buffers: bool = False) -> dict[str, torch.Tensor]:
    bias = _bias_option(model, adapter_name, bias)
    params = _walk(model, adapter_name, bias, saving)
    if buffers:
        params.update(adapter_buffers(model, adapter_name))
    if _prompt_encoder(model, adapter_name) is None:
        return params
    # peft's prompt-learning models hold the transformers model one level higher (`base_model.<name>`).
    inner = "base_model.model."
    return {("base_model." + k[len(inner):] if k.startswith(inner) else k): p for k, p in params.items()}


def get_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", unwrap_compiled: bool = False,
                              save_embedding_layers: bool | str = "auto", *, bias: str | None = None
                              ) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's file keys (detached; ready for safetensors); the arguments are peft's.

    `state_dict` (the model's, under its live names) supplies the values instead of the live tensors, as in
    peft (alpaca-lora saves this way). A prompt-learning adapter is saved as its final table of virtual-token
    vectors (`prompt_embeddings`), whatever encoder produced it, as peft does. `save_embedding_layers` as in peft
    (see embedding_weights). `unwrap_compiled` is accepted as in peft: a torch.compile'd model is unwrapped anyway.
    """
    model = getattr(model, "_orig_mod", model)
    tensors = _file_parameter_map(model, adapter_name, bias, saving=True, buffers=True)
    if _bias_option(model, adapter_name, bias) == "all":
        tensors.update(_peft_wrapper_bias_copies(model, adapter_name))
    # Tied weights are one tensor under two keys: safetensors needs two, hence the clones.
    tied = {**_tied_copies(model, adapter_name), **embedding_weights(model, adapter_name, save_embedding_layers)}
    tied = {k: t for k, t in tied.items() if k not in tensors}
    if state_dict is not None:
        live = {**_file_parameter_map(model, adapter_name, bias, buffers=True), **tied}
        names = {id(t): n for n, t in reversed((*model.named_parameters(remove_duplicate=False),
                                                *model.named_buffers(remove_duplicate=False)))}
        tensors = {k: _value_in(state_dict, names.get(id(live.get(k))), t) for k, t in tensors.items()}
        tied = {k: _value_in(state_dict, names.get(id(t)), t) for k, t in tied.items()}
    out = {k: t.detach() for k, t in tensors.items()}
    out.update({k: t.detach().clone() for k, t in tied.items()})
    encoder = _prompt_encoder(model, adapter_name)
    if encoder is not None:
        with torch.no_grad():
            out[PROMPT_KEY] = encoder().detach()
    return out


def _value_in(state_dict: dict[str, torch.Tensor], name: str | None, saved: torch.Tensor) -> torch.Tensor:
    """What `state_dict` holds under the live name, cut to the saved shape (a hot-swap-padded factor is saved cut
    to its rank); the saved tensor itself when the state dict does not have it."""
    value = state_dict.get(name) if name is not None else None
    if value is None:
        return saved
    return value[tuple(slice(0, n) for n in saved.shape)] if value.shape != saved.shape else value


class LoadResult(NamedTuple):
    """The keys a load left out, like torch's load_state_dict result (what peft's function returns)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def set_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              bias: str | None = None, strict: bool = True, source: str = "the state dict"
                              ) -> LoadResult:
    """Copy file tensors into the adapter's live parameters; shape mismatches are errors, and key mismatches too
    unless `strict=False` (then they are returned, as peft returns them)."""
    expected = _file_parameter_map(model, adapter_name, bias)
    encoder = _prompt_encoder(model, adapter_name)
    if encoder is not None:
        if not getattr(encoder, "is_table", False):
            raise AdapterLoadError(
                f"Adapter {adapter_name!r} has a trainable prompt encoder, and a saved prompt table cannot be "
                "loaded into it: load the adapter with PeftModel.from_pretrained or load_adapter instead."
            )
        expected = {**expected, PROMPT_KEY: encoder.embedding.weight}
    if _bias_option(model, adapter_name, bias) == "all":
        copies = _peft_wrapper_bias_copies(model, adapter_name)
        state_dict = {k: v for k, v in state_dict.items() if k not in copies}
    # Buffers are optional: files written before deltatune saved them have none, and the live values stay.
    with_buffers = _file_parameter_map(model, adapter_name, bias, buffers=True)
    buffers = {k: b for k, b in with_buffers.items() if k not in expected}
    optional = {**loadable_embedding_weights(model, adapter_name), **_tied_copies(model, adapter_name), **buffers}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - set(optional))
    if strict and (missing or unexpected):
        raise AdapterLoadError(
            f"{source} does not fit adapter {adapter_name!r} of this model.\n"
            f"  missing keys ({len(missing)}): {missing[:10]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}\n"
            "Check that the adapter was trained for this base model and the same target_modules."
        )
    for key, param in {**expected, **optional}.items():
        if key not in state_dict:
            continue
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(param.shape):
            raise AdapterLoadError(
                f"Shape mismatch for {key} in {source}: the file has {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}. Was the adapter trained on a different base model "
                "or with another rank?"
            )
        with torch.no_grad():
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
    return LoadResult(missing, unexpected)


# --- files -------------------------------------------------------------------------------------
Writer = Callable[[str], None]


def atomic_write_files(directory: str, writers: dict[str, Writer]) -> None:
    """Write every file under a temporary name in `directory` first, and rename them all at the end.

    An error or crash while any of them is being written leaves the folder as it was, with no temporary
    files behind, so a failed save never damages the adapter that was there before.
    """
    os.makedirs(directory, exist_ok=True)
    staged: dict[str, str] = {}
    mode = 0o666 & ~_umask()  # what open() would give; mkstemp makes files readable by their owner only
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            os.close(fd)
            staged[tmp] = os.path.join(directory, name)
            write(tmp)
            os.chmod(tmp, mode)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _text_writer(text: str) -> Writer:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def _weights_writer(tensors: dict[str, torch.Tensor], safe_serialization: bool) -> tuple[str, Writer]:
    """(file name, writer): safetensors, or peft's legacy .bin when asked."""
    # safetensors refuses tensors that share storage (tied weights, views): store independent copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    if safe_serialization:
        return WEIGHTS_NAME, lambda tmp: save_file(plain, tmp, metadata={"format": "pt"})

    def write_bin(tmp: str) -> None:
        with open(tmp, "wb") as f:  # torch.save derives an archive name from a path; ".tmp-…" is refused
            torch.save(plain, f)

    return LEGACY_WEIGHTS_NAME, write_bin


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_files(os.path.dirname(os.path.abspath(path)), {os.path.basename(path): _text_writer(text)})


def save_tensors(directory: str, tensors: dict[str, torch.Tensor], safe_serialization: bool = True) -> str:
    name, write = _weights_writer(tensors, safe_serialization)
    atomic_write_files(directory, {name: write})
    return os.path.join(directory, name)


def save_adapter_folder(directory: str, tensors: dict[str, torch.Tensor], config_json: str,
                        model_card: str | None = None, safe_serialization: bool = True) -> None:
    """Write an adapter's weights, config and (if given) model card together (see atomic_write_files).

    The weights file of the other format is removed afterwards: loading prefers safetensors, so a stale one
    would shadow the weights just written.
    """
    name, write = _weights_writer(tensors, safe_serialization)
    writers = {name: write, CONFIG_NAME: _text_writer(config_json)}
    if model_card is not None:
        writers[MODEL_CARD_NAME] = _text_writer(model_card)
    atomic_write_files(directory, writers)
    stale = os.path.join(directory, LEGACY_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME)
    if os.path.exists(stale):
        os.remove(stale)


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None
                        ) -> str:
    """A local adapter folder as is; otherwise a Hub id, fetched (respects HF_HUB_OFFLINE). `subfolder` names the
    adapter's folder inside either."""
    model_id = os.fspath(model_id)
    if os.path.isdir(model_id):
        root = model_id
    else:
        patterns = ["*.json", "*.safetensors", "*.bin"]
        try:
            from huggingface_hub import snapshot_download

            root = snapshot_download(model_id, revision=revision, allow_patterns=[
                f"{subfolder}/{p}" for p in patterns] if subfolder else patterns)
        except Exception as err:
            raise AdapterLoadError(
                f"{model_id!r} is not a local folder and could not be fetched from the Hub ({err})."
            ) from err
    if not subfolder:
        return root
    directory = os.path.join(root, subfolder)
    if not os.path.isdir(directory):
        raise AdapterLoadError(f"{model_id!r} has no subfolder {subfolder!r}.")
    return directory


def load_adapter_weights(directory: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read adapter_model.safetensors, or else adapter_model.bin without unpickling arbitrary objects."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        try:
            return load_file(path), path
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterLoadError(
                f"{path} is not a readable safetensors file ({err}). It is truncated or corrupted: "
                "save or download the adapter again."
            ) from err
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            state_dict = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterLoadError(
                f"{legacy} could not be read as a plain tensor file ({err}). deltatune never unpickles "
                "arbitrary objects; convert the file to safetensors with a tool you trust."
            ) from err
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise AdapterLoadError(f"{legacy} holds something other than a dict of tensors: not an adapter file.")
        return state_dict, legacy
    raise FileNotFoundError(f"No {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {directory!r}.")
