"""Exact match: trimmed text equality; JSON objects compared as values only when they are the whole answer."""

from __future__ import annotations

import pytest

from deltatune.trainer.evaluate import exact_match


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    (" 42\n", "42", True),
    ('{"b": 2, "a": 1}', '{"a": 1,  "b": 2}', True),  # key order and spacing aside
    ('{"a": "1"}', '{"a": 1}', False),  # types count
    ('{"retries": 3}', 'Call it with {"retries": 3} and never on Sundays.', False),  # the text around counts
    ('Yes. {"a": 1}', 'No. {"a": 1}', False),
    ('{"a": 1} and more', '{"a": 1}', False),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


def test_generation_keeps_prompt_and_answer_within_max_length():
    """A prompt longer than max_length keeps its last tokens: a model with a 32-position table does not crash."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from deltatune.trainer.generation import generate_answers

    from .conftest import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    prompt = " ".join(f"What is {i} plus {i}?" for i in range(10))
    with pytest.raises(IndexError):
        generate_answers(model.eval(), tokenizer, [prompt], max_new_tokens=4)
    assert len(generate_answers(model, tokenizer, [prompt], max_new_tokens=4, max_length=32)) == 1
