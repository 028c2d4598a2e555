"""PeftModel: merging, disabling, several adapters, tied modules_to_save, modes, dtypes, checkpointing."""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, logits, lora_kwargs, max_diff, perturb_trainable, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import deltatune
from deltatune.layers import AdapterLayer
from deltatune.modules_to_save import ModulesToSaveWrapper

TOL = 1e-5


def peft_model(arch: str, seed: int = 0, **overrides) -> deltatune.PeftModel:
    model = deltatune.get_peft_model(ARCHS[arch][0](), deltatune.LoraConfig(**lora_kwargs(arch, **overrides)))
    perturb_trainable(model, seed)
    return model.eval()


def base_logits(arch: str) -> torch.Tensor:
    return logits(ARCHS[arch][0](), inputs_for(arch))


def trainable_names(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("task_type", "cls"),
    [("CAUSAL_LM", deltatune.PeftModelForCausalLM), (None, deltatune.PeftModel)],
)
def test_get_peft_model_picks_the_task_class(task_type, cls):
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(task_type=task_type))
    assert type(model) is cls
    assert model.get_base_model() is model.base_model.model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_unmerge_and_merge_and_unload_keep_outputs(arch):
    model = peft_model(arch)
    inputs = inputs_for(arch)
    expected = logits(model, inputs)
    assert max_diff(expected, base_logits(arch)) > 1e-3
    model.merge_adapter()
    assert all(layer.merged for _, layer in deltatune.layers.adapter_layers(model))
    assert max_diff(logits(model, inputs), expected) < TOL
    model.unmerge_adapter()
    assert max_diff(logits(model, inputs), expected) < TOL
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer | ModulesToSaveWrapper) for m in merged.modules())
    assert type(merged) is type(ARCHS[arch][0]())
    assert max_diff(logits(merged, inputs), expected) < TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_unload_gives_back_the_exact_base_model(arch):
    model = peft_model(arch)
    base = model.unload()
    assert not any(isinstance(m, AdapterLayer | ModulesToSaveWrapper) for m in base.modules())
    # Its tensors are the base's, bit for bit; the logits are compared with a separately built model: last bits only.
    torch.testing.assert_close(logits(base, inputs_for(arch)), base_logits(arch), rtol=1.3e-6, atol=1e-6)
    fresh = ARCHS[arch][0]().state_dict()
    assert sorted(base.state_dict()) == sorted(fresh)
    assert all(torch.equal(value, fresh[key]) for key, value in base.state_dict().items())


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_disable_adapter_runs_the_base_model(arch, merged):
    model = peft_model(arch)
    inputs = inputs_for(arch)
    expected = logits(model, inputs)
    if merged:
        model.merge_adapter()
    with model.disable_adapter():
        disabled = logits(model, inputs)
    assert max_diff(disabled, base_logits(arch)) < TOL
    if not merged:  # the base layers alone; base_logits comes from a separately built model: last bits only
        torch.testing.assert_close(disabled, base_logits(arch), rtol=1.3e-6, atol=1e-6)
    assert max_diff(logits(model, inputs), expected) < TOL  # back on (and merged again) afterwards
    assert all(layer.merged == merged for _, layer in deltatune.layers.adapter_layers(model))


def two_adapter_llama() -> deltatune.PeftModel:
    model = peft_model("llama")
    model.add_adapter("other", deltatune.LoraConfig(**lora_kwargs("llama", r=2, target_modules=["k_proj"])))
    model.set_adapter("other")
    perturb_trainable(model, seed=7)
    model.set_adapter("default")
    return model


def test_two_adapters_switch_without_reloading_the_base():
    model = two_adapter_llama()
    inputs = inputs_for("llama")
    base_ids = {id(p) for n, p in model.named_parameters() if "lora_" not in n}
    default = logits(model, inputs)
    assert all(".default." in n for n in trainable_names(model))
    model.set_adapter("other")
    other = logits(model, inputs)
    assert max_diff(default, other) > 1e-3
    assert trainable_names(model) and all(".other." in n and "k_proj" in n for n in trainable_names(model))
    assert {id(p) for n, p in model.named_parameters() if "lora_" not in n} == base_ids
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), default)
    assert model.active_adapters == ["default"]


