"""Configs: peft's JSON format both ways, forward compatibility, and refusing what would change the model."""

from __future__ import annotations

import json
import warnings

import peft
import pytest

import deltatune
from deltatune.config import config_from_dict


def write_config(path, **changes) -> None:
    data = deltatune.LoraConfig(target_modules=["q_proj"]).to_dict()
    data.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(data))


def test_json_round_trip(tmp_path):
    config = deltatune.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["v_proj", "q_proj"], rank_pattern={"q": 2},
        alpha_pattern={"v": 3}, use_rslora=True, modules_to_save=["lm_head"], lora_dropout=0.1, bias="lora_only",
    )
    config.save_pretrained(tmp_path)
    loaded = deltatune.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is deltatune.LoraConfig
    assert loaded == config
    assert config_from_dict(json.loads(config.to_json_string())) == config
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["use_dora"] is False and data["task_type"] == "CAUSAL_LM"


def test_task_type_enum_is_stored_as_its_string():
    config = deltatune.LoraConfig(task_type=deltatune.TaskType.SEQ_CLS)
    assert json.loads(config.to_json_string())["task_type"] == "SEQ_CLS"


def test_peft_written_config_loads_without_warnings(tmp_path):
    peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], use_rslora=True).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = deltatune.PeftConfig.from_pretrained(tmp_path)
    assert (config.r, config.use_rslora, config.target_modules) == (4, True, ["q_proj"])


def test_deltatune_written_config_loads_in_peft(tmp_path):
    deltatune.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"], lora_alpha=2).save_pretrained(tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert (config.peft_type, config.r, config.lora_alpha, set(config.target_modules)) == ("LORA", 4, 2, {"query"})


def test_unknown_keys_warn_with_their_names(tmp_path):
    write_config(tmp_path, future_option=1, another_new_field="x")
    with pytest.warns(UserWarning, match=r"\['another_new_field', 'future_option'\]"):
        config = deltatune.PeftConfig.from_pretrained(tmp_path)
    assert config.target_modules == ["q_proj"]


@pytest.mark.parametrize(("key", "value"), [("lora_bias", True), ("layer_replication", [[0, 1]])])
def test_peft_only_option_is_refused(tmp_path, key, value):
    write_config(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=f"does not support.*{key}.*load it with peft"):
        deltatune.PeftConfig.from_pretrained(tmp_path)


def test_unknown_peft_type_is_refused(tmp_path):
    write_config(tmp_path, peft_type="MYSTERY")
    with pytest.raises(ValueError, match="Unknown peft_type 'MYSTERY'.*LORA"):
        deltatune.PeftConfig.from_pretrained(tmp_path)


def test_missing_and_corrupted_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        deltatune.PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        deltatune.PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "positive integer, got r=0"),
        ({"r": -2}, "positive integer, got r=-2"),
        ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\] must be a positive integer"),
        ({"task_type": "TRANSLATION"}, "Unknown task_type 'TRANSLATION'.*CAUSAL_LM"),
        ({"bias": "some"}, "bias must be one of"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"init_lora_weights": "corda"}, "init_lora_weights must be one of"),
    ],
)
def test_bad_values_are_refused_with_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        deltatune.LoraConfig(**kwargs)


def test_bad_value_in_a_file_is_refused(tmp_path):
    write_config(tmp_path, r=0)
    with pytest.raises(ValueError, match="r=0"):
        deltatune.PeftConfig.from_pretrained(tmp_path)


def test_target_module_sets_become_sorted_lists():
    config = deltatune.LoraConfig(target_modules={"v", "q", "k"}, exclude_modules=("b", "a"))
    assert config.target_modules == ["k", "q", "v"] and config.exclude_modules == ["a", "b"]


def test_config_from_a_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    """PeftConfig.from_pretrained("user/repo"), the usual first line before loading a base model by its name."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--user--repo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    deltatune.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], r=4).save_pretrained(
        repo / "snapshots" / "abc123")
    config = deltatune.PeftConfig.from_pretrained("user/repo", revision="main")
    assert isinstance(config, deltatune.LoraConfig) and config.r == 4
