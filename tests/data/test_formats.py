import pytest

from deltatune.data import DataError, alpaca_prompt, detect_format, prompt_and_reference, row_problem

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
ALPACA = {"instruction": "Add", "input": "2 and 3", "output": "5"}
PROMPT_COMPLETION = {"prompt": "2+3=", "completion": "5"}
TEXT = {"text": "Once upon a time"}
CLASSIFICATION = {"text": "great film", "label": "positive"}


@pytest.mark.parametrize(
    "row, expected",
    [
        (CHAT, "chat"),
        (ALPACA, "alpaca"),
        ({"instruction": "Say hi", "output": "hi"}, "alpaca"),
        (PROMPT_COMPLETION, "prompt_completion"),
        (TEXT, "text"),
        (CLASSIFICATION, "classification"),
        ({"text": "bad film", "label": 0}, "classification"),
    ],
)
def test_detect_each_format(row, expected):
    assert detect_format([row, row]) == expected


def test_detection_follows_the_majority_not_the_first_row():
    # The first row lost its label: it is a bad classification row, not a sign that the file is plain text.
    rows = [{"text": "a"}, {"text": "b", "label": 1}, {"text": "c", "label": 0}]
    assert detect_format(rows) == "classification"


def test_undetectable_rows_name_the_keys_found():
    with pytest.raises(DataError, match="keys found: answer, question"):
        detect_format([{"question": "q", "answer": "a"}])


@pytest.mark.parametrize(
    "row, format, reason",
    [
        ({"messages": "hi"}, "chat", "non-empty list"),
        ({"messages": []}, "chat", "non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "no assistant message"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "chat", "role must be one of"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "chat", "string"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "chat", "starts with an assistant"),
        ({"instruction": "x"}, "alpaca", "missing 'output'"),
        ({"instruction": "x", "output": 5}, "alpaca", "'output' must be a string"),
        ({"instruction": "x", "input": [], "output": "y"}, "alpaca", "'input' must be a string"),
        ({"prompt": "x"}, "prompt_completion", "missing 'completion'"),
        ({"body": "x"}, "text", "missing 'text'"),
        ({"text": "x", "label": 1.5}, "classification", "integer or a string"),
        ({"text": "x", "label": True}, "classification", "integer or a string"),
        ({"text": "x", "label": -1}, "classification", "negative"),
        ({"text": " ", "label": 1}, "classification", "'text' is empty"),
        (["not", "an", "object"], "text", "expected a JSON object"),
    ],
)
def test_row_problems(row, format, reason):
    assert reason in row_problem(row, format)


def test_valid_rows_have_no_problem():
    for row, format in [(CHAT, "chat"), (ALPACA, "alpaca"), (PROMPT_COMPLETION, "prompt_completion"),
                        (TEXT, "text"), (CLASSIFICATION, "classification"), ({"instruction": "x", "input": None,
                                                                                "output": "y"}, "alpaca")]:
        assert row_problem(row, format) is None


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown data format 'jsonish'"):
        row_problem(TEXT, "jsonish")


def test_prompt_and_reference_drops_the_last_assistant_turn_and_what_follows():
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "thanks"},
    ]}
    prompt, reference = prompt_and_reference(row, "chat")
    assert prompt == row["messages"][:4]
    assert reference == "4"


def test_prompt_and_reference_for_instruction_formats():
    assert prompt_and_reference(PROMPT_COMPLETION, "prompt_completion") == ("2+3=", "5")
    prompt, reference = prompt_and_reference(ALPACA, "alpaca")
    assert prompt == alpaca_prompt(ALPACA) == "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert reference == "5"
    no_input = {"instruction": "Add", "input": "", "output": "5"}
    assert alpaca_prompt(no_input) == "### Instruction:\nAdd\n\n### Response:\n"


def test_prompt_and_reference_refuses_non_generative_formats_and_bad_rows():
    with pytest.raises(DataError, match="no prompt and reference"):
        prompt_and_reference(CLASSIFICATION, "classification")
    with pytest.raises(DataError, match="missing 'completion'"):
        prompt_and_reference({"prompt": "x"}, "prompt_completion")
