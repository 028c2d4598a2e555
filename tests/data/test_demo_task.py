import json

import pytest

from deltatune.data import demo_task, load_records
from deltatune.data.demo_task import json_exact_match


def test_splits_and_sizes():
    splits = demo_task.generate()
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 600, "validation": 60, "test": 100}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = demo_task.write(tmp_path / "a")
    second = demo_task.write(tmp_path / "b", seed=0)
    other = demo_task.write(tmp_path / "c", seed=1)
    assert sorted(first) == ["test", "train", "validation"]
    for split, path in first.items():
        assert path.name == f"{split}.jsonl"
        assert path.read_bytes() == second[split].read_bytes()
        assert path.read_bytes() != other[split].read_bytes()


def test_rows_are_valid_chat_with_compact_ordered_answers(tmp_path):
    demo_task.write(tmp_path)
    for split in ("train", "validation", "test"):
        records = load_records(str(tmp_path), split=split)
        assert records.format == "chat" and records.skipped == 0
        for row in records.rows:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            answer = json.loads(assistant["content"])
            assert tuple(answer) == demo_task.KEYS and isinstance(answer["age"], int)
            assert assistant["content"] == json.dumps(answer, separators=(",", ":"))
            sentence = user["content"].removeprefix(demo_task.INSTRUCTION)
            assert all(str(answer[key]) in sentence for key in demo_task.KEYS)


def test_values_do_not_overlap_between_splits():
    splits = demo_task.generate()
    values = {split: _values(rows) for split, rows in splits.items()}
    for key in ("first", "last", "city", "job"):
        train, validation, test = (values[split][key] for split in ("train", "validation", "test"))
        assert not train & validation and not train & test and not validation & test, key
        assert len(train) > len(test) >= len(validation) > 1, key


def test_sentences_vary():
    rows = demo_task.generate()["train"]
    used = {_template_of(row) for row in rows}
    assert len(demo_task.TEMPLATES) >= 8 and used == set(range(len(demo_task.TEMPLATES)))
    assert len({row["messages"][0]["content"] for row in rows}) > 590


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ('{"name":"Ana Silva","age":34,"city":"Porto","job":"nurse"}',
         '{"name":"Ana Silva","age":34,"city":"Porto","job":"nurse"}', True),
        ('Sure! {"city": "Porto", "job": "nurse",\n "name": "Ana Silva", "age": 34} Hope this helps {"x": 1}',
         '{"name":"Ana Silva","age":34,"city":"Porto","job":"nurse"}', True),
        ('{not json} then {"a": 1}', '{"a":1}', True),
        ('```json\n{"a": [1, {"b": 2}]}\n```', '{"a":[1,{"b":2}]}', True),
        ('{"name":"Ana Silva","age":"34","city":"Porto","job":"nurse"}',
         '{"name":"Ana Silva","age":34,"city":"Porto","job":"nurse"}', False),
        ('{"name":"Ana Silva","age":34}', '{"name":"Ana Silva","age":34,"job":"x"}', False),
        ('{"a": true}', '{"a": 1}', False),
        ('{"name":"Ana Silva","age":34', '{"name":"Ana Silva","age":34}', False),
        ("no json here", '{"a": 1}', False),
        ("", '{"a": 1}', False),
    ],
)
def test_json_exact_match(prediction, reference, expected):
    assert json_exact_match(prediction, reference) is expected


def _values(rows: list[dict]) -> dict[str, set[str]]:
    answers = [json.loads(row["messages"][1]["content"]) for row in rows]
    return {
        "first": {answer["name"].split()[0] for answer in answers},
        "last": {answer["name"].split()[1] for answer in answers},
        "city": {answer["city"] for answer in answers},
        "job": {answer["job"] for answer in answers},
    }


def _template_of(row: dict) -> int:
    """Which template wrote the sentence: the one whose fixed words it contains, in order."""
    sentence = row["messages"][0]["content"].removeprefix(demo_task.INSTRUCTION)
    answer = json.loads(row["messages"][1]["content"])
    article = "an" if answer["job"][0] in "aeiou" else "a"
    for index, template in enumerate(demo_task.TEMPLATES):
        if template.format(**answer, a_job=f"{article} {answer['job']}") == sentence:
            return index
    raise AssertionError(sentence)
