"""LoRA initialisations that start from the base weight (PiSSA, OLoRA), and converting such adapters back.

PiSSA and OLoRA put a rank-r piece of the base weight W into the adapter and leave the residual in the base
layer, so the model computes the same function at initialisation: W_res + s * B0 A0 = W. The math below is pure
(tensors in, tensors out); `init_from_base_weight` is the one place that reads and writes a layer.

A file of such an adapter holds factors trained against W_res. Loading it re-runs the (deterministic) init on the
original base to recreate W_res, as peft does, so it loads onto the original model. `convert_to_plain_lora` turns
it into an ordinary LoRA adapter of rank 2r for the original base: s * (B A - B0 A0) = s * [B, -B0] [A; A0].
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import torch
from torch import nn

from deltatune.checkpoint import load_adapter_weights
from deltatune.injection import is_target, resolve_targets
from deltatune.registry import get_method

PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
WEIGHT_INIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def parse_init(init: bool | str) -> tuple[str, int | None] | None:
    """("pissa", niter or None) / ("olora", None) for inits that mutate the base weight, else None."""
    if not isinstance(init, str):
        return None
    if init == "pissa":
        return "pissa", None
    if init == "olora":
        return "olora", None
    match = PISSA_NITER.fullmatch(init)
    return ("pissa", int(match.group(1))) if match else None


def mutates_base(init: bool | str) -> bool:
    return parse_init(init) is not None


def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) for a weight of shape (out, in): the top-r singular triplets W ~ V S U^T go to
    B = V sqrt(S / s) and A = sqrt(S / s) U^T, so that s * B A is the best rank-r approximation of W.

    With `niter`, torch.svd_lowrank (randomised, `niter` subspace iterations) replaces the full SVD. Its random
    draws come from a fixed seed, so that loading a trained adapter recreates the same residual (peft draws from
    torch's global generator, so its reload differs from the trained model).
    """
    if niter is None:
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r], uh[:r]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.device.type == "cuda" else []):
            torch.manual_seed(0)
            vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
        uhr = ur.t()
    root = torch.sqrt(sr / scaling)
    a = torch.diag(root) @ uhr
    b = vr @ torch.diag(root)
    return a, b, weight - scaling * b @ a


def olora_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) for a weight of shape (out, in): W = Q R, B = Q[:, :r] (orthonormal), A = R[:r]."""
    q, rr = torch.linalg.qr(weight)
    b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    return a, b, weight - scaling * b @ a


def refuse_tied_targets(model: nn.Module, config):
    """LoRA's prepare_config: PiSSA / OLoRA rewrite a target's base weight, which would also rewrite every module
    tied to it (an input embedding tied to lm_head) and change the model's function. peft does so silently."""
    if not mutates_base(getattr(config, "init_lora_weights", None)):
        return config
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    targets = resolve_targets(model, config, get_method(config.peft_type))
    for names in owners.values():
        adapted = [name for name in names if is_target(name, config, targets)]
        if len(names) > 1 and adapted:
            others = [name for name in names if name != adapted[0]]
            raise ValueError(
                f"init_lora_weights={config.init_lora_weights!r} rewrites the base weight of {adapted[0]}, which "
                f"the model shares with {others}: they would change too. Leave {adapted[0]} out of target_modules, "
                "or untie the weights first."
            )
    return config


def init_from_base_weight(layer: nn.Module, adapter_name: str, init: str) -> None:
    """Fill a LoRA linear layer's factors by PiSSA / OLoRA and store the residual in its base layer.

    GPT-2's Conv1D stores its weight as (in, out) (`fan_in_fan_out`): the decomposition runs on the (out, in)
    view so that B A has the layout of the factors. (peft decomposes the stored tensor as is, which for OLoRA
    gives factors that do not fit a Conv1D layer.)
    """
    kind, niter = parse_init(init)
    if not hasattr(layer, "fan_in_fan_out"):
        raise ValueError(
            f"init_lora_weights={init!r} starts from the weight of a linear layer; it cannot initialise a "
            f"{type(layer.base_layer).__name__} layer. Leave that layer out of target_modules or use another init."
        )
    base = layer.base_layer
    dtype = base.weight.dtype
    if dtype not in WEIGHT_INIT_DTYPES:
        raise TypeError(
            f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight, got {dtype}; initialise "
            "before quantising the residual model."
        )
    weight = base.weight.detach().to(torch.float32)
    if layer.fan_in_fan_out:
        weight = weight.T
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if kind == "pissa":
        a, b, residual = pissa_factors(weight, r, scaling, niter)
    else:
        a, b, residual = olora_factors(weight, r, scaling)
    layer.lora_A[adapter_name].weight.data = a.contiguous()
    layer.lora_B[adapter_name].weight.data = b.contiguous()
    if layer.fan_in_fan_out:
        residual = residual.T
    base.weight.data = residual.to(dtype).contiguous()


