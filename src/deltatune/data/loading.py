"""Reading training data: local JSONL / JSON / CSV / TSV / Parquet files, folders of split files, Hub datasets.

Every row keeps its location ("file:line", or "file:row N" where a format has no lines) so that a bad row is
reported where a person can find it, at load time or later when a named format is applied.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.data.formats import DataError, check_format_name, detect_format, row_problem

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
MAX_EXAMPLES = 5

# A row as read: its location, and either the row or the reason it could not be parsed.
_Read = tuple[str, object, str | None]


@dataclass
class Records:
    rows: list[dict]
    source: str
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)  # parallel to rows; "file:line"
    format: str | None = None  # the format the rows were checked against

    def __len__(self) -> int:
        return len(self.rows)

    def location(self, index: int) -> str:
        return self.locations[index] if self.locations else f"{self.source}:row {index + 1}"


def load_records(
    source: str, *, split: str | None = None, skip_bad_rows: bool = False, format: str | None = None,
    columns: dict[str, str] | None = None,
) -> Records:
    """Rows of a file, a folder holding `<split>.<ext>` files, or a Hugging Face dataset id.

    Every row is checked against `format` (detected from the rows when None). A bad row raises `DataError`
    naming its file and line, or, with `skip_bad_rows`, is left out and counted. `split` picks a file in a
    folder or a split of a Hub dataset (default "train"); it is an error with a single file. `columns`
    ({file column: row key}, see formats.parse_columns) renames columns before anything else looks at a row.
    """
    if format is not None:
        check_format_name(format)
    read = list(_read(source, split))
    if not read:
        raise DataError(f"{source}: no rows")
    if columns:
        read = _renamed(source, read, columns)
    parsed = [row for _, row, problem in read if problem is None]
    if not parsed:  # nothing to detect a format from: say why the first row could not be read
        location, _, problem = read[0]
        hint = " (a .json file holds a list of rows, or one JSON object per line)" if source.endswith(".json") else ""
        raise DataError(f"{source}: no row could be read; {location}: {problem}{hint}")
    try:
        chosen = format or detect_format(parsed)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    records = Records(rows=[], source=source, format=chosen)
    for location, row, problem in read:
        problem = problem or row_problem(row, chosen)
        if problem is None:
            records.rows.append(dict(row))
            records.locations.append(location)
        elif skip_bad_rows:
            records.skipped += 1
            if len(records.skipped_examples) < MAX_EXAMPLES:
                records.skipped_examples.append(f"{location}: {problem}")
        else:
            raise DataError(f"{location}: {problem} ({chosen} format; skip_bad_rows=True leaves bad rows out)")
    if not records.rows:
        examples = "; ".join(records.skipped_examples)
        raise DataError(f"{source}: every row is bad for the {chosen} format ({records.skipped} rows): {examples}")
    return records


def _renamed(source: str, read: list[_Read], columns: dict[str, str]) -> list[_Read]:
    found = {key for _, row, problem in read if problem is None and isinstance(row, dict) for key in row}
    missing = sorted(set(columns) - found)
    if missing:
        raise DataError(f"{source}: columns names {missing}, which no row has; columns found: {sorted(found)}")
    return [(location, {columns.get(key, key): value for key, value in row.items()}
             if problem is None and isinstance(row, dict) else row, problem) for location, row, problem in read]


def _read(source: str, split: str | None) -> Iterator[_Read]:
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_file(_split_file(path, split or "train"))
    if path.is_file():
        if split is not None:
            raise DataError(f"{source} is a single file: split={split!r} applies to folders and Hub datasets")
        return _read_file(path)
    if _looks_like_path(source):
        raise DataError(f"no such file or folder: {source}")
    return _read_hub(source, split or "train")


def _looks_like_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else that does not exist is a missing local path."""
    return source.lower().endswith(SUFFIXES) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source)


