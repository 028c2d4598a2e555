"""DoRA (use_dora=True) against peft: keys, outputs, gradients, merging, training, and the cached weight norm."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import ARCHS, inputs_for, lora_kwargs, max_diff, perturb_trainable, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune
from deltatune.methods.lora.dora import DoraMagnitude

from .test_layers import LAYER_NAMES, Holder, config_kwargs, holder, layer_input

TOL = 1e-5


def dora_pair(kind: str, seed: int = 1, **overrides) -> tuple:
    """(ours, peft's): the same non-trivial DoRA adapter (factors and magnitude off their init) on one layer."""
    kwargs = config_kwargs(kind, use_dora=True, **overrides)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), holder(kind))
    ours = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**kwargs), holder(kind))
    perturb_trainable(theirs, seed)
    deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return ours, theirs


def output_and_grads(model, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout mask in both libraries
    out = model(x)
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    assert any("lora_magnitude_vector" in name for name in theirs)
    for name, grad in theirs.items():
        assert max_diff(ours[name], grad) < TOL, name


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_fresh_dora_adapter_is_an_exact_noop(kind):
    base = holder(kind)
    x = layer_input(kind)
    with torch.no_grad():
        expected = base(x)
        config = deltatune.LoraConfig(**config_kwargs(kind, init_lora_weights=True, use_dora=True))
        model = deltatune.inject_adapter_in_model(config, base)
        # B = 0 and m = ||W||: the adapter's term is exact zeros and the rescaling is by exactly 1, but DoRA adds and
        # rescales inside addmm / addcmul, which a CPU may round differently: far below any adapter's effect.
        torch.testing.assert_close(model(x), expected, rtol=1.3e-6, atol=1e-6)


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_parameters_come_in_peft_order(kind):
    """An optimizer built on parameters() holds its state slot by slot: the same order moves it between libraries."""
    ours, theirs = dora_pair(kind)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_keys_names_and_shapes_match_peft(kind):
    ours, theirs = dora_pair(kind)
    ours_sd, peft_sd = deltatune.get_peft_model_state_dict(ours), peft.get_peft_model_state_dict(theirs)
    assert "layer.lora_magnitude_vector" in peft_sd
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in peft_sd.items()}
    trainable = [sorted(n for n, p in m.named_parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1]  # live names too: lora_magnitude_vector.default.weight


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_layer_outputs_and_gradients_match_peft(kind):
    ours, theirs = dora_pair(kind)
    x = layer_input(kind)
    our_out, our_grads = output_and_grads(ours, x)
    peft_out, peft_grads = output_and_grads(theirs, x)
    assert max_diff(our_out, peft_out) < TOL
    lora_out = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs(kind)), holder(kind))
    deltatune.set_peft_model_state_dict(lora_out, {k: v for k, v in deltatune.get_peft_model_state_dict(ours).items()
                                                   if "magnitude" not in k})
    assert max_diff(our_out, lora_out(x)) > 1e-3  # the magnitude really rescales
    assert_same_grads(our_grads, peft_grads)


def permuted_linear_input() -> torch.Tensor:
    """The linear layer's features in a (4, 3, features) input laid out (3, 4, features): flattening its rows takes a
    copy in another order than its own layout, so a dropout mask drawn after flattening would differ from peft's."""
    features = layer_input("linear").shape[-1]
    x = torch.randn(3, 4, features, generator=torch.Generator().manual_seed(5)).transpose(0, 1)
    assert not x.is_contiguous()
    return x


