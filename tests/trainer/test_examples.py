"""The run's examples: the held-out evaluation rows and the class names they share with training."""

from __future__ import annotations

import pytest

from deltatune.trainer import load_config
from deltatune.trainer.examples import held_out, load_run_data

from .conftest import build_tokenizer, write_jsonl


@pytest.mark.parametrize("kind", ["names", "ids"])
def test_a_class_only_the_held_out_rows_have_keeps_its_name(tmp_path, kind):
    n, share, seed = 20, 0.1, 42
    _, eval_rows = held_out(n, share, seed)
    labels = ["neg", "pos", "neutral"] if kind == "names" else [0, 1, 2]
    rows = [{"text": f"row number {i}", "label": labels[i % 2]} for i in range(n)]
    rows[eval_rows[0]]["label"] = labels[2]  # the rare class, which the seeded split holds out
    path = write_jsonl(str(tmp_path / "cls.jsonl"), rows)
    config = load_config(None, {"model": "m", "data": path, "eval_split": share, "seed": seed})
    data = load_run_data(config, build_tokenizer())
    expected = sorted(labels) if kind == "names" else ["0", "1", "2"]
    assert data.label_names == data.eval.label_names == expected
    assert labels[2] not in {rows[i]["label"] for i in range(n) if i not in eval_rows}  # training never sees it
