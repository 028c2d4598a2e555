"""The data layer of `deltatune train`: loading rows, their formats, tokenizing with loss masks, the demo task."""

from deltatune.data import demo_task
from deltatune.data.formats import (
    FORMATS,
    GENERATIVE_FORMATS,
    DataError,
    alpaca_prompt,
    detect_format,
    prompt_and_reference,
    row_problem,
)
from deltatune.data.loading import Records, load_records
from deltatune.data.tokenize import (
    IGNORE_INDEX,
    TokenizedData,
    collate,
    encode_prompt,
    has_chat_template,
    render_prompt,
    stop_token_ids,
    tokenize_records,
)

__all__ = [
    "FORMATS",
    "GENERATIVE_FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "Records",
    "TokenizedData",
    "alpaca_prompt",
    "collate",
    "demo_task",
    "detect_format",
    "encode_prompt",
    "has_chat_template",
    "load_records",
    "prompt_and_reference",
    "render_prompt",
    "row_problem",
    "stop_token_ids",
    "tokenize_records",
]