def test_an_adapter_added_after_deleting_the_last_one_is_active():
    model = peft_model("llama")
    model.delete_adapter("default")
    model.add_adapter("new", deltatune.LoraConfig(**lora_kwargs("llama")))
    assert model.active_adapters == ["new"]
    assert any(p.requires_grad for n, p in model.named_parameters() if ".new." in n)
    perturb_trainable(model)
    inputs = inputs_for("llama")
    with model.disable_adapter():
        base = logits(model, inputs)
    assert max_diff(logits(model, inputs), base) > 1e-4


def test_delete_adapter_removes_its_modules_and_keeps_the_other():
    model = two_adapter_llama()
    inputs = inputs_for("llama")
    model.set_adapter("other")
    other = logits(model, inputs)
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"] and model.active_adapter == "other"
    assert not any(".default." in k for k in model.state_dict())
    assert torch.equal(logits(model, inputs), other)
    # q_proj / v_proj only carried "default": they are plain Linear layers again.
    attn = model.get_base_model().model.layers[0].self_attn
    assert type(attn.q_proj) is torch.nn.Linear and isinstance(attn.k_proj, AdapterLayer)
    with pytest.raises(ValueError, match="No adapter named 'default'.*other"):
        model.set_adapter("default")


def test_save_and_load_both_adapters(tmp_path):
    model = two_adapter_llama()
    inputs = inputs_for("llama")
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["target_modules"] == ["k_proj"]

    everything = deltatune.PeftModel.from_pretrained(ARCHS["llama"][0](), tmp_path, all_adapters=True)
    one_by_one = deltatune.PeftModel.from_pretrained(ARCHS["llama"][0](), tmp_path)
    assert list(one_by_one.peft_config) == ["default"]
    one_by_one.load_adapter(tmp_path / "other", "other")
    for loaded in (everything, one_by_one):
        assert sorted(loaded.peft_config) == ["default", "other"]
        for name in ("default", "other"):
            loaded.set_adapter(name)
            assert max_diff(logits(loaded, inputs), expected[name]) < TOL, name


def test_selected_adapters_saves_only_those(tmp_path):
    model = two_adapter_llama()
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()


def test_adapter_name_errors_are_clear():
    model = peft_model("llama")
    with pytest.raises(ValueError, match="'default' already exists.*delete_adapter"):
        model.add_adapter("default", deltatune.LoraConfig(**lora_kwargs("llama")))
    with pytest.raises(ValueError, match="No adapter named 'missing'.*'default'"):
        model.set_adapter("missing")
    with pytest.raises(ValueError, match="No adapter named 'missing'"):
        model.delete_adapter("missing")


def test_add_adapter_does_not_change_the_active_one():
    model = peft_model("llama")
    inputs = inputs_for("llama")
    before = logits(model, inputs)
    model.add_adapter("other", deltatune.LoraConfig(**lora_kwargs("llama")))
    assert model.active_adapter == "default"
    assert torch.equal(logits(model, inputs), before)
    assert all(".default." in n for n in trainable_names(model))


def two_adapter_model(lib):
    model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            modules_to_save=["lm_head"], bias="lora_only"))
    model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                              modules_to_save=["lm_head"]))
    return model


@pytest.mark.parametrize("step", ["switch", "switch_frozen", "unfreeze_other", "freeze_both"])
def test_set_adapter_inference_mode_and_set_requires_grad_train_what_peft_trains(step):
    names = []
    for lib in (deltatune, peft):
        model = two_adapter_model(lib)
        if step == "switch":
            model.set_adapter("other")
        elif step == "switch_frozen":
            model.set_adapter("other", inference_mode=True)
        elif step == "unfreeze_other":  # both adapters train (bias, magnitude and lm_head copies included)
            model.set_requires_grad("other")
        else:
            model.set_requires_grad(["other", "default"], requires_grad=False)
        names.append(trainable_names(model))
    assert names[0] == names[1]
    assert bool(names[0]) == (step in ("switch", "unfreeze_other"))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
