"""Adapter names become folder names: every entry point refuses one that is not a plain folder name."""

from __future__ import annotations

import os

import pytest
from conftest import tiny_llama

import deltatune
from deltatune import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model

BAD = ["/some/where", "a/b", "a\\b", "..", "a.b", "nul\0byte", "x" * 256, "", "é" * 128]


def lora() -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")


@pytest.mark.parametrize("name", BAD)
def test_every_entry_point_refuses_a_name_that_is_not_a_folder_name(name, tmp_path):
    saved = tmp_path / "saved"
    get_peft_model(tiny_llama(), lora()).save_pretrained(saved)
    match = "Adapter names become folder names"
    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny_llama(), lora(), adapter_name=name)
    model = get_peft_model(tiny_llama(), lora())
    with pytest.raises(ValueError, match=match):
        model.add_adapter(name, lora())
    with pytest.raises(ValueError, match=match):
        model.add_adapter(name, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match=match):
        model.load_adapter(saved, adapter_name=name)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny_llama(), saved, adapter_name=name)
    with pytest.raises(ValueError, match=match):
        deltatune.inject_adapter_in_model(lora(), tiny_llama(), adapter_name=name)
    assert sorted(model.peft_config) == ["default"]  # nothing half-added


def test_nothing_is_written_outside_the_save_folder(tmp_path):
    """The report: add_adapter("/some/where") then save_pretrained(out) wrote under /some/where."""
    model = get_peft_model(tiny_llama(), lora())
    outside = tmp_path / "outside"
    with pytest.raises(ValueError, match="path separator"):
        model.add_adapter(str(outside), lora())
    model.save_pretrained(tmp_path / "out")
    assert not outside.exists()


def test_a_subfolder_that_is_no_adapter_name_is_refused_when_loading_all_adapters(tmp_path):
    model = get_peft_model(tiny_llama(), lora())
    model.add_adapter("other", lora())
    model.save_pretrained(tmp_path)
    os.rename(tmp_path / "other", tmp_path / "other.v2")
    with pytest.raises(ValueError, match="holds a '.'"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, all_adapters=True)


def test_plain_names_are_accepted(tmp_path):
    model = get_peft_model(tiny_llama(), lora(), adapter_name="task-1_v2")
    model.add_adapter("X" * 255, lora())
    model.save_pretrained(tmp_path)
    assert (tmp_path / ("X" * 255) / "adapter_config.json").is_file()
