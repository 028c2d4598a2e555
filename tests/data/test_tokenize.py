import pytest
import torch

from deltatune.data import (
    IGNORE_INDEX,
    DataError,
    Records,
    collate,
    demo_task,
    encode_prompt,
    load_records,
    prompt_and_reference,
    render_prompt,
    stop_token_ids,
    tokenize_records,
)

from .conftest import CHATML, make_tokenizer, write_jsonl

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Translate to German: good morning"},
    {"role": "assistant", "content": "Guten Morgen."},
]}


def records_of(rows: list[dict], format: str | None = None) -> Records:
    return Records(rows=rows, source="mem", locations=[f"mem:{i + 1}" for i in range(len(rows))], format=format)


def learned(tokenizer, example) -> str:
    """The text of the tokens that carry a loss, in order."""
    ids = [token for token, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    assert ids == [label for label in example["labels"] if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_chat_loss_covers_assistant_turns_only(chat_tokenizer):
    data = tokenize_records(records_of([CONVERSATION]), chat_tokenizer)
    assert (data.format, data.total, data.truncated, data.dropped, data.label_names) == ("chat", 1, 0, 0, None)
    (example,) = data.examples
    assert learned(chat_tokenizer, example) == "Paris.<|im_end|>\nGuten Morgen.<|im_end|>\n"
    whole = chat_tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert chat_tokenizer.decode(example["input_ids"]) == whole


def test_training_prompt_is_the_evaluation_prompt(chat_tokenizer, plain_tokenizer):
    """The ids before the reference answer are exactly encode_prompt(prompt): generation sees what training saw."""
    cases = [
        (chat_tokenizer, CONVERSATION, "chat"),
        (chat_tokenizer, {"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca"),
        (chat_tokenizer, {"prompt": "2+3=", "completion": "5"}, "prompt_completion"),
        (plain_tokenizer, {"instruction": "Add", "output": "5"}, "alpaca"),
        (plain_tokenizer, {"prompt": "2+3=", "completion": " 5"}, "prompt_completion"),
    ]
    for tokenizer, row, format in cases:
        (example,) = tokenize_records(records_of([row]), tokenizer, format=format).examples
        prompt, reference = prompt_and_reference(row, format)
        prompt_ids = encode_prompt(tokenizer, prompt)
        assert example["input_ids"][: len(prompt_ids)] == prompt_ids, format
        answer = tokenizer.decode(example["input_ids"][len(prompt_ids) :], skip_special_tokens=True)
        assert answer.startswith(reference), format


@pytest.mark.parametrize(
    "row, format",
    [
        ({"instruction": "Add", "input": "2 and 3", "output": "five"}, "alpaca"),
        ({"prompt": "2+3=", "completion": "five"}, "prompt_completion"),
    ],
)
def test_instruction_formats_learn_the_answer_and_eos(chat_tokenizer, plain_tokenizer, row, format):
    prompt, _ = prompt_and_reference(row, format)
    (templated,) = tokenize_records(records_of([row]), chat_tokenizer).examples
    assert learned(chat_tokenizer, templated) == "five</s>"
    assert chat_tokenizer.decode(templated["input_ids"]) == render_prompt(chat_tokenizer, prompt) + "five</s>"
    assert render_prompt(chat_tokenizer, prompt).startswith("<|im_start|>user\n")

    (plain,) = tokenize_records(records_of([row]), plain_tokenizer).examples
    assert learned(plain_tokenizer, plain) == "five</s>"
    assert plain_tokenizer.decode(plain["input_ids"]) == "<s>" + prompt + "five</s>"


def test_text_learns_every_token(plain_tokenizer, chat_tokenizer):
    for tokenizer, start in ((plain_tokenizer, "<s>"), (chat_tokenizer, "")):
        (example,) = tokenize_records(records_of([{"text": "Once upon a time"}]), tokenizer).examples
        assert tokenizer.decode(example["input_ids"]) == start + "Once upon a time</s>"
        assert learned(tokenizer, example) == "Once upon a time</s>"  # all but the bos, which nothing predicts


def test_named_format_overrides_detection(plain_tokenizer):
    rows = [{"text": "great film", "label": "pos"}, {"text": "dull film", "label": "neg"}]
    assert tokenize_records(records_of(rows), plain_tokenizer).format == "classification"
    data = tokenize_records(records_of(rows, format="classification"), plain_tokenizer, format="text")
    assert data.format == "text"
    assert [learned(plain_tokenizer, example) for example in data.examples] == ["great film</s>", "dull film</s>"]


def test_named_format_mismatch_names_file_and_line(tmp_path, chat_tokenizer):
    both = {"prompt": "c", "completion": "d", "instruction": "e", "output": "f"}
    rows = [{"prompt": "a", "completion": "b"}, both, {"prompt": "g", "completion": "h"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    records = load_records(str(path))
    assert records.format == "prompt_completion"
    with pytest.raises(DataError, match=rf"{path}:1: missing 'instruction' \(alpaca format\)"):
        tokenize_records(records, chat_tokenizer, format="alpaca")
    data = tokenize_records(records, chat_tokenizer, format="alpaca", skip_bad_rows=True)
    assert (len(data.examples), data.skipped, data.total) == (1, 2, 3)
    assert data.skipped_examples == [f"{path}:1: missing 'instruction'", f"{path}:3: missing 'instruction'"]
    with pytest.raises(DataError, match="unknown data format"):
        tokenize_records(records, chat_tokenizer, format="instruct")


def test_truncation_is_counted_and_answerless_rows_are_dropped(plain_tokenizer):
    short = {"prompt": "2+3=", "completion": " 5"}
    long_answer = {"prompt": "2+3=", "completion": " five and then many more words to cut off at the end"}
    long_prompt = {"prompt": "Translate to German: good morning " * 10, "completion": " Guten Morgen"}
    data = tokenize_records(records_of([short, long_answer, long_prompt]), plain_tokenizer, max_length=16)
    assert (data.total, data.truncated, data.dropped, len(data.examples)) == (3, 2, 1, 2)
    assert all(len(example["input_ids"]) <= 16 for example in data.examples)
    cut = data.examples[1]
    assert len(cut["input_ids"]) == 16 and cut["labels"][-1] != IGNORE_INDEX
    assert learned(plain_tokenizer, cut).startswith(" five and")


def test_classification_labels(plain_tokenizer):
    rows = [{"text": "great film", "label": "pos"}, {"text": "dull film", "label": "neg"},
            {"text": "fine film", "label": "meh"}]
    data = tokenize_records(records_of(rows), plain_tokenizer)
    assert data.label_names == ["meh", "neg", "pos"]
    assert [example["labels"] for example in data.examples] == [2, 1, 0]
    example = data.examples[0]
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert plain_tokenizer.decode(example["input_ids"]) == "<s>great film"

    named = tokenize_records(records_of(rows), plain_tokenizer, label_names=["neg", "meh", "pos"])
    assert [example["labels"] for example in named.examples] == [2, 0, 1]
    with pytest.raises(DataError, match=r"mem:3: label 'meh' is not one of the label names"):
        tokenize_records(records_of(rows), plain_tokenizer, label_names=["neg", "pos"])

    ints = tokenize_records(records_of([{"text": "a", "label": 2}, {"text": "b", "label": 0}]), plain_tokenizer)
    assert ints.label_names == ["0", "1", "2"] and [example["labels"] for example in ints.examples] == [2, 0]
    with pytest.raises(DataError, match="mem:1: label 2 is out of range"):
        tokenize_records(records_of([{"text": "a", "label": 2}]), plain_tokenizer, label_names=["x", "y"])
    with pytest.raises(DataError, match="mem:2: labels mix integers and strings"):
        tokenize_records(records_of([{"text": "a", "label": 1}, {"text": "b", "label": "1"}]), plain_tokenizer)


def test_classification_truncation_is_counted(plain_tokenizer):
    rows = [{"text": "great film " * 20, "label": 1}, {"text": "dull", "label": 0}]
    data = tokenize_records(records_of(rows), plain_tokenizer, max_length=8)
    assert data.truncated == 1 and len(data.examples[0]["input_ids"]) == 8


def test_chat_needs_a_template(plain_tokenizer):
    with pytest.raises(DataError, match="chat template"):
        tokenize_records(records_of([CONVERSATION]), plain_tokenizer)
    with pytest.raises(DataError, match="chat template"):
        render_prompt(plain_tokenizer, CONVERSATION["messages"][:2])
    assert render_prompt(plain_tokenizer, "2+3=") == "2+3="


def test_template_that_rewrites_earlier_turns_is_refused():
    # Marks only the last message: prefixes of a conversation do not render as prefixes of the whole.
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %}!{% endif %}\n{% endfor %}"
    tokenizer = make_tokenizer(chat_template=template)
    with pytest.raises(DataError, match="mem:1: the tokenizer's chat template does not render this conversation"):
        tokenize_records(records_of([CONVERSATION]), tokenizer)


def test_template_that_writes_the_bos_gets_no_second_one(plain_tokenizer):
    template = "{{ bos_token }}" + CHATML
    tokenizer = make_tokenizer(chat_template=template, add_bos=True)
    row = {"prompt": "2+3=", "completion": "5"}
    (example,) = tokenize_records(records_of([row]), tokenizer).examples
    assert tokenizer.decode(example["input_ids"]).startswith("<s><|im_start|>user\n2+3=")
    assert encode_prompt(tokenizer, "2+3=") == example["input_ids"][: -2]


def test_stop_token_ids(chat_tokenizer, plain_tokenizer):
    assert stop_token_ids(chat_tokenizer) == [chat_tokenizer.eos_token_id, chat_tokenizer.convert_tokens_to_ids(
        "<|im_end|>")]
    assert stop_token_ids(plain_tokenizer) == [plain_tokenizer.eos_token_id]


def test_collate_pads_each_side():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(examples, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(examples, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(tensor.dtype == torch.long for tensor in left.values())


def test_collate_classification_and_prompts():
    batch = collate([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 3},
                     {"input_ids": [1], "attention_mask": [1], "labels": 0}], pad_token_id=9)
    assert batch["labels"].tolist() == [3, 0] and batch["input_ids"].tolist() == [[1, 2], [1, 9]]
    prompts = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_token_id=0, padding_side="left")
    assert set(prompts) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="padding_side"):
        collate([{"input_ids": [1]}], pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate([{"input_ids": [1]}], pad_token_id=None)


def test_demo_task_tokenizes_end_to_end(tmp_path, chat_tokenizer):
    paths = demo_task.write(tmp_path, sizes={"train": 20, "validation": 2, "test": 2})
    records = load_records(str(tmp_path), split="train")
    assert records.locations[0] == f"{paths['train']}:1"
    data = tokenize_records(records, chat_tokenizer, max_length=256)
    assert (data.format, len(data.examples), data.truncated) == ("chat", 20, 0)
    for row, example in zip(records.rows, data.examples, strict=True):
        assert learned(chat_tokenizer, example) == row["messages"][-1]["content"] + "<|im_end|>\n"
