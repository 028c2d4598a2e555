"""TrainConfig: YAML < flags precedence, flags generated from every field, one conversion for both sources."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune.cli import build_parser
from deltatune.trainer.config import ConfigError, TrainConfig, coerce, config_from_args, load_config
from deltatune.trainer.methods import METHODS


def _config_from_cli(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_flag_beats_yaml_beats_default(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d.jsonl\nmethod: lora\nr: 4\nlearning_rate: 0.1\ntarget_modules: [q_proj]\n")
    config = _config_from_cli([str(path), "--r", "2", "--target-modules", "q_proj,v_proj", "--no-eval-generate"])
    assert config.r == 2  # flag
    assert config.learning_rate == 0.1  # YAML
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.lora_alpha == 16 and config.eval_generate is False  # default / explicit false flag
    assert config.model == "m" and config.data == "d.jsonl"


def test_every_field_is_a_flag_in_both_spellings():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    options = {option for action in train._actions for option in action.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in options and f"--{f.name.replace('_', '-')}" in options, f.name


def test_flags_not_given_do_not_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\neval_generate: true\nsave_steps: 7\n")
    config = _config_from_cli([str(path)])
    assert config.eval_generate is True and config.save_steps == 7


@pytest.mark.parametrize(("argv", "expected"), [
    (["--resume"], True), (["--resume", "false"], False), (["--resume", "out/checkpoints/step-4"],
                                                            "out/checkpoints/step-4"), ([], False),
])
def test_resume_is_a_bool_or_a_path(argv, expected):
    assert _config_from_cli(["--model", "m", "--data", "d", *argv]).resume == expected


def test_resume_before_the_config_file_still_reads_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\nr: 4\n")
    config = _config_from_cli(["--resume", str(path)])
    assert config.resume is True and config.r == 4


def test_none_values_from_flags_and_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\nsave_steps: null\n")
    assert load_config(path).save_steps is None
    assert _config_from_cli(["--model", "m", "--data", "d", "--save-steps", "none"]).save_steps is None


def test_unknown_key_suggests_the_close_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="Did you mean 'learning_rate'"):
        load_config(path)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("batch_size", "four", "batch_size must be an integer"),
    ("learning_rate", [1], "learning_rate must be a number"),
    ("eval_generate", "maybe", "eval_generate must be true/false"),
    ("max_length", None, "max_length cannot be empty"),
])
def test_wrong_types_are_named(name, value, message):
    with pytest.raises(ConfigError, match=message):
        coerce(name, value)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be a finite number > 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm must be a finite number > 0"),  # would flip every gradient
    ({"learning_rate": float("nan")}, "learning_rate must be a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
    ({"lora_alpha": -16}, "lora_alpha must be a finite number > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
    ({"seed": -1}, "seed must be in"),
    ({"quantize": "3bit"}, "quantize must be one of"),
    ({"method": "bottleneck", "placement": "middle"}, "method 'bottleneck': placement must be one of"),
    ({"method": "p-tuning", "encoder_hidden_size": 0}, "encoder_hidden_size must be a positive integer"),
    ({"method": "lorra"}, "Unknown method 'lorra'"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"eval_split": 1.5}, "eval_split must be in"),
    ({"model": ""}, "model is required"),
])
def test_invalid_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"model": "m", "data": "d", **overrides})


def test_a_setting_the_method_ignores_warns():
    with pytest.warns(UserWarning, match="does not use r"):
        load_config(None, {"model": "m", "data": "d", "method": "ia3", "r": 4})
    with pytest.warns(UserWarning, match="does not use loraplus_lr_ratio"):
        load_config(None, {"model": "m", "data": "d", "method": "prefix", "loraplus_lr_ratio": 16})


def test_examples_load(tmp_path):
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    files = sorted(glob.glob(os.path.join(root, "*.yaml")))
    methods = {load_config(path).method for path in files}
    assert methods == set(METHODS)  # one example file per method


def test_paths_expand_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, {"model": "~/model", "data": "~/d.jsonl", "output_dir": "~/runs"})
    assert (config.model, config.data, config.output_dir) == (f"{tmp_path}/model", f"{tmp_path}/d.jsonl",
                                                               f"{tmp_path}/runs")


def test_an_unquoted_yaml_no_gets_a_hint(tmp_path):
    from deltatune.trainer.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\n")
    with pytest.raises(ConfigError, match="mixed_precision must be a string, got False .*put the value in quotes"):
        load_config(path)
