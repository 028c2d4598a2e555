"""Checkpoint I/O: the map between live adapter parameters and peft's file keys, and safe file writing.

One walk of the live module tree names each parameter of one adapter with its file key (the model key with
the adapter name removed). Saving reads through it and loading writes through it, so the two directions
cannot drift apart; saving takes each layer's `saved_parameters`, which differ from the live ones only where
a layer stores them padded (LoRA prepared for hot-swapping).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator

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
# Layer names for which peft also saves the base weights of an adapted layer (see peft_embedding_base_weights).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model, or cannot be read."""


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


def peft_embedding_base_weights(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Base weights peft writes beside the adapter when it adapts a layer named embed_tokens or lm_head (peft's
    `save_embedding_layers="auto"`, for a vocabulary resized before training), under `<layer>.base_layer.weight`.

    deltatune writes them too, so the files match peft's key for key, and loads them into the frozen base layer
    when a file has them.
    """
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, AdapterLayer)
            and next(module.saved_parameters(adapter_name), None) is not None
            and name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES
            and isinstance(module.base_layer, nn.Embedding | nn.Linear)
        ):
            out[f"{name}.base_layer.weight"] = module.base_layer.weight
    return out


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


def get_peft_model_state_dict(model: nn.Module, adapter_name: str = "default", bias: str | None = None
                              ) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's file keys (detached; ready for safetensors).

    A prompt-learning adapter is saved as its final table of virtual-token vectors (`prompt_embeddings`),
    whatever encoder produced it, as peft does.
    """
    out = {k: p.detach() for k, p in _file_parameter_map(model, adapter_name, bias, saving=True, buffers=True).items()}
    if _bias_option(model, adapter_name, bias) == "all":
        out.update({k: p.detach() for k, p in _peft_wrapper_bias_copies(model, adapter_name).items()})
    out.update({k: p.detach() for k, p in peft_embedding_base_weights(model, adapter_name).items()})
    encoder = _prompt_encoder(model, adapter_name)
    if encoder is not None:
        with torch.no_grad():
            out[PROMPT_KEY] = encoder().detach()
    return out


def set_peft_model_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              bias: str | None = None, strict: bool = True, source: str = "the state dict"
                              ) -> None:
    """Copy file tensors into the adapter's live parameters; shape or key mismatches are errors."""
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
    optional = {**peft_embedding_base_weights(model, adapter_name), **buffers}
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
