import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.data import DataError, load_records

from .conftest import write_jsonl

ROWS = [{"prompt": "2+3=", "completion": "5"}, {"prompt": "1+1=", "completion": "2"}]


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", *map(json.dumps, ROWS), "  "])
    records = load_records(str(path))
    assert records.rows == ROWS
    assert records.format == "prompt_completion"
    assert records.locations == [f"{path}:2", f"{path}:3"]
    assert (records.skipped, records.skipped_examples, records.source) == (0, [], str(path))


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028 raw inside strings; str.splitlines() would cut the row there.
    rows = [{"text": "one\u2028two"}, {"text": "three"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows), encoding="utf-8")
    records = load_records(str(path))
    assert records.rows == rows and records.locations[1] == f"{path}:2"


def test_json_list_reports_the_line_each_element_starts_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    records = load_records(str(path))
    assert records.rows == ROWS
    assert records.locations == [f"{path}:2", f"{path}:6"]


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", ROWS)
    assert load_records(str(path)).rows == ROWS


def test_json_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_records(str(path), skip_bad_rows=True)  # cannot resynchronise inside a list


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('"just a string"')
    with pytest.raises(DataError, match="expected a JSON list of objects, got str"):
        load_records(str(path))


def test_csv_types_labels_and_messages(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([{"role": "user", "content": "Hi, you"}, {"role": "assistant", "content": "Hello"}])
    path.write_text('text,label\n"great, really",1\nbad,0\n\n"multi\nline",10\n')
    records = load_records(str(path))
    assert records.rows == [{"text": "great, really", "label": 1}, {"text": "bad", "label": 0},
                            {"text": "multi\nline", "label": 10}]
    assert records.locations == [f"{path}:2", f"{path}:3", f"{path}:5"]

    chat = tmp_path / "chat.csv"
    chat.write_text("messages\n" + '"' + messages.replace('"', '""') + '"\n')
    assert load_records(str(chat)).rows[0]["messages"][1] == {"role": "assistant", "content": "Hello"}


def test_csv_empty_cells_are_absent_and_extra_fields_are_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nAdd 2 and 3,,5\nSay hi,,hi,extra\n")
    with pytest.raises(DataError, match=rf"{path}:3: 4 fields, the header has 3"):
        load_records(str(path))
    records = load_records(str(path), skip_bad_rows=True)
    assert records.rows == [{"instruction": "Add 2 and 3", "output": "5"}]
    assert records.skipped == 1


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\n"quoted" words\t1\n')
    records = load_records(str(path))
    assert records.rows == [{"text": '"quoted" words', "label": 1}]


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pq.write_table(pa.Table.from_pylist([{"messages": messages}, {"messages": messages[:1]}]), path)
    with pytest.raises(DataError, match=rf"{path}:row 2: no assistant message"):
        load_records(str(path))
    records = load_records(str(path), skip_bad_rows=True)
    assert records.rows == [{"messages": messages}]
    assert records.skipped_examples == [f"{path}:row 2: no assistant message: nothing to learn from"]


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "validation.jsonl", ROWS[:1])
    assert len(load_records(str(tmp_path))) == 2  # split defaults to train
    assert len(load_records(str(tmp_path), split="validation")) == 1
    with pytest.raises(DataError, match="no test"):
        load_records(str(tmp_path), split="test")


def test_split_on_a_single_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="single file"):
        load_records(str(path), split="train")


def test_missing_local_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(path))


def test_hub_dataset_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = r"cannot load 'deltatune-tests/no-such-dataset' \(split 'train'\).*HF_HUB_OFFLINE is set"
    with pytest.raises(DataError, match=expected):
        load_records("deltatune-tests/no-such-dataset")


@pytest.mark.parametrize(
    "lines, reason, line",
    [
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": '], "invalid JSON", 2),
        (['{"prompt": "a", "completion": "b"}'] * 2 + ['{"prompt": "a"}'], "missing 'completion'", 3),
        (['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": 7}'], "'completion' must be a", 2),
        (['{"prompt": "a", "completion": "b"}', "[1, 2]"], "expected a JSON object, got list", 2),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, reason, line):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"{path}:{line}: {reason}"):
        load_records(str(path))


def test_skip_bad_rows_counts_and_keeps_examples(tmp_path):
    good = '{"text": "fine"}'
    lines = [good, "{broken", good, '{"text": 3}', good, '{"other": 1}']
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    records = load_records(str(path), skip_bad_rows=True)
    assert len(records) == 3 and records.skipped == 3
    assert records.locations == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert [example.split(": ")[0] for example in records.skipped_examples] == [f"{path}:2", f"{path}:4", f"{path}:6"]


def test_every_row_bad_or_no_row_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "a"}', '{"prompt": "b", "completion": 1}'])
    with pytest.raises(DataError, match="every row is bad"):
        load_records(str(path), skip_bad_rows=True, format="prompt_completion")
    empty = write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match="no rows"):
        load_records(str(empty))


def test_named_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    assert load_records(str(path)).format == "classification"
    assert load_records(str(path), format="text").format == "text"
    with pytest.raises(DataError, match=rf"{path}:1: missing 'prompt'"):
        load_records(str(path), format="prompt_completion")


def test_undetectable_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"{path}: cannot detect the data format"):
        load_records(str(path))


def test_a_json_file_holding_one_object_says_what_a_json_file_holds(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{\n  "rows": [{"text": "a"}]\n}\n')
    with pytest.raises(DataError, match=r"no row could be read.*data.json:1: invalid JSON.*a list of rows"):
        load_records(str(path))


def test_negative_csv_labels_are_refused_as_negative(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood,1\nbad,-1\n")
    with pytest.raises(DataError, match="data.csv:3: 'label' must not be negative"):
        load_records(str(path))


def test_columns_are_renamed_before_the_format_is_detected(tmp_path):
    from deltatune.data.formats import parse_columns

    path = tmp_path / "gsm8k_like.tsv"
    path.write_text("question\tanswer\tsource\nWhat is 2+2?\t4\tx\nAnd 3+3?\t6\ty\n")
    records = load_records(str(path), columns=parse_columns(["question=prompt", "answer = completion"]))
    assert records.format == "prompt_completion"
    assert records.rows[0] == {"prompt": "What is 2+2?", "completion": "4", "source": "x"}
    with pytest.raises(DataError, match=r"columns names \['query'\], which no row has; columns found: \['answer'"):
        load_records(str(path), columns={"query": "prompt"})
    with pytest.raises(DataError, match="'question' is not FROM=TO"):
        parse_columns(["question"])
    with pytest.raises(DataError, match="renames to 'query', which no format reads"):
        parse_columns(["question=query"])