@pytest.mark.parametrize("step", [("default", False), ("other", True), ("other", False)])
def test_set_requires_grad_leaves_trained_biases_alone_as_peft(bias, step):
    """Biases trained under a bias option are the base model's (GPT-2 has them): only the adapter's own tensors
    change, as in peft."""
    names = []
    for lib in (deltatune, peft):
        model = lib.get_peft_model(tiny_gpt2(), lib.LoraConfig(r=4, target_modules=["c_attn"], bias=bias,
                                                               fan_in_fan_out=True))
        model.add_adapter("other", lib.LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
        model.set_requires_grad(*step)
        names.append(trainable_names(model))
    assert names[0] == names[1]
    assert any(name.endswith(".bias") for name in names[0])


def test_set_requires_grad_names_unknown_adapters_and_changes_nothing():
    model = two_adapter_model(deltatune)
    before = trainable_names(model)
    with pytest.raises(ValueError, match=r"No adapter named 'missing'. Loaded adapters: \['default', 'other'\]"):
        model.set_requires_grad(["other", "missing"])
    assert trainable_names(model) == before


def sgd_step(model, inputs, lr: float = 0.5) -> None:
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= lr * param.grad
    model.zero_grad()
    model.eval()


def test_tied_lm_head_copy_stays_tied_through_train_save_load_merge(tmp_path):
    inputs = inputs_for("llama")
    config = deltatune.LoraConfig(**lora_kwargs("llama", modules_to_save=["lm_head"], ensure_weight_tying=True))
    model = deltatune.get_peft_model(tiny_llama(tie=True), config)
    inner = model.get_base_model()
    embed, head = inner.get_input_embeddings(), inner.lm_head
    assert isinstance(embed, ModulesToSaveWrapper) and isinstance(head, ModulesToSaveWrapper)
    assert embed.weight is head.weight  # the copies share one Parameter
    original = head.original_module.weight.detach().clone()

    sgd_step(model, inputs)
    trained = head.weight.detach().clone()
    assert embed.weight is head.weight
    assert not torch.equal(trained, original)
    assert torch.equal(head.original_module.weight, original)  # the base stays frozen
    expected = logits(model, inputs)

    model.save_pretrained(tmp_path)
    saved = deltatune.checkpoint.load_file(tmp_path / "adapter_model.safetensors")
    # As peft: the tied partner is written under its own key too.
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], saved["base_model.model.lm_head.weight"])
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path).eval()
    loaded_inner = loaded.get_base_model()
    assert loaded_inner.get_input_embeddings().weight is loaded_inner.lm_head.weight
    assert torch.equal(loaded_inner.lm_head.weight, trained)
    assert max_diff(logits(loaded, inputs), expected) < TOL

    merged = loaded.merge_and_unload()
    assert merged.get_input_embeddings().weight is merged.lm_head.weight
    assert torch.equal(merged.lm_head.weight, trained)
    assert max_diff(logits(merged, inputs), expected) < TOL


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_module_to_save_files_move_both_ways_with_peft(tmp_path, target):
    inputs = inputs_for("llama")
    for source, dest in ((deltatune, peft), (peft, deltatune)):
        config = source.LoraConfig(**lora_kwargs("llama", modules_to_save=[target], ensure_weight_tying=True))
        model = source.get_peft_model(tiny_llama(tie=True), config)
        perturb_trainable(model)
        model.eval()
        model.save_pretrained(tmp_path / source.__name__)
        loaded = dest.PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path / source.__name__).eval()
        assert max_diff(logits(loaded, inputs), logits(model, inputs)) < TOL, (source.__name__, dest.__name__)
    ours, theirs = (load_file(tmp_path / lib.__name__ / "adapter_model.safetensors") for lib in (deltatune, peft))
    assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_module_to_save_is_untied_by_default_as_in_peft(tmp_path, method, target):
    """Without ensure_weight_tying the copy trains apart from its tied partner: the same file gives the same logits
    in both libraries, both ways."""
    inputs = inputs_for("llama")

    def config(lib):
        if method == "lora":
            return lib.LoraConfig(**lora_kwargs("llama", modules_to_save=[target]))
        return lib.IA3Config(task_type="CAUSAL_LM", modules_to_save=[target])

    for source, dest in ((deltatune, peft), (peft, deltatune)):
        with pytest.warns(UserWarning):  # both libraries say that the tie is broken
            model = source.get_peft_model(tiny_llama(tie=True), config(source))
        perturb_trainable(model)
        model.eval()
        model.save_pretrained(tmp_path / source.__name__)
        loaded = dest.PeftModel.from_pretrained(tiny_llama(tie=True), tmp_path / source.__name__).eval()
        assert max_diff(logits(loaded, inputs), logits(model, inputs)) < TOL, (source.__name__, dest.__name__)


