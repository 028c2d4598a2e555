"""BottleneckConfig: where bottleneck adapters go, how wide they are, and which non-linearity they use.

A bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022 for the parallel form)
wraps a whole block, an attention or feed-forward sub-module, rather than one weight matrix. This is
deltatune's own method (peft has no equivalent), so the file layout is peft's but the keys are ours.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltatune.config import PeftConfig, ordered_names

# Where the adapters go when target_modules is None, and whether they read the block's input or output.
PLACEMENTS: dict[str, tuple[tuple[str, ...], bool]] = {
    # name: (blocks adapted, parallel)
    "houlsby": (("attention", "feed_forward"), False),
    "pfeiffer": (("feed_forward",), False),
    "parallel": (("feed_forward",), True),
}

NON_LINEARITIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "identity": nn.Identity,
}

# The attention and feed-forward blocks of each architecture, keyed by transformers' `config.model_type`.
# Paths are relative to one repeated layer (`model.layers.3.`); each is the module whose output is the
# block's contribution before the layer adds its residual (and, in post-norm encoders, normalises).
# BERT-style encoders have no single feed-forward module, so the adapter wraps the output projections there:
# a parallel adapter then reads the projection's input (the intermediate activations), not the hidden states.
ARCHITECTURE_BLOCKS: dict[str, dict[str, str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "phi3"),
        {"attention": "self_attn", "feed_forward": "mlp"},
    ),
    "gpt2": {"attention": "attn", "feed_forward": "mlp"},
    "gpt_neox": {"attention": "attention", "feed_forward": "mlp"},
    # Bloom's attention and MLP add the residual inside their own forward: their output projections instead.
    "bloom": {"attention": "self_attention.dense", "feed_forward": "mlp.dense_4h_to_h"},
    "falcon": {"attention": "self_attention", "feed_forward": "mlp"},
    "opt": {"attention": "self_attn", "feed_forward": "fc2"},
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2"),
        {"attention": "attention.output.dense", "feed_forward": "output.dense"},
    ),
    "distilbert": {"attention": "attention", "feed_forward": "ffn"},
    **dict.fromkeys(("t5", "mt5"), {"attention": "SelfAttention", "feed_forward": "DenseReluDense"}),
    **dict.fromkeys(("vit", "deit", "dinov2"), {"attention": "attention", "feed_forward": "mlp"}),
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters: out + scaling * up(act(down(h))), with `up` starting at zero (a no-op adapter).

    placement: "houlsby" (after the attention and the feed-forward block), "pfeiffer" (after the feed-forward
    block) or "parallel" (beside the feed-forward block: h is the block's input, not its output). Explicit
    target_modules replace the blocks a placement picks; "parallel" still decides what the adapter reads.
    target_modules: module-name suffixes (list) or a regex fully matched against full module names (str),
    naming whole blocks (or single layers) to wrap. None: the placement's blocks, for known architectures.
    reduction_factor: the bottleneck is hidden_size // reduction_factor wide; bottleneck_size overrides it.
    scaling: multiplies the adapter's output (He et al. use 4.0 for parallel adapters).
    init_weights: False starts `up` random instead of at zero (an adapter that changes the output, for tests).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    placement: str = "pfeiffer"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}.")
        if not _is_positive_int(self.reduction_factor):
            raise ValueError(
                "reduction_factor must be an integer >= 1 (the bottleneck is hidden_size // "
                f"reduction_factor wide), got {self.reduction_factor!r}."
            )
        if self.bottleneck_size is not None and not _is_positive_int(self.bottleneck_size):
            raise ValueError(
                f"bottleneck_size must be a positive integer or None, got {self.bottleneck_size!r}."
            )
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"Unknown non_linearity {self.non_linearity!r}. Valid ones: {sorted(NON_LINEARITIES)}."
            )
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, int | float) or not math.isfinite(
            self.scaling
        ):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}.")
        self.target_modules = ordered_names(self.target_modules)
        self.exclude_modules = ordered_names(self.exclude_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)

    @property
    def parallel(self) -> bool:
        return PLACEMENTS[self.placement][1]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def placement_targets(model: nn.Module, config: BottleneckConfig) -> str:
    """The regex that selects the placement's blocks in every repeated layer of `model`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    blocks = ARCHITECTURE_BLOCKS.get(model_type)
    if blocks is None:
        raise ValueError(
            f"placement={config.placement!r} needs to know this model's attention and feed-forward blocks, "
            f"and deltatune has no table entry for model_type={model_type!r} "
            f"(it knows {sorted(ARCHITECTURE_BLOCKS)}). "
            f"Set target_modules to the blocks to wrap, e.g. target_modules=['mlp']. Sub-modules of this "
            f"model's repeated layers: {_block_names(model)}."
        )
    paths = [blocks[kind] for kind in PLACEMENTS[config.placement][0]]
    return rf".*\.\d+\.({'|'.join(re.escape(path) for path in paths)})"


def complete_bottleneck_config(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """A copy with target_modules filled in from the placement when the user gave none."""
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=placement_targets(model, config))


def _block_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Names of the children of numbered layers (`blocks.0.attn` -> `attn`), else of the model itself."""
    matches = (re.fullmatch(r"(?:.*\.)?\d+\.([^.]+)", name) for name, _ in model.named_modules())
    names = {m.group(1) for m in matches if m}
    names = names or {name for name, _ in model.named_children()}
    return sorted(names)[:limit]