def _split_file(folder: Path, split: str) -> Path:
    candidates = [folder / f"{split}{suffix}" for suffix in SUFFIXES]
    found = [path for path in candidates if path.is_file()]
    if not found:
        present = sorted(p.name for p in folder.iterdir() if p.suffix in SUFFIXES)
        raise DataError(f"{folder} has no {split}{{{','.join(SUFFIXES)}}} file (data files there: {present or 'none'})")
    return found[0]


def _read_file(path: Path) -> Iterator[_Read]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, text, delimiter="," if suffix == ".csv" else "\t")
    if suffix == ".json" and not text.lstrip().startswith("{"):
        return _read_json_array(path, text)
    return _read_json_lines(path, text)  # .jsonl, and .json files holding one object per line


def _read_json_lines(path: Path, text: str) -> Iterator[_Read]:
    # Split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line), None
        except json.JSONDecodeError as exc:
            yield f"{path}:{number}", None, f"invalid JSON ({exc.msg}, column {exc.colno})"


def _read_json_array(path: Path, text: str) -> Iterator[_Read]:
    """Elements of a top-level JSON list with the line each starts on.

    A syntax error inside the list cannot be skipped: nothing says where the next element starts.
    """
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        raise DataError(f"{path}: expected a JSON list of objects, got {type(value).__name__}")
    position = _skip_space(text, position + 1)
    if text.startswith("]", position):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        yield f"{path}:{lines.at(position)}", value, None
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif text.startswith("]", position) and not text[position + 1 :].strip():
            return
        else:
            raise DataError(f"{path}:{lines.at(position)}: invalid JSON (expected ',' or ']' after a list element)")


class _LineCounter:
    """Line numbers of increasing offsets in one pass over the text."""

    def __init__(self, text: str):
        self.text, self.offset, self.line = text, 0, 1

    def at(self, offset: int) -> int:
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_delimited(path: Path, text: str, delimiter: str) -> Iterator[_Read]:
    """CSV (and TSV, unquoted as GLUE writes it) rows keyed by the header; empty cells count as absent.

    Cells have no types, so two columns are read the way the formats need them: integers in "label" become
    ints (class ids, not strings that sort "10" before "2"), and a "messages" cell is parsed as JSON.
    """
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header: list[str] | None = None
    previous_end = 0
    for cells in reader:
        start, previous_end = previous_end + 1, reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = [cell.strip() for cell in cells]
            continue
        location = f"{path}:{start}"
        if len(cells) > len(header):
            yield location, None, f"{len(cells)} fields, the header has {len(header)}"
            continue
        row = {key: cell for key, cell in zip(header, cells, strict=False) if cell != ""}
        yield location, *_typed_cells(row)


def _typed_cells(row: dict) -> tuple[dict, str | None]:
    label = row.get("label")
    if isinstance(label, str) and re.fullmatch(r"\s*-?\d+\s*", label):  # "-1" too, to be refused as negative
        row["label"] = int(label)
    if isinstance(row.get("messages"), str):
        try:
            row["messages"] = json.loads(row["messages"])
        except json.JSONDecodeError as exc:
            return row, f"'messages' cell is not valid JSON ({exc.msg})"
    return row, None


def _read_parquet(path: Path) -> Iterator[_Read]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}:row {number}", row, None


def _read_hub(dataset_id: str, split: str) -> Iterator[_Read]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading the Hub dataset {dataset_id!r} needs `datasets` (pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # network, missing dataset, missing split, offline mode: all one answer to the user
        offline = " HF_HUB_OFFLINE is set, so only datasets already in the local cache load." if _offline() else ""
        raise DataError(
            f"cannot load {dataset_id!r} (split {split!r}) from the Hugging Face Hub: {type(exc).__name__}: {exc}."
            f"{offline} (No local file or folder has this name either.)"
        ) from exc
    for number, row in enumerate(dataset, start=1):
        yield f"{dataset_id}[{split}]:row {number}", row, None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
