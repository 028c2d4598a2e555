"""Prompt learning: virtual tokens in front of the input (prompt tuning, P-tuning) or in the KV cache (prefix).

The base model is untouched. Virtual tokens reach it only through its public inputs: `inputs_embeds`,
`attention_mask`, `position_ids` and a `Cache` object for prefixes.

Positions: virtual tokens take positions 0..n-1 and real tokens continue from the attention mask
(n + cumsum(mask) - 1), so a left-padded row gives the same result as the same row unpadded, and
forward() agrees with generate(), which derives positions from the mask the same way. Passing explicit
`position_ids` (real tokens only) keeps them, shifted by n.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Cache, DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer

from deltatune.config import PeftConfig


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning method shares; the last four are read from the model when None."""

    # True for methods whose virtual tokens are key/value prefixes rather than input embeddings.
    is_prefix: ClassVar[bool] = False

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}.")

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


def _first_attr(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


DIMS = ("num_layers", "token_dim", "num_attention_heads")


def resolve_dims(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """A copy of the config with the model-dependent sizes filled in (the caller's object is untouched).

    Sizes already set, by the user or read from a saved adapter, must fit the model: a prompt table of the
    wrong width or a prefix for another layer count would otherwise fail deep inside the model's forward."""
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    resolved = _fill_dims(copy.deepcopy(config), model_config)
    if all(getattr(config, name) is None for name in DIMS):
        return resolved
    fresh = copy.deepcopy(config)
    for name in DIMS:
        setattr(fresh, name, None)
    try:
        expected = {name: getattr(_fill_dims(fresh, model_config), name) for name in DIMS}
    except ValueError:
        return resolved  # the model's config does not say: the adapter config is all there is
    if not config.is_prefix:
        # Virtual tokens join the input embeddings, whatever width hidden_size says (ALBERT's differ); the layer
        # and head counts a prompt config records go unused, as in peft.
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        width = getattr(embeddings, "embedding_dim", None)
        expected = {"token_dim": width or expected["token_dim"]}
    for name, value in expected.items():
        if getattr(resolved, name) != value:
            raise ValueError(
                f"The {config.peft_type} config has {name}={getattr(resolved, name)}, but this model needs "
                f"{name}={value}: the adapter was made for another base model. Load it onto the model it was "
                f"trained on, or leave {name} unset (None) to read it from the model."
            )
    return resolved


def _fill_dims(config: PromptLearningConfig, model_config: Any) -> PromptLearningConfig:
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    inferred = {
        "num_layers": _first_attr(model_config, ("num_hidden_layers", "num_layers", "n_layer")),
        "token_dim": _first_attr(model_config, ("hidden_size", "n_embd", "d_model")),
        "num_attention_heads": _first_attr(model_config, ("num_attention_heads", "n_head", "num_heads")),
    }
    for name, value in inferred.items():
        if getattr(config, name) is None:
            if value is None:
                raise ValueError(f"Could not read {name} from the model's config: set {name} in the adapter config.")
            setattr(config, name, value)
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if config.is_prefix and kv_heads is not None:
        # Prefixes live in the KV cache: num_key_value_heads heads (grouped-query attention) of head_dim each, which
        # a model may set apart from hidden_size / num_attention_heads (Gemma). Applied again to a loaded config,
        # this changes nothing.
        head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return config


# The names transformers has given the KV-cache argument of forward(), newest first (5.24 renamed it).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str | None:
    """The name under which this model's forward() takes a KV cache, or None if it takes none."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def check_can_carry_prefix(model: nn.Module) -> None:
    model_config = getattr(model, "config", None)
    is_decoder = getattr(model_config, "is_encoder_decoder", False) or getattr(model_config, "is_decoder", False)
    is_generative = callable(getattr(model, "can_generate", None)) and model.can_generate()
    if cache_argument(model) is None or not (is_decoder or is_generative):
        model_type = getattr(model_config, "model_type", type(model).__name__)
        raise ValueError(
            f"Prefix tuning needs a model that reads a KV cache, and {model_type} ({type(model).__name__}) does "
            "not use one in its forward pass. Use prompt tuning or P-tuning for this model."
        )


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _ones(batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, n, dtype=like.dtype, device=like.device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _extend_common(model: nn.Module, n: int, batch: int, kwargs: dict[str, Any], device: torch.device,
                   length: int, extend_types: bool = True) -> torch.Tensor | None:
    """Extend attention_mask (and, for virtual tokens in the input, token_type_ids) over the virtual tokens; return
    the real tokens' positions. A prefix adds no input positions, so its token_type_ids stay as given.

    Positions are returned only for decoder-only models that take position_ids (None otherwise).
    """
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    kwargs["attention_mask"] = torch.cat([_ones(batch, n, mask), mask], dim=1)
    if kwargs.get("token_type_ids") is not None and extend_types:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([torch.zeros_like(types[:, :1]).expand(batch, n), types], dim=1)
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if is_encoder_decoder or not _accepts(model, "position_ids"):
        return None
    given = kwargs.pop("position_ids", None)
    if given is not None:
        return given + n
    return positions_from_mask(kwargs["attention_mask"])[:, n:]


def embedding_inputs(model: nn.Module, config: PromptLearningConfig, prompts: torch.Tensor,
                     kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model inputs with the virtual token embeddings in front (prompt tuning and P-tuning)."""
    kwargs = dict(kwargs)
    n = config.num_virtual_tokens
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if input_ids is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        embeds = model.get_input_embeddings()(input_ids)
    batch, length = embeds.shape[:2]
    virtual = prompts[:n].to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    positions = _extend_common(model, n, batch, kwargs, embeds.device, length)
    if positions is not None:
        virtual_positions = torch.arange(n, device=embeds.device).expand(batch, n)
        kwargs["position_ids"] = torch.cat([virtual_positions, positions], dim=1)
    if config.task_type == "CAUSAL_LM" and kwargs.get("labels") is not None:
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([torch.full_like(labels[:, :1], -100).expand(batch, n), labels], dim=1)
    return kwargs


class PrefixOnlyLayer(DynamicLayer):
    """A KV-cache layer that holds the prefix and never grows.

    Each forward attends to the prefix plus its own tokens and stores nothing, so generate(use_cache=False), which
    re-feeds the whole decoded sequence at every step, computes exactly what forward() does. A growing cache would
    keep every re-fed copy of the sequence instead.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # writing the prefix itself
            return super().update(key_states, value_states, *args, **kwargs)
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prefix_cache(model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, batch: int, grow: bool = True):
    """A transformers Cache holding the learned key/value prefix of every layer.

    The table row layout is peft's: per virtual token, num_layers * 2 vectors of token_dim (key, value per
    layer); with two transformer submodules (encoder-decoder) the list is repeated and each decoder layer
    takes the pair at 4 * layer, as peft does, so adapter files mean the same in both libraries.

    Encoder-decoder models get the prefix in the decoder's self-attention cache only; the cross-attention cache
    starts empty (is_updated False), so the decoder computes it from the encoder output of its own batch.
    With grow=False the cache keeps only the prefix (see PrefixOnlyLayer).
    """
    n, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    head_dim = config.token_dim // heads
    kv = table.view(n, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)  # (2L, heads, n, head_dim)
    submodules = config.num_transformer_submodules or 1
    if submodules == 2:
        kv = torch.cat([kv, kv], dim=0)
    step = 2 * submodules
    model_config = getattr(model, "config", None)
    is_encoder_decoder = getattr(model_config, "is_encoder_decoder", False)
    if not grow:
        cache = Cache(layer_class_to_replicate=PrefixOnlyLayer)
    else:
        cache = DynamicCache() if is_encoder_decoder else DynamicCache(config=model_config)
    for layer in range(layers):
        key = kv[step * layer].unsqueeze(0).expand(batch, -1, -1, -1)
        value = kv[step * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(key, value, layer)
    if is_encoder_decoder:
        return EncoderDecoderCache(cache, DynamicCache())
    return cache


def prefix_inputs(model: nn.Module, config: PromptLearningConfig, table: torch.Tensor, kwargs: dict[str, Any],
                  repeat: int = 1, grow: bool = True) -> dict[str, Any]:
    """Model inputs with the prefix in a fresh KV cache (prefix tuning).

    For generate(): `repeat` gives the cache that many rows per input row, since generate() repeats each input for
    beams or returned sequences but not a cache it is handed; grow=False builds a cache that keeps only the prefix,
    for use_cache=False.
    """
    kwargs = dict(kwargs)
    if any(kwargs.get(name) is not None for name in CACHE_ARGUMENTS):
        raise ValueError(
            "forward() with a prefix adapter builds its own KV cache: do not pass one "
            "(use generate() for incremental decoding)."
        )
    n = config.num_virtual_tokens
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if reference is None:
        raise ValueError("Pass input_ids or inputs_embeds.")
    batch, length = reference.shape[:2]
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    kwargs[cache_argument(model)] = prefix_cache(model, config, table.to(model.dtype), batch * repeat, grow)
    if is_encoder_decoder:
        if kwargs.get("decoder_attention_mask") is not None:
            mask = kwargs["decoder_attention_mask"]
            kwargs["decoder_attention_mask"] = torch.cat([_ones(batch, n, mask), mask], dim=1)
        return kwargs
    positions = _extend_common(model, n, batch, kwargs, reference.device, length, extend_types=False)
    if positions is not None:
        kwargs["position_ids"] = positions
    kwargs.setdefault("use_cache", True)
    return kwargs
