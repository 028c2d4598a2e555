"""TrainConfig: every setting of `deltatune train`, read from a YAML file and overridden by command-line flags.

The dataclass is the one list of settings. The CLI flags are generated from its fields and both the YAML values
and the flag strings go through the same conversion (`coerce`), so a file and the command line cannot drift.
Precedence: field default < YAML file < flag.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting is missing, unknown or has a value it cannot take."""


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    # --- what to train on --------------------------------------------------------------------------------
    model: str = setting("", "base model: an embedded name (see `deltatune models`), a local folder or a Hub id")
    data: str = setting("", "training data file (JSONL, JSON, CSV/TSV ...)")
    eval_data: str | None = setting(None, "evaluation data file; without it, eval_split of the training data")
    eval_split: float = setting(0.1, "share of the training rows held out for evaluation when eval_data is unset")
    format: str | None = setting(None, "data format (default: detected from the rows)")
    columns: list[str] | None = setting(
        None, "rename data columns, FROM=TO comma-separated: question=prompt,answer=completion")
    skip_bad_rows: bool = setting(False, "skip malformed rows (counted and reported) instead of stopping")
    max_length: int = setting(512, "longest tokenized example; longer ones are truncated")
    # --- method ------------------------------------------------------------------------------------------
    method: str = setting("lora", "lora, dora, ia3, prompt-tuning, prefix, p-tuning, bottleneck or full")
    r: int = setting(8, "LoRA rank")
    lora_alpha: float = setting(16, "LoRA scaling numerator (scale = lora_alpha / r)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input")
    target_modules: list[str] | None = setting(
        None, "modules to adapt, comma-separated, or all-linear (default: the method's choice for the model)")
    loraplus_lr_ratio: float | None = setting(
        None, "lora/dora: LoRA+, the B matrices learn this many times faster than A (the paper: about 16)")
    num_virtual_tokens: int = setting(20, "virtual tokens of prompt-tuning, prefix and p-tuning")
    prompt_init_text: str | None = setting(None, "prompt-tuning: start the virtual tokens from this text")
    prefix_projection: bool = setting(False, "prefix: learn the prefix through a 2-layer MLP")
    encoder_hidden_size: int | None = setting(None, "prefix/p-tuning: hidden size of the encoder MLP")
    reduction_factor: int = setting(16, "bottleneck: width = hidden size / reduction_factor")
    placement: str = setting("pfeiffer", "bottleneck: houlsby, pfeiffer or parallel")
    # --- optimisation ------------------------------------------------------------------------------------
    epochs: int = setting(3, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = setting(None, "optimizer steps to run; overrides epochs")
    batch_size: int = setting(8, "examples per process per micro-batch")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    learning_rate: float = setting(2e-4, "peak learning rate (AdamW)")
    lr_scheduler: str = setting("linear", "linear, cosine or constant (each after the warmup)")
    warmup_steps: int = setting(0, "linear warmup steps (wins over warmup_ratio)")
    warmup_ratio: float = setting(0.0, "warmup as a share of all steps")
    weight_decay: float = setting(0.0, "AdamW weight decay (not applied to biases and norms)")
    max_grad_norm: float | None = setting(1.0, "clip the gradient norm to this (none: no clipping)")
    mixed_precision: str = setting("no", "no, bf16 or fp16 (fp16 needs a GPU)")
    quantize: str | None = setting(
        None, "load the frozen base quantized (QLoRA): 8bit, 4bit/nf4, fp4, torchao-int8 or torchao-nf4"
    )
    seed: int = setting(42, "seed of the initialisation, data order and dropout")
    compile: bool = setting(
        False, "torch.compile the model's training forward (a one-off compilation, then faster steps; needs a C++ "
               "compiler on a CPU)")
    # --- evaluation --------------------------------------------------------------------------------------
    eval_steps: int | None = setting(None, "evaluate every this many steps (always before and after training)")
    max_eval_samples: int | None = setting(None, "evaluate on at most this many rows")
    eval_batch_size: int | None = setting(
        None, "examples per evaluation batch, generation included (default: batch_size); larger is faster where memory "
              "allows, as nothing is stored for a backward pass")
    eval_generate: bool = setting(False, "also score exact match by generating each reference answer")
    max_new_tokens: int = setting(64, "longest generated answer for eval_generate")
    # --- output ------------------------------------------------------------------------------------------
    output_dir: str = setting("outputs", "folder for metrics, checkpoints, the plot and the final adapter")
    save_steps: int | None = setting(200, "write a checkpoint every this many steps (none: only the final adapter)")
    save_total_limit: int | None = setting(2, "keep only the newest this many checkpoints (none: all)")
    resume: bool | str = setting(False, "continue from the newest checkpoint (true) or from a checkpoint folder")
    overwrite: bool = setting(False, "start over in an output_dir that holds checkpoints of an earlier run")

    def __post_init__(self) -> None:
        # A shell expands ~ only at the start of a word: `--output-dir=~/runs` and YAML values arrive unexpanded.
        for name in ("model", "data", "eval_data", "output_dir"):
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        if isinstance(self.resume, str) and self.resume.startswith("~"):
            self.resume = os.path.expanduser(self.resume)
        check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# --- conversion: one path for YAML values and flag strings ------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}
_NONE = {"none", "null", ""}


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _parts(hint: Any) -> tuple[set[Any], bool]:
    """The non-None types of an annotation, and whether None is allowed."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = set(typing.get_args(hint))
        return args - {type(None)}, type(None) in args
    return {hint}, False


def coerce(name: str, value: Any) -> Any:
    """`value` (from YAML, or a flag's string) as the type of field `name`; ConfigError when it does not fit."""
    kinds, optional = _parts(field_types()[name])
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty.")
    if bool in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if str in kinds and isinstance(value, str):
            return value
    elif int in kinds and not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            return int(value)
    elif float in kinds and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif list[str] in kinds:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    elif str in kinds and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    expected = " or ".join(sorted(_type_name(k) for k in kinds)) + (" or none" if optional else "")
    hint = (" (YAML reads an unquoted no, yes, on or off as false or true: put the value in quotes)"
            if isinstance(value, bool) and str in kinds else "")
    raise ConfigError(f"{name} must be {expected}, got {value!r}{hint}.")


def _type_name(kind: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            list[str]: "a list of names"}.get(kind, str(kind))


# --- checks -----------------------------------------------------------------------------------------------
def check(config: TrainConfig) -> None:
    from deltatune.trainer.methods import check_method

    for name in ("model", "data"):
        if not getattr(config, name):
            raise ConfigError(f"{name} is required: give it in the config file or as --{name}.")
    positive = ["max_length", "batch_size", "gradient_accumulation_steps", "num_virtual_tokens", "r",
                "reduction_factor", "max_new_tokens", "epochs"]
    positive_or_none = ["max_steps", "eval_steps", "save_steps", "save_total_limit", "max_eval_samples",
                        "encoder_hidden_size", "eval_batch_size"]
    for name in positive + positive_or_none:
        value = getattr(config, name)
        if not (value is None and name in positive_or_none) and value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if not 0 <= config.eval_split < 1:
        raise ConfigError(f"eval_split must be in [0, 1), got {config.eval_split!r}.")
    if not 0 <= config.warmup_ratio < 1 or config.warmup_steps < 0:
        raise ConfigError("warmup_steps must be >= 0 and warmup_ratio in [0, 1).")
    # (name, lowest value, whether the lowest is allowed): a negative max_grad_norm would flip every gradient.
    for name, low, allowed in (("learning_rate", 0, False), ("loraplus_lr_ratio", 0, False), ("lora_alpha", 0, False),
                               ("max_grad_norm", 0, False), ("weight_decay", 0, True)):
        value = getattr(config, name)
        if value is not None and (not math.isfinite(value) or value < low or (value == low and not allowed)):
            raise ConfigError(f"{name} must be a finite number {'>=' if allowed else '>'} {low}, got {value!r}.")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}.")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed!r}.")
    _check_choice("lr_scheduler", config.lr_scheduler, SCHEDULERS)
    _check_choice("mixed_precision", config.mixed_precision, PRECISIONS)
    if config.quantize is not None:
        from deltatune.quantized.loading import QUANTIZE_CHOICES

        _check_choice("quantize", config.quantize, QUANTIZE_CHOICES)
    check_method(config)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


