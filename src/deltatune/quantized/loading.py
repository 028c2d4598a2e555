"""Loading a base model quantized, for the CLI and scripts: one option name per recipe, clear errors when the
backend is missing or cannot run here, and the memory the weights take with and without quantization.

    model = load_base_model("smollm2-135m-instruct", quantize="nf4")   # prints one memory line

Recipes (`QUANTIZE_CHOICES`):
  8bit          bitsandbytes LLM.int8() (`BitsAndBytesConfig(load_in_8bit=True)`)
  4bit, nf4     bitsandbytes 4-bit NF4 with double quantization: the QLoRA recipe
  fp4           bitsandbytes 4-bit FP4 with double quantization
  torchao-int8  torchao int8 weight-only (`TorchAoConfig(quant_type=Int8WeightOnlyConfig())`)
  torchao-nf4   torchao NF4 (`to_nf4`) on every linear layer but the output head, applied after loading
4-bit layers compute in `bnb_4bit_compute_dtype`: bfloat16 on a GPU that has it, else float32 (or the `dtype`
passed, when that is a half-precision dtype).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.quantized import backend_for, config_dtype

QUANTIZE_CHOICES = ("8bit", "4bit", "nf4", "fp4", "torchao-int8", "torchao-nf4")
# What each recipe needs: (import name, pip requirement).
_NEEDS = {
    "8bit": ("bitsandbytes", "bitsandbytes>=0.50"),
    "4bit": ("bitsandbytes", "bitsandbytes>=0.50"),
    "nf4": ("bitsandbytes", "bitsandbytes>=0.50"),
    "fp4": ("bitsandbytes", "bitsandbytes>=0.50"),
    "torchao-int8": ("torchao", "torchao>=0.18"),
    "torchao-nf4": ("torchao", "torchao>=0.18"),
}
_DESCRIPTIONS = {
    "8bit": "bitsandbytes 8-bit", "4bit": "bitsandbytes 4-bit nf4", "nf4": "bitsandbytes 4-bit nf4",
    "fp4": "bitsandbytes 4-bit fp4", "torchao-int8": "torchao int8 weight-only", "torchao-nf4": "torchao NF4",
}


class QuantizationUnavailableError(RuntimeError):
    """The quantization backend asked for is not installed, or cannot run on this machine."""


# --- memory -------------------------------------------------------------------------------------------------
def _leaves(tensor: torch.Tensor):
    """The plain tensors holding a tensor's data: a torchao tensor subclass keeps its data in inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        yield tensor
        return
    names, _ = tensor.__tensor_flatten__()
    for name in names:
        inner = getattr(tensor, name, None)
        if isinstance(inner, torch.Tensor):
            yield from _leaves(inner)


