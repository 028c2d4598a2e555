"""The row formats `deltatune train` reads: how each is recognised, what a valid row is, what a model sees.

One table (`REQUIRED_KEYS`) decides detection; one function per format checks a row. The checks return the
reason a row is bad (or None) so that the loader can attach the file and line, or skip and count the row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

FORMATS = ("chat", "alpaca", "prompt_completion", "text", "classification")
GENERATIVE_FORMATS = ("chat", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")

# Detection: a row belongs to the first format whose keys it has all of (order matters: classification
# rows also have "text").
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line (or row)."""


# Every key some format reads: what a column can be renamed to.
ROW_KEYS = ("messages", "instruction", "input", "output", "prompt", "completion", "text", "label")


def parse_columns(pairs: Iterable[str] | None) -> dict[str, str]:
    """{file column: row key} from FROM=TO strings (`question=prompt`), so files with other column names (GSM8K's
    question/answer, SST-2's sentence/label) load without converting them."""
    columns: dict[str, str] = {}
    for pair in pairs or []:
        source, sep, target = (part.strip() for part in pair.partition("="))
        if not sep or not source or not target:
            raise DataError(f"columns: {pair!r} is not FROM=TO (e.g. question=prompt)")
        if target not in ROW_KEYS:
            raise DataError(f"columns: {pair!r} renames to {target!r}, which no format reads; use one of "
                            f"{', '.join(ROW_KEYS)}")
        columns[source] = target
    return columns


def check_format_name(format: str) -> str:
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of {', '.join(FORMATS)}")
    return format


def row_format(row: object) -> str | None:
    """The format a single row looks like, by its keys; None when it looks like none."""
    if not isinstance(row, Mapping):
        return None
    for name, keys in REQUIRED_KEYS.items():
        if all(row.get(key) is not None for key in keys):
            return name
    return None


def detect_format(rows: Iterable[object]) -> str:
    """The format most rows look like (ties go to the earlier format in `REQUIRED_KEYS`).

    A majority vote rather than the first row's keys, so that one malformed row at the top of a file is reported
    as a bad row of the file's format instead of deciding the format for all the others.
    """
    votes: Counter[str] = Counter()
    keys_seen: set[str] = set()
    for row in rows:
        name = row_format(row)
        if name is not None:
            votes[name] += 1
        elif isinstance(row, Mapping):
            keys_seen.update(str(key) for key in row)
    if not votes:
        keys = ", ".join(sorted(keys_seen)) or "none"
        expected = "; ".join(f"{name}: {' + '.join(keys)}" for name, keys in REQUIRED_KEYS.items())
        raise DataError(f"cannot detect the data format (keys found: {keys}); expected keys per format: {expected}")
    order = list(REQUIRED_KEYS)
    return max(votes, key=lambda name: (votes[name], -order.index(name)))


def row_problem(row: object, format: str) -> str | None:
    """Why `row` is not a valid row of `format`, or None when it is."""
    if not isinstance(row, Mapping):
        return f"expected a JSON object, got {type(row).__name__}"
    return _CHECKS[check_format_name(format)](row)


def _string_field(row: Mapping, key: str, *, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None:
        return None if optional else f"missing {key!r}"
    if not isinstance(value, str):
        return f"{key!r} must be a string, got {type(value).__name__}"
    return None


def _check_chat(row: Mapping) -> str | None:
    messages = row.get("messages")
    if messages is None:
        return "missing 'messages'"
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"messages[{index}] must be an object with 'role' and 'content'"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{index}]: role must be one of {', '.join(ROLES)}, got {role!r}"
        if not isinstance(content, str):
            return f"messages[{index}]: 'content' must be a string, got {type(content).__name__}"
    if not any(message["role"] == "assistant" for message in messages):
        return "no assistant message: nothing to learn from"
    if messages[0]["role"] == "assistant":
        return "the conversation starts with an assistant message: it has no prompt"
    return None


def _check_alpaca(row: Mapping) -> str | None:
    return _string_field(row, "instruction") or _string_field(row, "input", optional=True) or _string_field(
        row, "output"
    )


def _check_prompt_completion(row: Mapping) -> str | None:
    return _string_field(row, "prompt") or _string_field(row, "completion")


def _check_text(row: Mapping) -> str | None:
    return _string_field(row, "text")


def _check_classification(row: Mapping) -> str | None:
    problem = _string_field(row, "text")
    if problem:
        return problem
    if not row["text"].strip():
        return "'text' is empty: there is nothing to classify"
    label = row.get("label")
    if label is None:
        return "missing 'label'"
    if isinstance(label, bool) or not isinstance(label, int | str):
        return f"'label' must be an integer or a string, got {type(label).__name__}"
    if isinstance(label, int) and label < 0:
        return f"'label' must not be negative, got {label}"
    return None


_CHECKS = {
    "chat": _check_chat,
    "alpaca": _check_alpaca,
    "prompt_completion": _check_prompt_completion,
    "text": _check_text,
    "classification": _check_classification,
}


def alpaca_prompt(row: Mapping) -> str:
    """The Stanford Alpaca layout, the same with or without a chat template (so evaluation can rebuild it)."""
    if row.get("input"):
        return f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n"
    return f"### Instruction:\n{row['instruction']}\n\n### Response:\n"


def prompt_and_reference(row: Mapping, format: str) -> tuple[list[dict] | str, str]:
    """What to feed a model at evaluation and the answer expected back, for exact-match scoring by generation.

    Chat rows give their messages up to (not including) the last assistant turn, and that turn's content.
    The prompt is exactly what training put before the labelled tokens; `render_prompt` turns it into text.
    """
    problem = row_problem(row, format)
    if problem:
        raise DataError(f"not a valid {format} row: {problem}")
    if format == "chat":
        messages = row["messages"]
        last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
        prompt = [{"role": message["role"], "content": message["content"]} for message in messages[:last]]
        return prompt, messages[last]["content"]
    if format == "alpaca":
        return alpaca_prompt(row), row["output"]
    if format == "prompt_completion":
        return row["prompt"], row["completion"]
    raise DataError(f"{format!r} rows have no prompt and reference answer; generation needs a generative format")