def test_train_and_eval_reach_the_base_model():
    model = peft_model("bert", lora_dropout=0.1)
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype_moves_base_and_adapter(dtype):
    model = peft_model("llama")
    inputs = inputs_for("llama")
    expected = logits(model, inputs)
    model.to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = logits(model, inputs)
    assert out.dtype == dtype
    assert max_diff(out, expected) < (1e-5 if dtype == torch.float64 else 0.1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_still_gives_lora_gradients(arch):
    inputs = inputs_for(arch)
    grads = []
    for checkpointing in (False, True):
        model = peft_model(arch)
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.get_base_model().is_gradient_checkpointing
        model.train()
        for module in model.modules():  # no dropout: both runs must compute the same thing
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert sorted(plain) == sorted(checkpointed)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, f"no gradient for {name} with gradient checkpointing"
        assert max_diff(checkpointed[name], grad) < TOL, name


def test_trainable_parameter_count():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (4 * 32 + 32 * 4)  # two layers, A (4x32) and B (32x4)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable


def test_config_object_of_the_caller_is_not_modified():
    config = deltatune.LoraConfig(task_type="SEQ_CLS", target_modules="all-linear")
    before = copy.deepcopy(config.to_dict())
    model = deltatune.get_peft_model(ARCHS["bert"][0](), config)
    model.add_adapter("other", config)
    assert config.to_dict() == before
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert isinstance(model.peft_config["default"].target_modules, list)


def test_set_adapter_while_merged_unmerges_first():
    model = two_adapter_llama()
    inputs = inputs_for("llama")
    model.set_adapter("other")
    other = logits(model, inputs)
    model.set_adapter("default")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        model.set_adapter("other")
    assert max_diff(logits(model, inputs), other) < TOL


def test_deleting_a_merged_adapter_is_refused_until_unmerged():
    model = two_adapter_llama()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge it first"):
        model.delete_adapter("default")
    assert sorted(model.peft_config) == ["default", "other"]
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_adapter_leaves_every_model_unchanged(arch, init):
    config = deltatune.LoraConfig(**lora_kwargs(arch, init_lora_weights=init))
    model = deltatune.get_peft_model(ARCHS[arch][0](), config).eval()
    # B = 0 adds exact zeros, but inside an addmm (other kernels than the base's), and base_logits comes from a
    # separately built model: last bits only, far below any adapter's effect.
    torch.testing.assert_close(logits(model, inputs_for(arch)), base_logits(arch), rtol=1.3e-6, atol=1e-6)


def test_adapter_name_clashing_with_a_module_attribute_is_refused():
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=2))
    with pytest.raises(ValueError, match="clashes with a torch.nn.Module attribute"):
        model.add_adapter("double", deltatune.LoraConfig(r=2))


def test_from_pretrained_and_load_adapter_read_the_subfolder_asked_for(tmp_path):
    first, second = peft_model("llama", seed=1), peft_model("llama", seed=2)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path / "other")
    inputs = inputs_for("llama")
    loaded = deltatune.PeftModel.from_pretrained(ARCHS["llama"][0](), tmp_path, subfolder="other").eval()
    assert max_diff(logits(loaded, inputs), logits(second, inputs)) < TOL
    loaded.load_adapter(tmp_path, "top")
    loaded.set_adapter("top")
    assert max_diff(logits(loaded, inputs), logits(first, inputs)) < TOL
    with pytest.raises(deltatune.AdapterLoadError, match="no subfolder 'missing'"):
        loaded.load_adapter(tmp_path, "x", subfolder="missing")