@pytest.mark.parametrize(("kind", "make_input"), [
    ("linear", layer_input), ("gpt2_conv1d", layer_input), ("conv2d", layer_input),
    ("linear", lambda kind: permuted_linear_input()),
])
def test_dropout_in_training_matches_peft(kind, make_input):
    ours, theirs = dora_pair(kind, lora_dropout=0.3)
    x = make_input(kind)
    ours.train()
    theirs.train()
    our_out, our_grads = output_and_grads(ours, x)
    peft_out, peft_grads = output_and_grads(theirs, x)
    assert max_diff(our_out, peft_out) < TOL
    assert_same_grads(our_grads, peft_grads)
    ours.eval()
    theirs.eval()
    assert max_diff(ours(x), theirs(x)) < TOL


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    ours, theirs = dora_pair(kind)
    x = layer_input(kind)
    base_weight = ours.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = ours(x)
        ours.layer.merge()
        merged = ours(x)
        theirs.layer.merge()
        assert max_diff(ours.layer.base_layer.weight, theirs.layer.base_layer.weight) < TOL
        ours.layer.unmerge()
        again = ours(x)
    assert max_diff(merged, unmerged) < TOL
    assert max_diff(again, unmerged) < TOL
    assert max_diff(ours.layer.base_layer.weight, base_weight) < 1e-6


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_two_adapters_merge_like_their_forward_and_like_peft():
    """DoRA after a plain adapter rescales what came before it, as in peft; merging in turn gives the same."""
    models = []
    for lib in (deltatune, peft):
        model = lib.inject_adapter_in_model(lib.LoraConfig(**config_kwargs("linear")), holder("linear"))
        model = lib.inject_adapter_in_model(lib.LoraConfig(**config_kwargs("linear", use_dora=True, r=2)), model,
                                            adapter_name="dora")
        models.append(model)
    ours, theirs = models
    perturb_trainable(theirs, 4)
    for name in ("default", "dora"):
        state = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        deltatune.set_peft_model_state_dict(ours, state, adapter_name=name)
    ours.layer.set_adapter(["default", "dora"])
    theirs.layer.set_adapter(["default", "dora"])
    x = layer_input("linear")
    with torch.no_grad():
        unmerged = ours(x)
        assert max_diff(unmerged, theirs(x)) < TOL
        ours.layer.merge()
        theirs.layer.merge()
        assert max_diff(ours(x), unmerged) < TOL
        assert max_diff(ours.layer.base_layer.weight, theirs.layer.base_layer.weight) < TOL
        ours.layer.unmerge()
        assert max_diff(ours(x), unmerged) < TOL


def test_safe_merge_refuses_non_finite_dora():
    model = deltatune.get_peft_model(ARCHS["llama"][0](), deltatune.LoraConfig(**lora_kwargs("llama", use_dora=True)))
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    last = model.base_model.model.model.layers[-1].self_attn.v_proj
    with torch.no_grad():
        last.lora_magnitude_vector["default"].weight[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_delete_adapter_removes_the_magnitude():
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear"))
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear")), model, "plain")
    model.layer.delete_adapter("default")
    assert "default" not in model.layer.lora_magnitude_vector and "default" not in model.layer.lora_variant
    assert [n for n, _ in model.layer.named_parameters() if "magnitude" in n] == []


# --- whole models --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_gradients_match_peft(arch):
    kwargs = lora_kwargs(arch, use_dora=True, target_modules="all-linear")
    theirs = peft.get_peft_model(ARCHS[arch][0](), peft.LoraConfig(**kwargs)).eval()
    perturb_trainable(theirs, 2)
    ours = deltatune.get_peft_model(ARCHS[arch][0](), deltatune.LoraConfig(**kwargs)).eval()
    deltatune.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    inputs = inputs_for(arch)
    results = []
    for model in (ours, theirs):
        out = model(**inputs).logits
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert max_diff(results[0][0], results[1][0]) < TOL
    assert_same_grads(results[0][1], results[1][1])


def train(lib, arch: str, steps: int, accumulation: int, state: dict):
    """AdamW on a DoRA adapter, `accumulation` micro-batches per step; (model, losses per micro-batch)."""
    kwargs = lora_kwargs(arch, use_dora=True, lora_dropout=0.0)
    model = lib.get_peft_model(ARCHS[arch][0](), lib.LoraConfig(**kwargs)).train()
    lib.set_peft_model_state_dict(model, state)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        for micro in range(accumulation):
            inputs = inputs_for(arch, seed=micro)
            loss = model(**inputs, labels=inputs["input_ids"]).loss / accumulation
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return model, losses


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_trajectory_matches_peft(arch):
    """The cached norm must follow every optimizer step: a stale one would drift away from peft at step 2."""
    start = peft.get_peft_model(ARCHS[arch][0](), peft.LoraConfig(**lora_kwargs(arch, use_dora=True)))
    perturb_trainable(start, 3)
    state = {k: v.clone() for k, v in peft.get_peft_model_state_dict(start).items()}
    ours, our_losses = train(deltatune, arch, steps=4, accumulation=2, state=state)
    theirs, peft_losses = train(peft, arch, steps=4, accumulation=2, state=state)
    assert our_losses == pytest.approx(peft_losses, abs=1e-5)
    assert our_losses[-2] < our_losses[0] - 1e-3  # it did train (same first micro-batch every step)
    final = deltatune.get_peft_model_state_dict(ours)
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        assert max_diff(final[key], value) < 1e-4, key


# --- the cached norm -----------------------------------------------------------------------------
def count_norm_computations(model, monkeypatch) -> list[int]:
    from deltatune.methods.lora import dora

    calls = [0]
    original = dora._Dora._norm_of

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dora._Dora, "_norm_of", counting)
    return calls


