"""The `deltatune` command: eval, generate (one prompt, chat over stdin), merge, models, help and errors."""

from __future__ import annotations

import dataclasses
import io
import json
from importlib.metadata import entry_points

import pytest
import torch
from trainer.conftest import fresh_accelerate_state, tiny_model, train_file  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import PeftModel
from deltatune.cli import main
from deltatune.trainer import TrainConfig


@pytest.fixture(scope="module")
def adapters(tiny_model, train_file, tmp_path_factory):  # noqa: F811
    """Two LoRA adapters trained for a few steps (different seeds), and one prompt-tuning adapter."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--model", tiny_model, "--data", train_file, "--eval-data", train_file, "--max-steps", "3",
              "--batch-size", "4", "--max-length", "64", "--learning-rate", "0.01", "--save-steps", "none"]
    folders = {}
    for name, extra in {"a": ["--seed", "1"], "b": ["--seed", "2"],
                        "prompt": ["--method", "prompt-tuning", "--num-virtual-tokens", "3"]}.items():
        assert main(["train", *common, "--output-dir", str(root / name), *extra]) == 0
        folders[name] = str(root / name)
    return folders


def test_eval_with_an_adapter_matches_the_training_summary(tiny_model, train_file, adapters, capsys, tmp_path):  # noqa: F811
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", tiny_model, "--adapter", f"{adapters['a']}/adapter", "--data", train_file,
                 "--max-length", "64", "--max-new-tokens", "3", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    summary = json.loads(open(f"{adapters['a']}/summary.json").read())
    assert metrics["eval_loss"] == pytest.approx(summary["eval_after"]["eval_loss"], abs=1e-5)
    assert set(metrics) == {"eval_loss", "perplexity", "exact_match"}
    assert "eval_loss" in capsys.readouterr().out
    assert main(["eval", "--model", tiny_model, "--data", train_file, "--max-length", "64", "--no-generate",
                 "--json", str(out)]) == 0
    base = json.loads(out.read_text())
    assert base["eval_loss"] == pytest.approx(summary["eval_before"]["eval_loss"], abs=1e-5)


def test_generate_answers_one_prompt(tiny_model, adapters, capsys):  # noqa: F811
    argv = ["generate", "--model", tiny_model, "--adapter", f"{adapters['a']}/adapter", "--prompt",
            "What is 1 plus 2?", "--max-new-tokens", "4"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # greedy: the same answer twice


def test_generate_chat_switches_adapters(tiny_model, adapters, capsys, monkeypatch):  # noqa: F811
    turns = "hello\n/adapter b\nhello\n/base\nhello\n/adapter nope\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    assert main(["generate", "--model", tiny_model, "--adapter", f"a={adapters['a']}/adapter",
                 "--adapter", f"b={adapters['b']}/adapter", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3  # one answer per user turn, nothing else on stdout
    assert "[b]" in captured.err and "[base model]" in captured.err and "No adapter 'nope'" in captured.err


def test_merge_writes_a_plain_model_with_the_same_outputs(tiny_model, adapters, tmp_path):  # noqa: F811
    out = tmp_path / "merged"
    assert main(["merge", "--model", tiny_model, "--adapter", f"{adapters['a']}/adapter", "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = PeftModel.from_pretrained(base, f"{adapters['a']}/adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft(input_ids=ids).logits, atol=1e-5)


def test_merge_never_deletes_what_it_did_not_write(tiny_model, adapters, tmp_path, capsys):  # noqa: F811
    argv = ["merge", "--model", tiny_model, "--adapter", f"{adapters['a']}/adapter", "--output"]
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*argv, str(tmp_path)]) == 2
    assert "not a model" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"
    out = tmp_path / "merged"
    assert main([*argv, str(out)]) == 0
    assert main([*argv, str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, str(out), "--overwrite"]) == 0


def test_adapter_paths_may_contain_an_equals_sign(tiny_model, adapters, tmp_path):  # noqa: F811
    import shutil

    path = tmp_path / "lr=1e-3" / "adapter"
    shutil.copytree(f"{adapters['a']}/adapter", path)
    from deltatune.cli import _adapters

    assert _adapters([str(path), f"b={path}"]) == {"default": str(path), "b": str(path)}
    assert _adapters(["runs/lr=1e-3/adapter"]) == {"default": "runs/lr=1e-3/adapter"}  # even before it exists


def test_merging_a_prompt_adapter_is_refused(tiny_model, adapters, tmp_path, capsys):  # noqa: F811
    argv = ["merge", "--model", tiny_model, "--adapter", f"{adapters['prompt']}/adapter", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "no weights to merge" in capsys.readouterr().err


def test_models_lists_the_embedded_models(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "not prepared" in out


def test_train_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text


def test_user_errors_are_one_line_with_status_2(tiny_model, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--model", tiny_model, "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error:") and "missing.jsonl" in err and "Traceback" not in err
    assert main(["train", "--data", "x.jsonl"]) == 2
    assert "model is required" in capsys.readouterr().err
    assert main(["train", "--model", tiny_model, "--data", "x.jsonl", "--method", "dorra"]) == 2
    assert "Unknown method 'dorra'" in capsys.readouterr().err


def test_an_adapter_name_that_is_no_folder_name_is_a_user_error(tiny_model, adapters, capsys):  # noqa: F811
    argv = ["generate", "--model", tiny_model, "--adapter", f"v1.2={adapters['a']}/adapter", "--prompt", "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error: --adapter v1.2=") and "folder names" in err and "Traceback" not in err


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("deltatune") == "deltatune.cli:main"


@pytest.mark.parametrize("option", ["--batch-size", "--max-length", "--max-new-tokens"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_eval_sizes_must_be_positive(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "m", "--data", "d.jsonl", option, value])
    assert exit_info.value.code == 2
    assert f"{option}: must be a positive integer, got '{value}'" in capsys.readouterr().err


def test_a_model_that_cannot_load_is_one_line(tiny_model, train_file, tmp_path, capsys):  # noqa: F811
    missing = str(tmp_path / "nomodel")
    assert main(["eval", "--model", missing, "--data", train_file]) == 2
    err = capsys.readouterr().err
    assert f"Cannot load the tokenizer of model {missing!r}" in err and "Traceback" not in err
    weightless = tmp_path / "weightless"
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(weightless)
    assert main(["train", "--model", str(weightless), "--data", train_file, "--output-dir", str(tmp_path / "o")]) == 2
    assert "Cannot load the weights of model" in capsys.readouterr().err


def test_eval_refuses_an_adapter_of_the_other_task(tiny_model, adapters, tmp_path, capsys):  # noqa: F811
    from trainer.conftest import write_jsonl

    rows = [{"text": f"{'great' if i % 2 else 'dull'} number {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(6)]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    assert main(["eval", "--model", tiny_model, "--adapter", f"{adapters['a']}/adapter", "--data", data]) == 2
    assert "is a text-generation adapter, but" in capsys.readouterr().err


def test_data_truncated_away_says_why(tiny_model, train_file, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--model", tiny_model, "--data", train_file, "--max-length", "4", "--max-steps", "1",
                 "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no usable examples" in err and "raise max_length" in err


def test_eval_max_samples_must_be_positive(tiny_model, train_file, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as stopped:
        main(["eval", "--model", tiny_model, "--data", train_file, "--max-samples", "0"])
    assert stopped.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


def test_eval_steps_without_an_eval_set_is_said(tiny_model, train_file, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--model", tiny_model, "--data", train_file, "--eval-split", "0", "--eval-steps", "1",
                 "--max-steps", "1", "--max-length", "64", "--output-dir", str(tmp_path)]) == 0
    assert "eval_steps and eval_generate score nothing" in capsys.readouterr().out


def test_train_and_eval_rename_columns(tiny_model, tmp_path, capsys):  # noqa: F811
    from trainer.conftest import write_jsonl

    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1)}
                                              for i in range(12)])
    common = ["--model", tiny_model, "--data", data, "--max-length", "64"]
    assert main(["train", *common, "--columns", "question=prompt,answer=completion", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert main(["eval", *common, "--columns", "question=prompt,answer=completion", "--no-generate"]) == 0
    assert "eval_loss" in capsys.readouterr().out
    assert main(["eval", *common]) == 2
    assert "cannot detect the data format (keys found: answer, question)" in capsys.readouterr().err