def _storage_bytes(tensors) -> int:
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        for leaf in _leaves(tensor):
            if leaf.device.type == "meta":
                continue
            storage = leaf.untyped_storage()
            seen[(leaf.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def model_memory_bytes(model: nn.Module, full_precision: bool = False) -> int:
    """Bytes the model's parameters and buffers take (each storage once), with the quantization state kept on
    quantized weights (bitsandbytes' scales) included. `full_precision=True`: what the same model takes with
    every quantized linear layer stored unquantized, in the dtype its weight had before quantization."""
    tensors: list[torch.Tensor] = []
    quantized_weights: set[int] = set()
    logical = 0
    fallback = config_dtype(model)  # bitsandbytes' 8-bit layers do not record their weight's dtype
    for module in model.modules():
        backend = backend_for(module)
        if backend is None:
            continue
        quantized_weights.add(id(module.weight))
        if full_precision:
            in_features, out_features = backend.features(module)
            dtype = backend.original_dtype(module) or fallback
            logical += in_features * out_features * dtype.itemsize
        else:
            tensors += [module.weight, *backend.state_tensors(module)]
    tensors += [p for p in model.parameters() if id(p) not in quantized_weights]
    tensors += list(model.buffers())
    return _storage_bytes(tensors) + logical


def memory_report(model: nn.Module, quantize: str | None) -> str:
    """One line: the base model's weights, with and without quantization."""
    used, full = model_memory_bytes(model), model_memory_bytes(model, full_precision=True)
    if quantize is None:
        return f"base model weights: {used / 2**20:.1f} MiB (full precision)"
    return (f"base model weights: {used / 2**20:.1f} MiB with {_DESCRIPTIONS[quantize]} "
            f"(full precision: {full / 2**20:.1f} MiB, {full / max(used, 1):.1f}x as much)")


# --- checks -------------------------------------------------------------------------------------------------
def normalize_quantize(quantize: str | None) -> str | None:
    if quantize is None or quantize.lower() in ("", "none", "no"):
        return None
    key = quantize.lower()
    if key not in _NEEDS:
        raise ValueError(f"Unknown quantize option {quantize!r}; choose one of {', '.join(QUANTIZE_CHOICES)} "
                         "(or leave it out for full precision).")
    return key


def _import_backend(quantize: str):
    package, requirement = _NEEDS[quantize]
    try:
        return importlib.import_module(package)
    except Exception as exc:  # a broken install raises more than ImportError (missing native libraries ...)
        raise QuantizationUnavailableError(
            f"quantize={quantize!r} (--quantize {quantize}) needs {package}, which is not installed or does not "
            f"import ({type(exc).__name__}: {exc}). Install it with `pip install 'deltatune[quant]'` (or "
            f"`pip install '{requirement}'`), or drop the quantize option to load the model in full precision."
        ) from exc


def _probe(quantize: str, device: torch.device) -> None:
    """Quantize and run one small layer on `device` the way the model's layers will be."""
    x = torch.randn(2, 64, device=device)
    if quantize.startswith("torchao"):
        from torchao.quantization import Int8Tensor, PerRow, to_nf4

        weight = torch.randn(128, 64, device=device)
        quantized = to_nf4(weight, 64, 64) if quantize == "torchao-nf4" else Int8Tensor.from_hp(weight, PerRow())
        torch.nn.functional.linear(x, quantized)
        return
    import bitsandbytes as bnb

    if quantize == "8bit":
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(64, 64, quant_type="fp4" if quantize == "fp4" else "nf4",
                                  compute_dtype=torch.float32)
    layer.to(device)(x)


def check_quantization_available(quantize: str | None, device: str | torch.device = "cpu") -> None:
    """Raise QuantizationUnavailableError, saying what to install or which option to drop, unless `quantize`
    can run on `device` here."""
    quantize = normalize_quantize(quantize)
    if quantize is None:
        return
    module = _import_backend(quantize)
    device = torch.device(device)
    try:
        _probe(quantize, device)
    except Exception as exc:
        alternative = ("--quantize torchao-int8" if not quantize.startswith("torchao") else "--quantize 8bit or nf4")
        raise QuantizationUnavailableError(
            f"{_NEEDS[quantize][0]} {getattr(module, '__version__', '')} cannot run {_DESCRIPTIONS[quantize]} "
            f"layers on {device.type} ({type(exc).__name__}: {exc}). Drop the quantize option to load the model in "
            f"full precision, or try {alternative}."
        ) from exc


# --- loading ------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: Any) -> torch.dtype:
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(quantize: str, dtype: Any = None):
    """The transformers quantization config for a recipe; None for torchao-nf4 (applied after loading)."""
    quantize = normalize_quantize(quantize)
    if quantize == "8bit":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    if quantize in ("4bit", "nf4", "fp4"):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4" if quantize == "fp4" else "nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=_compute_dtype(dtype),
        )
    if quantize == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return None


def _nf4_scaler_block(numel: int, block_size: int) -> int | None:
    """The largest power of two up to 256 (torchao's default) that divides the number of blocks; None when the
    weight does not split into whole blocks."""
    if numel % block_size:
        return None
    blocks, size = numel // block_size, 256
    while blocks % size:
        size //= 2
    return size


def quantize_nf4(model: nn.Module, block_size: int = 64) -> nn.Module:
    """Store the weight of every nn.Linear but the output head as a torchao NF4Tensor, in place.

    torchao double-quantizes the block scales in groups (`scaler_block_size`, 256 by default) that must divide the
    number of blocks; each layer gets the largest power of two up to 256 that does. Layers whose size is not a
    multiple of `block_size` stay unquantized (a warning names them)."""
    from torchao.quantization import to_nf4

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head:
            continue
        scaler_block = _nf4_scaler_block(module.weight.numel(), block_size)
        if scaler_block is None:
            skipped.append(name)
            continue
        nf4 = to_nf4(module.weight.detach(), block_size, scaler_block)
        module.weight = nn.Parameter(nf4, requires_grad=False)
    if skipped:
        warnings.warn(f"torchao NF4 left {len(skipped)} linear layer(s) unquantized (size not a multiple of "
                      f"{block_size}): {skipped[:8]}", stacklevel=2)
    return model


def load_base_model(
    name_or_path: str,
    quantize: str | None = None,
    *,
    model_class: Any = None,
    report: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> nn.Module:
    """Load a base model, quantized with one of QUANTIZE_CHOICES or in full precision (quantize=None).

    `name_or_path`: a local folder, a Hub id, or an embedded model's name (prepared on first use).
    `model_class`: the transformers auto class (default AutoModelForCausalLM); `kwargs` go to its from_pretrained
    (dtype, num_labels ...). Quantized loads go to the first GPU when there is one (device_map={"": 0}) unless
    `device_map` is given. Before loading, the backend is imported and one small layer is run on the target
    device, so a missing package or unsupported hardware fails fast with QuantizationUnavailableError saying
    what to install or which option to drop. `report` receives one line with the weights' memory with and
    without quantization (see `model_memory_bytes`); pass None for silence.
    """
    from deltatune.embedded import resolve_model

    quantize = normalize_quantize(quantize)
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    if quantize is not None:
        if "device_map" not in kwargs and torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        device = _device_of(kwargs.get("device_map"))
        check_quantization_available(quantize, device)
        config = quantization_config(quantize, kwargs.get("dtype"))
        if config is not None:
            kwargs.setdefault("quantization_config", config)
    model = model_class.from_pretrained(resolve_model(name_or_path), **kwargs)
    if quantize == "torchao-nf4":
        quantize_nf4(model)
    if report is not None:
        report(memory_report(model, quantize))
    return model


def _device_of(device_map: Any) -> torch.device:
    """The device a device_map puts the model on: {"": d} or a single device; "auto" means the first GPU."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        device_map = devices.pop() if len(devices) == 1 else "auto"
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)