# --- converting back to a plain LoRA adapter -------------------------------------------------------
FACTOR_SUFFIXES = {"A": ("lora_A.weight", "lora_embedding_A"), "B": ("lora_B.weight", "lora_embedding_B")}


def _factor_kind(key: str) -> str | None:
    for kind, suffixes in FACTOR_SUFFIXES.items():
        if any(key.endswith("." + suffix) for suffix in suffixes):
            return kind
    return None


def subtract_initial_factors(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor]:
    """File tensors of the plain LoRA adapter equal to `trained` minus `initial`: A' = [A; A0], B' = [B, -B0].

    Both dicts use file keys. Base weights saved beside the adapter (`<layer>.base_layer.weight`) are dropped:
    those of initialised layers are residuals, which must not reach the original model. Other keys
    (modules_to_save copies, biases) are kept as they are; peft's conversion drops them, and embedding factors too.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in trained.items():
        kind = _factor_kind(key)
        if key.endswith(".base_layer.weight"):
            continue
        if kind is None:
            out[key] = tensor
            continue
        if key not in initial:
            raise ValueError(
                f"The initial adapter has no tensor {key}: pass the folder saved from this adapter right after "
                "initialisation, before training."
            )
        start = initial[key].to(device=tensor.device, dtype=tensor.dtype)
        if tensor.shape != start.shape:
            raise ValueError(
                f"{key}: the initial adapter's tensor has shape {tuple(start.shape)}, the trained one "
                f"{tuple(tensor.shape)}; they do not come from the same adapter."
            )
        out[key] = torch.cat([tensor, start], dim=0) if kind == "A" else torch.cat([tensor, -start], dim=1)
    return out


def doubled_rank_config(config):
    """The config of the converted adapter: rank 2r with the same scaling, init_lora_weights=True."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "path_initial_model_for_weight_conversion cannot be used with use_rslora=True together with "
            "rank_pattern or alpha_pattern: doubling the ranks would change the scaling of those layers."
        )
    config = copy.deepcopy(config)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha = config.lora_alpha * math.sqrt(2) if config.use_rslora else config.lora_alpha * 2
    config.rank_pattern = {key: 2 * value for key, value in config.rank_pattern.items()}
    config.alpha_pattern = {key: 2 * value for key, value in config.alpha_pattern.items()}
    return config


def convert_to_plain_lora(tensors: dict[str, torch.Tensor], config, initial_dir: str
                          ) -> tuple[dict[str, torch.Tensor], object]:
    """(file tensors, config) of the plain LoRA adapter, for the original base model, equal to this trained
    PiSSA / OLoRA adapter on its residual base; `initial_dir` holds the adapter saved right after initialisation.

    Unlike peft, the initial folder is only read: peft also overwrites its adapter_config.json.
    """
    from deltatune.methods.lora.config import LoraConfig  # its module imports this one

    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"path_initial_model_for_weight_conversion converts LoRA adapters (PiSSA, OLoRA); this adapter is "
            f"{config.peft_type}."
        )
    if getattr(config, "use_dora", False):
        raise ValueError("path_initial_model_for_weight_conversion does not support DoRA adapters.")
    if not (config.init_lora_weights is True or mutates_base(config.init_lora_weights)):
        warnings.warn(
            "path_initial_model_for_weight_conversion converts adapters initialised by PiSSA or OLoRA; this one "
            f"has init_lora_weights={config.init_lora_weights!r}.",
            stacklevel=3,
        )
    initial, _ = load_adapter_weights(initial_dir)
    return subtract_initial_factors(tensors, initial), doubled_rank_config(config)