def test_get_peft_model_names_the_wrapped_model_and_revision_as_peft(tmp_path):
    ARCHS["llama"][0]().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    config = deltatune.LoraConfig(**lora_kwargs("llama"), base_model_name_or_path="some/other-model")
    with pytest.warns(UserWarning, match="replaced by the wrapped model"):
        model = deltatune.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config,
                                         revision="v2")
    saved = model.peft_config["default"]
    assert (saved.base_model_name_or_path, saved.revision) == (str(tmp_path / "base"), "v2")
    assert config.base_model_name_or_path == "some/other-model"  # the caller's config is left alone


@pytest.mark.parametrize(("config", "library"), [
    (deltatune.LoraConfig(target_modules=["c_attn"]), "peft"),
    (deltatune.BitFitConfig(), "deltatune"),  # a method peft does not have
])
def test_model_card_names_the_libraries_that_read_the_adapter(config, library, tmp_path):
    deltatune.get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert f"library_name: {library}\n" in card
    assert ("or peft" in card) == (library == "peft")


def test_adapters_loaded_for_inference_run_without_dropout(tmp_path):
    config = deltatune.LoraConfig(**lora_kwargs("llama", lora_dropout=0.5))
    model = deltatune.get_peft_model(tiny_llama(), config)
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    inputs = inputs_for("llama")
    loaded = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not loaded.training
    assert torch.equal(logits(loaded, inputs), logits(loaded, inputs))
    trainable = deltatune.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.training
    # A model put in eval mode by its user keeps every layer there when another adapter arrives.
    base = tiny_llama().eval()
    model = deltatune.get_peft_model(base, config)
    model.eval()
    model.load_adapter(tmp_path, "other", is_trainable=True)
    model.set_adapter("other")
    assert not any(m.training for m in model.get_base_model().modules())
    assert torch.equal(logits(model, inputs), logits(model, inputs))


def test_peft_names_for_switching_adapters_off_and_on():
    model = peft_model("llama")
    inputs = inputs_for("llama")
    with_adapter = logits(model, inputs)
    with model.disable_adapter():
        bare = logits(model, inputs)
    assert max_diff(with_adapter, bare) > 1e-3
    model.disable_adapter_layers()
    assert torch.equal(logits(model, inputs), bare)
    model.enable_adapter_layers()
    assert torch.equal(logits(model, inputs), with_adapter)
    assert model.active_peft_config is model.peft_config["default"]
    model.merge_adapter()
    with pytest.warns(UserWarning, match="Unmerging the merged adapters"):
        model.disable_adapter_layers()
    assert max_diff(logits(model, inputs), bare) < TOL


def test_peft_enum_names_and_mixed_precision_cast():
    assert deltatune.PromptTuningInit.TEXT == "TEXT" and deltatune.PeftType.LORA == "LORA"
    from deltatune.registry import known_methods

    assert {t.value for t in deltatune.PeftType} == set(known_methods())
    config = deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                          prompt_tuning_init=deltatune.PromptTuningInit.RANDOM)
    assert json.loads(config.to_json_string())["prompt_tuning_init"] == "RANDOM"
    for lib in (deltatune, peft):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(**lora_kwargs("llama")))
        lib.cast_mixed_precision_params(model, torch.bfloat16)
        dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
        assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}, lib.__name__


def test_push_to_hub_uploads_the_adapter_not_the_base_model(monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            calls["files"] = sorted(os.listdir(folder_path))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = peft_model("llama")
    assert model.push_to_hub("me/adapter", private=True, token="t") == "commit"
    assert calls["repo"] == ("me/adapter", True, True) and calls["token"] == "t"
    assert calls["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