def test_norm_is_computed_once_per_step_and_follows_every_change(monkeypatch):
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear")).train()
    layer = model.layer
    calls = count_norm_computations(model, monkeypatch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = layer_input("linear")

    def fresh_norm() -> torch.Tensor:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight = layer.base_layer.weight + layer.scaling["default"] * (b @ a)
        return torch.linalg.vector_norm(weight, dim=1).detach()

    for _ in range(4):  # gradient accumulation: four micro-batches, one norm
        model(x).sum().backward()
    assert calls[0] == 1
    opt.step()
    model(x)
    assert calls[0] == 2  # the step changed A and B
    assert max_diff(layer.lora_magnitude_vector["default"].norm_cache.value, fresh_norm()) < 1e-5
    with torch.no_grad():
        model(x)
    assert calls[0] == 2
    layer.scaling["default"] *= 2  # the norm depends on the scaling too
    model(x)
    assert calls[0] == 3
    state = {k: v + 1 for k, v in deltatune.get_peft_model_state_dict(model).items()}
    deltatune.set_peft_model_state_dict(model, state)  # loading copies into the parameters in place
    model(x)
    assert calls[0] == 4
    assert max_diff(layer.lora_magnitude_vector["default"].norm_cache.value, fresh_norm()) < 1e-5
    layer.merge()
    layer.unmerge()
    model(x)
    assert calls[0] == 5  # merge reused the cached norm, and merge and unmerge dropped it: forward recomputes
    assert max_diff(layer.lora_magnitude_vector["default"].norm_cache.value, fresh_norm()) < 1e-5


class FullSizeTensors(TorchDispatchMode):
    """Counts the new tensors (views excluded) at least as large as `numel` that any op creates."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        outs = out if isinstance(out, tuple | list) else (out,)
        self.count += sum(isinstance(t, torch.Tensor) and t.numel() >= self.numel
                          and t.untyped_storage().data_ptr() not in inputs for t in outs)
        return out


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_training_step_builds_one_weight_sized_tensor(fan_in_fan_out):
    """W + s B A is built once, for the norm: the forward and backward never build the adapted weight."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(64, 48) if fan_in_fan_out else nn.Linear(48, 64)
    model = deltatune.inject_adapter_in_model(
        deltatune.LoraConfig(target_modules=["layer"], r=4, use_dora=True, fan_in_fan_out=fan_in_fan_out),
        Holder(base),
    ).train()
    x = torch.randn(2, 5, 48)  # fewer activations than weights, so only weight copies count
    with FullSizeTensors(48 * 64) as mode:
        for _ in range(2):
            model(x).sum().backward()
    assert mode.count == 1


def test_clear_norm_cache_after_writes_that_bypass_version_counters():
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear"))
    x = layer_input("linear")
    model(x)  # caches the norm
    model.layer.lora_B["default"].weight.data.mul_(2)  # `.data` writes do not bump the version counter
    deltatune.methods.lora.dora.clear_norm_cache(model)
    fresh = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear"))
    deltatune.set_peft_model_state_dict(fresh, deltatune.get_peft_model_state_dict(model))
    assert max_diff(model(x), fresh(x)) < 1e-6
    assert any(isinstance(m, DoraMagnitude) for m in model.modules())


def test_a_norm_cached_in_inference_mode_is_not_reused_for_training():
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear")).train()
    x = layer_input("linear")
    with torch.inference_mode():
        model(x)  # an evaluation pass caches the norm as an inference tensor
    model(x).sum().backward()  # which autograd cannot save: the training forward must compute its own
    assert model.layer.lora_magnitude_vector["default"].weight.grad is not None


@pytest.mark.parametrize("kind", LAYER_NAMES)
def test_norm_and_merge_under_autocast_are_full_precision(kind):
    """Autocast would round W in W + s B A; the cached norm must not carry that into later float32 forwards or a
    merge (an evaluation pass under bf16 autocast, then merge_and_unload)."""
    ours, theirs = dora_pair(kind)
    x = layer_input(kind)
    with torch.no_grad():
        reference = theirs(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(x)
        assert max_diff(ours(x), reference) < TOL
        ours.layer.merge()
        assert max_diff(ours(x), reference) < TOL


class DataWritingSGD(torch.optim.Optimizer):
    """Plain SGD that writes through `.data`, which leaves version counters alone: as an update that reaches the
    parameters through other storage does (FSDP's optimizer steps a flat parameter the model's are views of)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.data.add_(param.grad, alpha=-group["lr"])


def test_norm_follows_optimizer_steps_that_version_counters_miss():
    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear")).train()
    x = layer_input("linear")
    opt = DataWritingSGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).pow(2).sum().backward()
    opt.step()
    fresh = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear"))
    deltatune.set_peft_model_state_dict(fresh, deltatune.get_peft_model_state_dict(model))
    assert max_diff(model(x), fresh(x)) < 1e-6


def test_norm_follows_optimizer_steps_under_fsdp(tmp_path):
    """FSDP (use_orig_params=True, one CPU process over gloo): the optimizer updates the flat parameter, whose
    views the model's parameters are, without touching their version counters."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from deltatune.methods.lora.dora import clear_norm_cache

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config = deltatune.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                      use_dora=True, init_lora_weights=False)
        model = FullyShardedDataParallel(deltatune.get_peft_model(tiny_llama(), config).train(),
                                         use_orig_params=True, device_id=torch.device("cpu"))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        with torch.no_grad():
            cached = model(input_ids=ids, labels=ids).loss
            clear_norm_cache(model)
            fresh = model(input_ids=ids, labels=ids).loss
        assert abs(cached - fresh) < 1e-6
    finally:
        dist.destroy_process_group()


def test_dora_and_lora_train_under_sharded_fsdp():
    """Two processes, FULL_SHARD, one FSDP unit per decoder layer (the wrapping accelerate and Trainer give a model
    that is not peft's): three SGD steps give the losses of one process, for plain LoRA and DoRA alike. Each
    decoder layer's forward sees its parameters unsharded, the norm cache follows the optimizer's flat-parameter
    updates, and the adapters' gradients are reduced across ranks."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("fsdp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for method, (strategy, alone, sharded) in results.items():
        assert strategy == "FULL_SHARD", method
        assert alone[0] > alone[-1], method  # it trains
        assert max(abs(a - b) for a, b in zip(alone, sharded, strict=True)) < 1e-5, method


def test_a_model_with_cached_norms_pickles_and_copies():
    """The cache holds weak references, which do not pickle: it is left behind, and the copy recomputes."""
    import copy
    import io

    model = deltatune.inject_adapter_in_model(deltatune.LoraConfig(**config_kwargs("linear", use_dora=True)),
                                              holder("linear"))
    x = layer_input("linear")
    expected = model(x)  # caches the norm
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert max_diff(clone(x), expected) < 1e-6