# --- sources ----------------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a YAML file, checked against the known names (a typo is an error, with a suggestion)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"Cannot read config file {os.fspath(path)!r}: {err.strerror}.") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{os.fspath(path)} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{os.fspath(path)} must hold a mapping of settings (key: value), not {type(data).__name__}.")
    known = field_types()
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown setting {key!r} in {os.fspath(path)}.{hint}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file's values, then `overrides` (flag strings or Python values)."""
    values = read_yaml(path) if path else {}
    values.update(overrides or {})
    return TrainConfig(**{name: coerce(name, value) for name, value in values.items()})


def save_config(config: TrainConfig, path: str) -> None:
    from deltatune.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# --- command-line flags, generated from the fields --------------------------------------------------------
def add_arguments(parser: Any) -> None:
    """One flag per field (`--learning-rate` and `--learning_rate`); unset flags stay out of the namespace."""
    import argparse

    for f in dataclasses.fields(TrainConfig):
        kinds, _ = _parts(field_types()[f.name])
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"}, key=len, reverse=True)
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if kinds == {bool}:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif bool in kinds:  # `--resume` alone means true; `--resume PATH` names a checkpoint
            parser.add_argument(*flags, nargs="?", const="true", metavar="true|false|PATH", **common)
        else:
            parser.add_argument(*flags, metavar=_metavar(kinds), **common)


def _metavar(kinds: set[Any]) -> str:
    return {int: "N", float: "X", list[str]: "A,B,..."}.get(next(iter(kinds)), "TEXT")


def overrides_from_args(args: Any) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: Any) -> TrainConfig:
    """The run `deltatune train [CONFIG] [--flags]` describes (args.config: the YAML file or None)."""
    overrides, path = overrides_from_args(args), args.config
    resume = overrides.get("resume")
    if path is None and isinstance(resume, str) and resume.endswith((".yaml", ".yml")):
        # `train --resume run.yaml`: argparse hands the optional value to --resume, but a checkpoint is a folder
        path, overrides["resume"] = resume, "true"
    return load_config(path, overrides)
