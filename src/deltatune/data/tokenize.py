"""Rows to token ids with loss masks, and batches of them to padded tensors.

A generative example is a list of text pieces, each either learned (its tokens keep their ids as labels) or
context (labels -100). The pieces are tokenized together whenever the tokenizer allows it (the ids equal those
of the whole text) and piece by piece otherwise, so that the tokens before the first learned piece are always
exactly `encode_prompt(...)` of the evaluation prompt: what the model sees at generation time is what it was
trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from deltatune.data.formats import (
    DataError,
    check_format_name,
    detect_format,
    prompt_and_reference,
    row_problem,
)
from deltatune.data.loading import MAX_EXAMPLES, Records

IGNORE_INDEX = -100

_Piece = tuple[str, bool]  # text, learned


@dataclass
class TokenizedData:
    examples: list[dict]
    format: str
    truncated: int  # rows cut to max_length (including those dropped for it)
    total: int  # rows given
    label_names: list[str] | None  # classification: index -> name; None for generative formats
    dropped: int = 0  # rows left out because no learned token was left (after truncation, or an empty answer)
    skipped: int = 0  # rows not matching a format named here, left out with skip_bad_rows=True
    skipped_examples: list[str] = field(default_factory=list)  # the first few, "file:line: reason"


def tokenize_records(
    records: Records,
    tokenizer,
    *,
    format: str | None = None,
    max_length: int = 512,
    label_names: list[str] | None = None,
    skip_bad_rows: bool = False,
) -> TokenizedData:
    """Token ids and labels for every row, in the named format or the one the records were loaded as.

    Generative formats give {"input_ids", "labels"} with labels -100 outside the learned tokens: assistant turns
    (chat), the output or completion and the eos token (alpaca, prompt_completion), everything ("text").
    Classification gives {"input_ids", "attention_mask", "labels": int}; string labels map to their index in
    `label_names` (default: the sorted distinct labels), and `label_names` is returned so that the evaluation
    split can be tokenized with the same mapping.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    chosen = check_format_name(format) if format else records.format or detect_format(records.rows)
    indices, skipped = _valid_rows(records, chosen, skip_bad_rows)
    if chosen == "classification":
        data = _tokenize_classification(records, indices, tokenizer, max_length, label_names)
    else:
        data = _tokenize_generative(records, indices, tokenizer, chosen, max_length)
    data.total = len(records.rows)
    data.skipped = len(skipped)
    data.skipped_examples = skipped[:MAX_EXAMPLES]
    return data


def class_names(records: Records, format: str | None = None) -> list[str] | None:
    """The label names tokenize_records would derive for classification rows (None for other formats), taken over
    every row: split the rows afterwards and both sides keep the same classes, even one only the eval side has."""
    chosen = check_format_name(format) if format else records.format or detect_format(records.rows)
    if chosen != "classification":
        return None
    indices = [index for index, row in enumerate(records.rows) if row_problem(row, chosen) is None]
    return _label_mapping(records, indices, None)[0]


def _valid_rows(records: Records, format: str, skip_bad_rows: bool) -> tuple[list[int], list[str]]:
    indices, skipped = [], []
    for index, row in enumerate(records.rows):
        problem = row_problem(row, format)
        if problem is None:
            indices.append(index)
        elif skip_bad_rows:
            skipped.append(f"{records.location(index)}: {problem}")
        else:
            raise DataError(f"{records.location(index)}: {problem} ({format} format)")
    return indices, skipped


