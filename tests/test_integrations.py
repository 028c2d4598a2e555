"""transformers.Trainer with a deltatune PeftModel: checkpoints hold the adapter in peft's layout, and resume."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from trainer.conftest import fresh_accelerate_state  # noqa: F401  (autouse fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from deltatune import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from deltatune.integrations import PeftSaveCallback


def _dataset(n: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 128, (6,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step
        return control


def _trainer(model, out, max_steps: int, *callbacks) -> Trainer:
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_total_limit=None,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[PeftSaveCallback(), *callbacks])


def _lora_model():
    return get_peft_model(tiny_llama(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))


def test_trainer_checkpoints_hold_the_adapter_not_the_model(tmp_path):
    model = _lora_model()
    _trainer(model, tmp_path, max_steps=2).train()
    folder = tmp_path / "checkpoint-2"
    files = set(os.listdir(folder))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    saved = load_file(folder / "adapter_model.safetensors")
    assert all("lora_" in key for key in saved) and len(saved) == 8  # 2 layers x (q, v) x (A, B)
    # What Trainer reads back on resume: the trainable tensors only, not the base model.
    assert sorted(load_file(folder / "model.safetensors")) == sorted(
        name for name, p in model.named_parameters() if p.requires_grad)
    assert "pytorch_model.bin" not in files
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(folder))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6)


def test_trainer_resumes_from_an_adapter_checkpoint(tmp_path):
    whole = _lora_model()
    _trainer(whole, tmp_path / "whole", max_steps=3).train()
    _trainer(_lora_model(), tmp_path / "cut", 3, StopAt(2)).train()  # interrupted after step 2
    assert not (tmp_path / "cut" / "checkpoint-3").exists()
    resumed = _lora_model()
    _trainer(resumed, tmp_path / "cut", 3).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    a = load_file(tmp_path / "whole" / "checkpoint-3" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoint-3" / "adapter_model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_trl_sft_trainer_with_the_base_model_and_the_callback(tmp_path):
    pytest.importorskip("trl")
    import datasets
    from trainer.conftest import build_model_folder
    from trl import SFTConfig, SFTTrainer

    folder = build_model_folder(str(tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), config)
    rows = datasets.Dataset.from_list([{"prompt": f"What is {i} plus 1?", "completion": str(i + 1)} for i in range(8)])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, disable_tqdm=True, max_length=64, learning_rate=1e-2)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    SFTTrainer(model=model.get_base_model(), args=args, train_dataset=rows, processing_class=tokenizer,
               callbacks=[PeftSaveCallback(model)]).train()
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "adapter_model.safetensors")
    assert saved.keys() == before.keys()
    assert any(not torch.equal(saved[k], before[k]) for k in saved)  # trained
    assert load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors").keys() == {
        name for name, p in model.get_base_model().named_parameters() if p.requires_grad}


def test_on_save_removes_a_sharded_full_model_too(tmp_path):
    """Trainer may have written the whole model in shards (a large model, or a small max_shard_size)."""
    from types import SimpleNamespace

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    full = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "pytorch_model.bin"]
    for name in [*full, "optimizer.pt", "trainer_state.json"]:
        (folder / name).write_text("x")
    model = _lora_model()
    args = SimpleNamespace(should_save=True, output_dir=str(tmp_path))
    PeftSaveCallback().on_save(args, SimpleNamespace(global_step=3), None, model=model)
    files = set(os.listdir(folder))
    assert not files & set(full)
    assert {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors", "model.safetensors"} <= files


def test_trainer_keeps_the_dataset_columns_the_task_model_takes(tmp_path):
    """Trainer drops dataset columns that forward's signature does not name (remove_unused_columns, on by default):
    the task classes name their inputs, as peft's do."""
    import inspect

    from datasets import Dataset

    rows = [{**{k: v.tolist() for k, v in row.items()}, "text": "unused"} for row in _dataset()]
    model = _lora_model()
    assert list(inspect.signature(model.forward).parameters)[:4] == ["input_ids", "attention_mask", "inputs_embeds",
                                                                      "labels"]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows)).train()
