"""Adapter configs: the fields every method shares, JSON I/O, and forward-compatible loading.

A config is plain data. Files are peft's `adapter_config.json`, so keys, names and meanings follow peft.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, ClassVar

from deltatune.registry import get_method, known_methods

CONFIG_NAME = "adapter_config.json"
# The peft release whose file format deltatune writes; peft reads this key to gate format migrations.
PEFT_FORMAT_VERSION = "0.21.2"


class TaskType(StrEnum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(StrEnum):
    """The methods' peft_type names, peft's where peft has the method (configs hold them as plain strings)."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    LN_TUNING = "LN_TUNING"
    BITFIT = "BITFIT"
    BOTTLENECK = "BOTTLENECK"


def _check_task_type(task_type: str | None) -> str | None:
    if task_type is None:
        return None
    value = task_type.value if isinstance(task_type, Enum) else task_type
    known = [t.value for t in TaskType]
    if value not in known:
        raise ValueError(f"Unknown task_type {task_type!r}. Use one of {known}, or None for a custom model.")
    return value


def ordered_names(names: Any) -> Any:
    """Module-name sets (peft accepts them) serialise in random order: store them as a sorted list."""
    return sorted(names) if isinstance(names, set | frozenset | tuple) else names


@dataclass
class PeftConfig:
    """Fields shared by every method. Subclasses set `peft_type` and add their own fields.

    `peft_only_defaults` lists keys peft writes for features deltatune does not implement: they are written
    with peft's defaults so files stay byte-compatible, and a loaded file that sets one to anything else is
    refused (silently ignoring it would give a different model).
    """

    peft_type: ClassVar[str] = ""
    peft_only_defaults: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    auto_mapping: dict | None = None

    def __post_init__(self) -> None:
        self.task_type = _check_task_type(self.task_type)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out.update(copy.deepcopy(self.peft_only_defaults))
        out["peft_type"] = self.peft_type
        out["peft_version"] = PEFT_FORMAT_VERSION
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build a config from a peft-style dict; unknown keys (newer peft fields) warn and are dropped."""
        data = dict(data)
        data.pop("peft_type", None)
        data.pop("peft_version", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unsupported = {
            k: data[k] for k in cls.peft_only_defaults if k in data and data[k] != cls.peft_only_defaults[k]
        }
        if unsupported:
            raise ValueError(
                f"This {cls.peft_type} adapter uses options deltatune does not support yet: {unsupported}. "
                "Train the adapter without them, or load it with peft."
            )
        unknown = sorted(k for k in data if k not in names and k not in cls.peft_only_defaults)
        if unknown:
            warnings.warn(
                f"Ignoring adapter config keys this version of deltatune does not know: {unknown}",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from deltatune.checkpoint import atomic_write_text

        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), self.to_json_string())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                        **_: Any) -> PeftConfig:
        """Load `adapter_config.json` from a folder or a Hub id (as PeftModel.from_pretrained resolves it); on the
        base class the file's peft_type picks the config class."""
        if not os.path.isdir(directory):
            from deltatune.checkpoint import resolve_adapter_dir

            directory, subfolder = resolve_adapter_dir(directory, subfolder=subfolder, revision=revision), None
        path = os.path.join(directory, subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {os.path.dirname(path)!r}: is this a folder written by save_pretrained?"
            )
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); the adapter config is corrupted.") from err
        config_cls = cls if cls.peft_type else config_class_for(data.get("peft_type"), source=path)
        return config_cls.from_dict(data)


def config_class_for(peft_type: str | None, source: str = "the config") -> type[PeftConfig]:
    if peft_type not in known_methods():
        raise ValueError(
            f"Unknown peft_type {peft_type!r} in {source}. deltatune knows: {sorted(known_methods())}."
        )
    return get_method(peft_type).config_cls


def config_from_dict(data: dict[str, Any]) -> PeftConfig:
    return config_class_for(data.get("peft_type")).from_dict(data)


__all__ = ["CONFIG_NAME", "PeftConfig", "PeftType", "TaskType", "config_from_dict"]