def _tokenize_generative(records: Records, indices: list[int], tokenizer, format: str, max_length: int):
    if format == "chat" and not has_chat_template(tokenizer):
        raise DataError("chat data needs a tokenizer with a chat template (tokenizer.chat_template is not set)")
    start = _start_ids(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = [] if format == "chat" else eos  # a chat template closes each assistant turn itself
    data = TokenizedData(examples=[], format=format, truncated=0, total=0, label_names=None)
    for index in indices:
        try:
            pieces = _pieces(tokenizer, records.rows[index], format)
        except DataError as exc:
            raise DataError(f"{records.location(index)}: {exc}") from None
        input_ids, labels = _encode_pieces(tokenizer, pieces, start(format))
        input_ids, labels = input_ids + end, labels + end
        if len(input_ids) > max_length:
            data.truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            data.dropped += 1
            continue
        data.examples.append({"input_ids": input_ids, "labels": labels})
    return data


def _pieces(tokenizer, row: Mapping, format: str) -> list[_Piece]:
    if format == "text":
        return [(row["text"], True)]
    if format == "chat":
        return _chat_pieces(tokenizer, _as_messages(row["messages"]))
    prompt, answer = prompt_and_reference(row, format)
    return [(render_prompt(tokenizer, prompt), False), (answer, True)]


def _chat_pieces(tokenizer, messages: list[dict]) -> list[_Piece]:
    """The rendered conversation cut at the assistant turns, found by rendering it prefix by prefix.

    Needs a template that renders a conversation's prefixes as prefixes of the whole; templates that rewrite
    earlier turns (dropping reasoning from past turns, say) are refused rather than masked wrongly.
    """
    whole = _apply_template(tokenizer, messages, generation_prompt=False)
    pieces: list[_Piece] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:index], generation_prompt=True)
        through = _apply_template(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (done <= len(before) < len(through) and whole.startswith(before) and whole.startswith(through)):
            raise DataError(
                f"the tokenizer's chat template does not render this conversation turn by turn (at message {index}),"
                " so its assistant turns cannot be located"
            )
        pieces += [(whole[done : len(before)], False), (whole[len(before) : len(through)], True)]
        done = len(through)
    pieces.append((whole[done:], False))
    return pieces


def _encode_pieces(tokenizer, pieces: list[_Piece], start: list[int]) -> tuple[list[int], list[int]]:
    input_ids, labels = list(start), [IGNORE_INDEX] * len(start)
    text, text_ids = "", []
    for piece, learned in pieces:
        if not piece:
            continue
        text += piece
        whole = _encode(tokenizer, text)
        new = whole[len(text_ids) :] if whole[: len(text_ids)] == text_ids else _encode(tokenizer, piece)
        text_ids += new
        input_ids += new
        labels += new if learned else [IGNORE_INDEX] * len(new)
    return input_ids, labels


def _start_ids(tokenizer):
    """The bos token the tokenizer would add itself, for plain text; a chat template writes its own."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]
    templated = has_chat_template(tokenizer)

    def start(format: str) -> list[int]:
        uses_template = format == "chat" or (templated and format != "text")
        return [bos] if adds_bos and not uses_template else []

    return start


def _tokenize_classification(records: Records, indices: list[int], tokenizer, max_length: int, label_names):
    label_names, label_of = _label_mapping(records, indices, label_names)
    data = TokenizedData(examples=[], format="classification", truncated=0, total=0, label_names=label_names)
    for index in indices:
        row = records.rows[index]
        if len(tokenizer(row["text"])["input_ids"]) > max_length:
            data.truncated += 1
        encoded = tokenizer(row["text"], truncation=True, max_length=max_length)
        try:
            label = label_of(row["label"])
        except DataError as exc:
            raise DataError(f"{records.location(index)}: {exc}") from None
        input_ids, attention_mask = list(encoded["input_ids"]), list(encoded["attention_mask"])
        data.examples.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": label})
    return data


def _label_mapping(records: Records, indices: list[int], label_names: list[str] | None):
    """Class names by index, and the function from a row's label to its index.

    Integer labels are class ids (names default to "0".."max"); string labels are names. A file mixing the two
    is an error: "1" and 1 would silently become different classes.
    """
    labels = [records.rows[index]["label"] for index in indices]
    kinds = {type(label) for label in labels}
    if len(kinds) > 1:
        first_str = next(index for index in indices if isinstance(records.rows[index]["label"], str))
        raise DataError(f"{records.location(first_str)}: labels mix integers and strings; use one kind throughout")
    if label_names is not None:
        label_names = [str(name) for name in label_names]
        if len(set(label_names)) != len(label_names):
            raise DataError(f"label_names has duplicates: {label_names}")
    if str in kinds:
        names = label_names if label_names is not None else sorted(set(labels))
        index_of = {name: position for position, name in enumerate(names)}

        def label_of(label):
            if label not in index_of:
                raise DataError(f"label {label!r} is not one of the label names {names}")
            return index_of[label]

        return names, label_of
    names = label_names if label_names is not None else [str(i) for i in range(max(labels, default=-1) + 1)]

    def label_id(label):
        if label >= len(names):
            raise DataError(f"label {label} is out of range for {len(names)} label names {names}")
        return label

    return names, label_id


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: Sequence[Mapping] | str) -> str:
    """The text a model continues at evaluation: the chat template with the generation prompt when the tokenizer
    has one (a string prompt becomes one user message), the string itself when it has none."""
    if not has_chat_template(tokenizer):
        if isinstance(prompt, str):
            return prompt
        raise DataError("chat messages need a tokenizer with a chat template (tokenizer.chat_template is not set)")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _as_messages(prompt)
    return _apply_template(tokenizer, messages, generation_prompt=True)


def encode_prompt(tokenizer, prompt: Sequence[Mapping] | str) -> list[int]:
    """Token ids of an evaluation prompt, identical to those training put before the learned tokens."""
    format = "prompt_completion" if isinstance(prompt, str) else "chat"
    return _start_ids(tokenizer)(format) + _encode(tokenizer, render_prompt(tokenizer, prompt))


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a generated answer: eos, and the special token that closes an assistant turn in the chat
    template (ChatML's <|im_end|>, Llama 3's <|eot_id|>), which is what chat rows are trained to end with."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if has_chat_template(tokenizer):
        marker = "deltatune"
        messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}]
        turn = _chat_pieces(tokenizer, messages)[1][0]
        after = turn[turn.find(marker) + len(marker) :]
        closing = _encode(tokenizer, after)[:1]
        if closing and closing[0] in tokenizer.all_special_ids and closing[0] not in ids:
            ids += closing
    return ids


def _as_messages(messages: Sequence[Mapping]) -> list[dict]:
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _apply_template(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own TemplateError, and templates may raise anything they like
        raise DataError(f"the chat template failed on this conversation: {type(exc).__name__}: {exc}") from None


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate(examples: Sequence[Mapping], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch: input_ids with `pad_token_id`, attention_mask with 0, token labels with -100.

    Integer labels (classification) are stacked as they are; examples without labels (prompts for generation)
    give a batch without them.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (commonly to the eos token)")
    longest = max(len(example["input_ids"]) for example in examples)

    def pad(values: Sequence[int], fill: int) -> list[int]:
        padding = [fill] * (longest - len(values))
        return padding + list(values) if padding_side == "left" else list(values) + padding

    batch = {
        "input_ids": [pad(example["input_ids"], pad_token_id) for example in examples],
        "attention_mask": [
            pad(example.get("attention_mask") or [1] * len(example["input_ids"]), 0) for example in examples
        ],
    }
    labels = [example.get("labels") for example in examples]
    if all(isinstance(label, int) for label in labels):
        batch["labels"] = labels
    elif all(isinstance(label, Sequence) for label in labels):
        batch["labels"] = [pad(label, IGNORE_INDEX) for label in labels]
    elif any(label is not None for label in labels):
        raise ValueError("examples mix label kinds: all token lists, all integers, or none")
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
