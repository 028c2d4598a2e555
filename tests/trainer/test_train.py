"""`deltatune train` end to end on a tiny model: every method, outputs, resume, NaN stop, checkpoint rotation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from deltatune import PeftModel
from deltatune.cli import main
from deltatune.trainer import TrainingStopped, load_config, train
from deltatune.trainer.checkpoints import list_checkpoints

from .conftest import adapter_tensors, addition_rows, assert_same_tensors, write_jsonl

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
SMALL = ["--max-steps", "3", "--batch-size", "4", "--max-length", "64", "--eval-data", "none", "--eval-split", "0.2",
         "--max-eval-samples", "4", "--max-new-tokens", "3", "--save-steps", "2", "--eval-steps", "2"]


def _train_cli(tiny_model, data, out, *extra, example="lora"):
    argv = ["train", os.path.join(EXAMPLES, f"{example}.yaml"), "--model", tiny_model, "--data", data,
            "--output-dir", str(out), *SMALL, *extra]
    return main(argv)


METHOD_FLAGS = {
    "lora": ["--r", "4"],
    "dora": ["--r", "4", "--loraplus-lr-ratio", "16"],
    "ia3": [],
    "prompt-tuning": ["--num-virtual-tokens", "4"],
    "prefix": ["--num-virtual-tokens", "4", "--prefix-projection", "--encoder-hidden-size", "16"],
    "p-tuning": ["--num-virtual-tokens", "4", "--encoder-hidden-size", "16"],
    "bottleneck": ["--reduction-factor", "8"],
}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_each_method_trains_from_its_example_file(method, tiny_model, train_file, tmp_path, capsys):
    assert _train_cli(tiny_model, train_file, tmp_path, *METHOD_FLAGS[method], example=method) == 0
    out = capsys.readouterr().out
    assert "Training summary" in out and "trainable params" in out and "exact_match" in out
    for name in ("metrics.jsonl", "loss_curve.png", "summary.json", "train_config.yaml"):
        assert os.path.isfile(tmp_path / name), name
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_model  # the name the user gave
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_before"]["eval_loss"] > 0 and "exact_match" in summary["eval_after"]
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["base_weights_bytes"] == summary["base_weights_full_precision_bytes"] > 0
    assert "(not quantized)" in out
    # The adapter loads back on the base model and changes nothing about the files' meaning.
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter))
    assert loaded.peft_config["default"].peft_type == config["peft_type"]


def test_full_fine_tuning_writes_a_plain_model(tiny_model, train_file, tmp_path):
    assert _train_cli(tiny_model, train_file, tmp_path, example="full") == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    AutoTokenizer.from_pretrained(tmp_path / "model")
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]


def test_classification_reports_accuracy(tiny_model, classification_file, tmp_path):
    assert _train_cli(tiny_model, classification_file, tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["eval_after"]["accuracy"] <= 1
    assert json.loads((tmp_path / "adapter" / "labels.json").read_text()) == ["neg", "pos"]
    checkpoint = list_checkpoints(str(tmp_path))[-1][1]  # `deltatune eval --adapter` a checkpoint reads it too
    assert json.loads(open(os.path.join(checkpoint, "labels.json")).read()) == ["neg", "pos"]


def _config(tiny_model, train_file, out, **changes):
    values = {"model": tiny_model, "data": train_file, "output_dir": str(out), "max_steps": 6, "batch_size": 4,
              "save_steps": 2, "save_total_limit": 2, "max_length": 64, "eval_split": 0.2, "learning_rate": 1e-2,
              "lora_dropout": 0.1, "max_eval_samples": 4}
    return load_config(None, {**values, **changes})


class Interrupt(Exception):
    pass


def _raise_at(step_number):
    def hook(step, model):
        if step == step_number:
            raise Interrupt

    return hook


RESUMED_METHODS = {
    "lora": {},
    # The adapter file holds the prompt table; resuming needs the encoder's own weights.
    "p-tuning": {"method": "p-tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix-projection": {"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True,
                          "encoder_hidden_size": 16},
}


@pytest.mark.parametrize("method", list(RESUMED_METHODS))
def test_resumed_run_ends_with_the_same_adapter(method, tiny_model, train_file, tmp_path):
    """Killed before step 5 (after checkpoint 4) and resumed: same adapter as a run never interrupted.

    Dropout is on, so this also checks that the random-number states are restored."""
    settings = RESUMED_METHODS[method]
    whole = train(_config(tiny_model, train_file, tmp_path / "whole", **settings))
    with pytest.raises(Interrupt):
        train(_config(tiny_model, train_file, tmp_path / "cut", **settings), step_hook=_raise_at(5))
    assert [step for step, _ in list_checkpoints(str(tmp_path / "cut"))] == [2, 4]
    resumed = train(_config(tiny_model, train_file, tmp_path / "cut", resume=True, **settings))
    # The resumed steps run on a reloaded model, which may round in other kernels: last bits, which Adam keeps
    # below 2e-7 here (measured with every weight one ulp off at the resume); lost dropout draws move 5e-3.
    assert_same_tensors(adapter_tensors(whole.saved_to), adapter_tensors(resumed.saved_to), rtol=1.3e-6, atol=1e-6)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"train"' in line] == [1, 2, 3, 4, 5, 6]
    # Each run evaluated its own freshly loaded model: last bits only.
    torch.testing.assert_close(resumed.summary["eval_before"], whole.summary["eval_before"], rtol=1.3e-6, atol=1e-6)


def test_resume_from_a_named_checkpoint_and_changed_settings(tiny_model, train_file, tmp_path):
    train(_config(tiny_model, train_file, tmp_path, max_steps=4))
    step2 = str(tmp_path / "checkpoints" / "step-4")
    with pytest.raises(Exception, match="settings changed"):
        train(_config(tiny_model, train_file, tmp_path, resume=step2, batch_size=2))
    # The restored optimizer and scheduler would silently keep the old learning rate.
    with pytest.raises(Exception, match=r"settings changed \(learning_rate: 0.01 -> 0.001\)"):
        train(_config(tiny_model, train_file, tmp_path, resume=step2, max_steps=4, learning_rate=1e-3))
    # Told as a changed setting, not as adapter keys that do not fit.
    with pytest.raises(Exception, match=r"settings changed \(method: lora -> ia3"):
        train(_config(tiny_model, train_file, tmp_path, resume=step2, max_steps=4, method="ia3", lora_dropout=0.05))
    with pytest.raises(Exception, match="holds checkpoints of an earlier run"):
        train(_config(tiny_model, train_file, tmp_path))
    # Same number of rows, other rows: the continuation would train on data the first steps never saw.
    other = write_jsonl(tmp_path.parent / "other.jsonl", [{**row, "completion": row["completion"] + "0"}
                                                          for row in addition_rows()])
    with pytest.raises(Exception, match=r"settings changed \(data_hash: \w+ -> \w+; .*other files or rows"):
        train(_config(tiny_model, other, tmp_path, resume=step2, max_steps=4))


def test_a_new_run_does_not_replace_a_finished_one_without_overwrite(tiny_model, train_file, tmp_path):
    train(_config(tiny_model, train_file, tmp_path, max_steps=2, save_steps=10))
    assert not list_checkpoints(str(tmp_path)) and (tmp_path / "adapter").is_dir()
    with pytest.raises(Exception, match=r"holds the results of an earlier run \(adapter, summary.json\)"):
        train(_config(tiny_model, train_file, tmp_path, max_steps=2, save_steps=10))
    train(_config(tiny_model, train_file, tmp_path, max_steps=2, save_steps=10, overwrite=True))


def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tiny_model, train_file, tmp_path):
    def poison(step, model):
        if step == 4:
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad:
                        param.fill_(float("nan"))

    with pytest.raises(TrainingStopped, match=r"at step 4.*checkpoints/step-2"):
        train(_config(tiny_model, train_file, tmp_path), step_hook=poison)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2]
    assert not (tmp_path / "adapter").exists()


def test_cli_reports_a_stopped_run(tiny_model, train_file, tmp_path, capsys, monkeypatch):
    import deltatune.trainer.loop as loop

    original = loop.forward_loss

    def infinite(model, batch):
        total, count, logits = original(model, batch)
        return total * float("inf"), count, logits

    monkeypatch.setattr(loop, "forward_loss", infinite)
    assert _train_cli(tiny_model, train_file, tmp_path) == 1
    assert "training loss is" in capsys.readouterr().err


def test_checkpoint_rotation_keeps_the_newest(tiny_model, train_file, tmp_path):
    train(_config(tiny_model, train_file, tmp_path, max_steps=5, save_steps=1, save_total_limit=2))
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [4, 5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-4", "step-5"]  # no temporary leftovers
    files = set(os.listdir(tmp_path / "checkpoints" / "step-5"))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng.pt",
            "trainer_state.json"} <= files
    state = json.loads((tmp_path / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert state["step"] == 5


def test_gradient_accumulation_equals_the_larger_batch(tiny_model, train_file, tmp_path):
    one = train(_config(tiny_model, train_file, tmp_path / "a", lora_dropout=0.0, batch_size=4))
    two = train(_config(tiny_model, train_file, tmp_path / "b", lora_dropout=0.0, batch_size=2,
                        gradient_accumulation_steps=2))
    assert_same_tensors(adapter_tensors(one.saved_to), adapter_tensors(two.saved_to), rtol=0, atol=1e-5)


def test_fp16_without_a_gpu_is_refused(tiny_model, train_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _train_cli(tiny_model, train_file, tmp_path, "--mixed-precision", "fp16") == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_the_trained_lora_adapter_loads_in_peft(tiny_model, train_file, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    result = train(_config(tiny_model, train_file, tmp_path, max_steps=2))
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.saved_to).eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.saved_to).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("quantize", ["8bit"])  # 4-bit needs wider layers than this tiny model (tests/quantized)
def test_qlora_run_trains_an_adapter_that_loads_on_the_full_precision_base(quantize, tiny_model, train_file, tmp_path,
                                                                          capsys):
    from transformers import AutoModelForCausalLM

    assert _train_cli(tiny_model, train_file, tmp_path, "--quantize", quantize, "--r", "4") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # Only the linear layers are quantized (embeddings, norms and the head stay float32): well under 4x smaller.
    assert 1.2 < summary["base_weights_full_precision_bytes"] / summary["base_weights_bytes"] < 4
    assert f"quantized {quantize}" in capsys.readouterr().out
    trained = adapter_tensors(tmp_path / "adapter")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in trained.items())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dora_run_saves_peft_magnitudes_and_loraplus_speeds_up_b(tiny_model, train_file, tmp_path):
    from deltatune.trainer.loop import make_optimizer

    assert _train_cli(tiny_model, train_file, tmp_path, "--r", "4", example="dora") == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert any("lora_magnitude_vector" in key for key in adapter_tensors(tmp_path / "adapter"))

    model = PeftModel.from_pretrained(_tiny_base(tiny_model), tmp_path / "adapter", is_trainable=True)
    run_config = load_config(os.path.join(EXAMPLES, "dora.yaml"), {"model": tiny_model, "data": train_file,
                                                                   "loraplus_lr_ratio": 16.0})
    optimizer = make_optimizer(model, run_config)
    lr = run_config.learning_rate
    b_ids = {id(p) for n, p in model.named_parameters() if ".lora_B." in n}
    for group in optimizer.param_groups:
        if any(id(p) in b_ids for p in group["params"]):
            assert group["lr"] == pytest.approx(16 * lr)
        elif group["params"] and group["lr"] != 1e-6:  # A factors (1e-6: LoRA embedding factors, none here)
            assert group["lr"] == pytest.approx(lr)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])


def _tiny_base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_each_process_draws_its_own_dropout_masks():
    from types import SimpleNamespace

    from deltatune.trainer.loop import seed_ranks

    draws = []
    for rank in (0, 1):
        torch.manual_seed(123)
        seed_ranks(7, SimpleNamespace(num_processes=2, process_index=rank))
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    seed_ranks(7, SimpleNamespace(num_processes=1, process_index=0))  # one process: its stream is left alone
    assert torch.equal(torch.rand(4), expected)


def test_resuming_a_finished_run_logs_its_final_evaluation_once(tiny_model, train_file, tmp_path):
    first = train(_config(tiny_model, train_file, tmp_path, max_steps=4, save_steps=2))
    again = train(_config(tiny_model, train_file, tmp_path, max_steps=4, save_steps=2, resume=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 4]
    assert again.summary["eval_after"] == first.summary["eval_after"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") == "default",
                    reason="torch 2.13's inductor emits vector code that its headers leave undeclared when ATen is "
                           "limited to its portable kernels (a C++ compile error), whatever the model")
def test_compiled_run_trains_the_same_adapter(tiny_model, train_file, tmp_path):
    """--compile (torch.compile of the training forward) gives the eager run's adapter, to float rounding."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        flags = ["--lora-dropout", "0", "--save-steps", "none", "--eval-steps", "none"]
        assert _train_cli(tiny_model, train_file, out, *flags, *(["--compile"] if compiled else [])) == 0
        runs[compiled] = adapter_tensors(out / "adapter")
    assert_same_tensors(runs[True], runs[False], rtol=1e-4, atol=1e-5)
