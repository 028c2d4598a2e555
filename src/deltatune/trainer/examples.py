"""The examples of a run: training examples, and an evaluation set (a file, or rows held out of the training data).

An evaluation set keeps its rows beside the tokenized examples: scoring by generation needs each row's
prompt and reference answer, scoring loss needs the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass, field

import torch

from deltatune.data import DataError, load_records, tokenize_records
from deltatune.data.formats import parse_columns
from deltatune.data.tokenize import class_names


@dataclass
class EvalSet:
    examples: list[dict]
    rows: list[dict]
    format: str
    label_names: list[str] | None = None


@dataclass
class RunData:
    train: list[dict]
    eval: EvalSet | None
    format: str
    label_names: list[str] | None
    notes: list[str] = field(default_factory=list)  # what a person should know: skipped rows, truncation

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the tokenized train and eval examples: a resumed run must continue on the same data."""
        digest = hashlib.sha256(repr((self.format, self.label_names)).encode())
        for examples in (self.train, self.eval.examples if self.eval else []):
            digest.update(b"|")
            for example in examples:
                digest.update(repr(sorted(example.items())).encode())
        return digest.hexdigest()[:16]


def _tokenize(records, tokenizer, format, max_length, label_names, skip_bad_rows, notes: list[str], what: str):
    tokenized = tokenize_records(records, tokenizer, format=format, max_length=max_length, label_names=label_names,
                                 skip_bad_rows=skip_bad_rows)
    skipped = records.skipped + tokenized.skipped
    if skipped:
        examples = [*records.skipped_examples, *tokenized.skipped_examples][:2]
        notes.append(f"{what}: skipped {skipped} bad rows, e.g. {'; '.join(examples)}")
    if tokenized.truncated:
        notes.append(f"{what}: {tokenized.truncated} of {tokenized.total} rows truncated to {max_length} tokens")
    if tokenized.dropped:
        notes.append(f"{what}: {tokenized.dropped} rows left out: no answer token left to learn (after truncation)")
    if not tokenized.examples:
        why = [note.removeprefix(f"{what}: ") for note in notes if note.startswith(f"{what}: ")]
        if tokenized.dropped:
            why.append("raise max_length if truncation left no answer")
        raise DataError(f"{what}: no usable examples in {records.source}" + (f" ({'; '.join(why)})" if why else ""))
    return tokenized


def held_out(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices: a seeded shuffle; the eval side gets ceil(share * n) rows, leaving one to train."""
    if share <= 0 or n < 2:
        return list(range(n)), []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    size = min(n - 1, math.ceil(share * n))
    return sorted(order[size:]), sorted(order[:size])


def load_run_data(config, tokenizer) -> RunData:
    notes: list[str] = []
    columns = parse_columns(config.columns)
    records = load_records(config.data, skip_bad_rows=config.skip_bad_rows, format=config.format, columns=columns)
    label_names = None
    if config.eval_data:
        eval_records = load_records(config.eval_data, skip_bad_rows=config.skip_bad_rows, format=records.format,
                                    columns=columns)
    else:
        label_names = class_names(records, records.format)  # before the split: a rare class may land in eval only
        train_idx, eval_idx = held_out(len(records.rows), config.eval_split, config.seed)
        eval_records = _subset(records, eval_idx) if eval_idx else None
        records = _subset(records, train_idx)
    train = _tokenize(records, tokenizer, records.format, config.max_length, label_names, config.skip_bad_rows,
                      notes, "train data")
    eval_set = None
    if eval_records is not None:
        eval_records = _subset(eval_records, range(min(len(eval_records.rows), config.max_eval_samples or 10**12)))
        tokenized = _tokenize(eval_records, tokenizer, train.format, config.max_length, train.label_names,
                              config.skip_bad_rows, notes, "eval data")
        eval_set = EvalSet(tokenized.examples, eval_records.rows, tokenized.format, tokenized.label_names)
    elif config.eval_steps or config.eval_generate:
        notes.append("no eval set (eval_split 0 and no eval_data): eval_steps and eval_generate score nothing")
    return RunData(train.examples, eval_set, train.format, train.label_names, notes)


def load_eval_set(source: str, tokenizer, *, format: str | None = None, max_length: int = 512,
                  label_names: list[str] | None = None, max_samples: int | None = None,
                  skip_bad_rows: bool = False, columns: dict[str, str] | None = None) -> tuple[EvalSet, list[str]]:
    notes: list[str] = []
    records = load_records(source, skip_bad_rows=skip_bad_rows, format=format, columns=columns)
    records = _subset(records, range(min(len(records.rows), max_samples or 10**12)))
    tokenized = _tokenize(records, tokenizer, records.format, max_length, label_names, skip_bad_rows, notes,
                          "eval data")
    return EvalSet(tokenized.examples, records.rows, tokenized.format, tokenized.label_names), notes


def _subset(records, indices):
    indices = list(indices)
    locations = [records.locations[i] for i in indices] if records.locations else []
    return dataclasses.replace(records, rows=[records.rows[i] for i in indices], locations=locations)
