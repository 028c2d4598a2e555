"""The LoRA fast path (fast_path.py) against the plain path and against explicit re-computations; its dropout masks
(dropout_mask.py, kernel.py); and where it stands aside."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.methods.lora import dropout_mask, fast_path, kernel
from deltatune.methods.lora.layers import LoraLinear

# Float32 results of the same arithmetic in another order (in-place accumulation, other operand layouts).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def count_fast(monkeypatch):
    """The number of fast-path calls made so far (LoraLinear's fast_forward, counted)."""
    from deltatune.methods.lora import layers

    calls = []
    original = layers.fast_forward

    def counted(*args):
        out = original(*args)
        if out is not None:
            calls.append(args[0])
        return out

    monkeypatch.setattr(layers, "fast_forward", counted)
    return calls


@pytest.fixture
def plain_path(monkeypatch):
    """Call with True to make every LoRA Linear layer take the plain path."""
    return lambda on=True: monkeypatch.setattr(LoraLinear, "fast_path", not on)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def step(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), grads(model)


@pytest.mark.parametrize(("build", "bias"), [(tiny_llama, "none"), (tiny_gpt2, "none"), (tiny_gpt2, "all"),
                                             (tiny_gpt2, "lora_only")])
def test_outputs_and_gradients_equal_the_plain_path_without_dropout(build, bias, count_fast, plain_path):
    model = deltatune.get_peft_model(build(), deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, bias=bias, task_type="CAUSAL_LM",
        fan_in_fan_out=build is tiny_gpt2))
    model.eval()  # GPT-2's own dropout off; gradients still flow
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    fast_logits, fast_grads = step(model, inputs)
    assert count_fast, "the fast path did not run"
    plain_path()
    plain_logits, plain_grads = step(model, inputs)
    torch.testing.assert_close(fast_logits, plain_logits, rtol=RTOL, atol=ATOL)
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 0
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=RTOL, atol=ATOL, msg=name)


def test_inference_without_gradients_equals_the_plain_path(count_fast, plain_path):
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        assert count_fast
        plain_path()
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(fast, plain, rtol=RTOL, atol=ATOL)


def layer(base: nn.Module, r: int = 3, alpha: float = 6.0, dropout: float = 0.0) -> LoraLinear:
    lora = LoraLinear(base)
    lora.update_layer("default", r=r, alpha=alpha, dropout=dropout, init=False, use_rslora=False)
    lora.set_adapter(["default"])
    base.requires_grad_(False)
    return lora


def reference(lora: LoraLinear, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """The LoRA layer written out with autograd: base(x) + s * ((x * keep / (1 - p)) A^T) B^T, in the adapter's
    dtype, rounded to the base's once."""
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    base = lora.base_layer(x)
    xd = x.to(a.dtype)
    if keep is not None:
        xd = xd * keep / (1 - p)
    return (base.to(a.dtype) + (xd @ a.t()) @ b.t() * lora.scaling["default"]).to(base.dtype)


BASES = {
    "linear": lambda: nn.Linear(24, 20),
    "linear_no_bias": lambda: nn.Linear(24, 20, bias=False),
    "gpt2_conv1d": lambda: Conv1D(20, 24),
}


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_layer_matches_its_definition_with_and_without_dropout(kind, p, monkeypatch):
    """With the seed pinned, the fast path's output and every gradient equal autograd through the written-out layer
    with the mask dropout_mask.py defines (dropped elements zero, the others scaled by 1 / (1 - p))."""
    torch.manual_seed(0)
    lora = layer(BASES[kind](), dropout=p).train()
    seed = 1234567
    monkeypatch.setattr(fast_path, "draw_seed", lambda: seed)
    x = torch.randn(2, 5, 24, requires_grad=True)
    grad_out = torch.randn(2, 5, 20)
    y = fast_path.fast_forward(lora, "default", x)
    assert y is not None  # the fast path ran
    y.backward(grad_out)
    fast = (y.detach(), x.grad.clone(), *(p_.grad.clone() for p_ in lora.parameters() if p_.requires_grad))
    x.grad = None
    lora.zero_grad()
    keep = dropout_mask.keep_mask(x.shape, p, seed) if p > 0 else None
    expected = reference(lora, x, keep, p)
    expected.backward(grad_out)
    ref = (expected.detach(), x.grad.clone(), *(p_.grad.clone() for p_ in lora.parameters() if p_.requires_grad))
    # With dropout the fast path subtracts the dropped elements' share from the full product: rounding of the order
    # of the summed terms (about 1e-6 here), where a wrong mask would be off by about 0.1.
    for got, want in zip(fast, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL if p == 0 else 1e-5)


def test_half_precision_base_with_float32_factors_matches_its_definition():
    torch.manual_seed(0)
    lora = layer(nn.Linear(24, 20).to(torch.bfloat16))
    assert lora.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    got = (y.detach(), x.grad.clone(), lora.lora_A["default"].weight.grad.clone())
    x.grad = None
    lora.zero_grad()
    expected = reference(lora, x, None, 0.0)
    expected.float().sum().backward()
    # Both round the float32 sum to bfloat16 once; the input gradient is a bfloat16 product in both.
    torch.testing.assert_close(got[0], expected.detach(), rtol=0, atol=0.02)
    torch.testing.assert_close(got[1], x.grad, rtol=0.02, atol=0.02)
    torch.testing.assert_close(got[2], lora.lora_A["default"].weight.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nothing_input_sized_is_kept_for_backward_beyond_the_input(p):
    """Saved for backward: x (the caller's tensor), the weights, the rank-sized h and, with dropout where the CPU
    kernel runs, the dropped elements' int32 indices and values (about p of them): never a mask or a dropped copy
    of x."""
    torch.manual_seed(0)
    lora = layer(nn.Linear(64, 48), r=4, dropout=p).train()
    x = torch.randn(8, 16, 64, requires_grad=True)
    params = {t.untyped_storage().data_ptr() for t in (*lora.parameters(), x)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora(x).sum().backward()
    assert saved[0] == (torch.float32, 8 * 16 * 4)  # h
    if p == 0 or kernel.library() is None:
        assert len(saved) == 1
    else:
        (index_type, count), (value_type, value_count) = saved[1:]
        n = x.numel()
        assert (index_type, value_type) == (torch.int32, torch.float32) and count == value_count
        assert abs(count - n * p) < 6 * math.sqrt(n * p * (1 - p))


def test_dropout_drops_each_element_with_probability_p_independently_per_layer_and_call():
    p, n = 0.05, 1 << 20
    seeds = [dropout_mask.draw_seed() for _ in range(3)]
    masks = [dropout_mask.keep_mask((n,), p, seed) for seed in seeds]
    sigma = math.sqrt(n * p * (1 - p))
    for mask in masks:
        assert abs((~mask).sum().item() - n * p) < 5 * sigma
    # two masks agree where independent ones would (both drop: p^2)
    both = (~masks[0] & ~masks[1]).sum().item()
    assert abs(both - n * p * p) < 5 * math.sqrt(n * p * p)
    # neighbouring elements are not correlated
    pairs = (~masks[2][1:] & ~masks[2][:-1]).sum().item()
    assert abs(pairs - (n - 1) * p * p) < 5 * math.sqrt(n * p * p)
    assert len(set(seeds)) == 3


def test_dropout_follows_torch_manual_seed(monkeypatch):
    torch.manual_seed(0)
    lora = layer(nn.Linear(24, 20), dropout=0.2).train()
    x = torch.randn(3, 24)
    torch.manual_seed(7)
    first = lora(x)
    second = lora(x)
    torch.manual_seed(7)
    again = lora(x)
    assert not torch.allclose(first, second)  # a fresh mask every call
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # same seed, same kernels, same input


def test_random_bits_are_splitmix64():
    """dropout_mask.random_bits (torch int64 ops) against SplitMix64 written in Python integers."""
    mask64 = (1 << 64) - 1

    def splitmix(seed: int, k: int) -> int:
        z = (seed + k * dropout_mask.GAMMA) & mask64
        z = ((z ^ (z >> 30)) * dropout_mask.MIX1) & mask64
        z = ((z ^ (z >> 27)) * dropout_mask.MIX2) & mask64
        return z ^ (z >> 31)

    for seed in (0, 1, -1, 2**62 + 12345, -(2**63)):
        bits = dropout_mask.random_bits(301, seed)  # elements 2k, 2k + 1: the low and the high half of output k
        expected = [splitmix(seed & mask64, i // 2) >> (32 * (i % 2)) & 0xFFFFFFFF for i in range(301)]
        assert [int(b) for b in bits] == expected


def corrections(rows: int, cols: int, r: int, p: float, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(kernel.py's result, the written-out definition) for each of kernel.py's three corrections, and the list of
    dropped elements the forward hands the backward (where the kernel ran) against the mask's nonzero entries."""
    g = torch.Generator().manual_seed(rows * cols + r)
    x, a = torch.randn(rows, cols, generator=g), torch.randn(r, cols, generator=g)
    gh, h, ga = torch.randn(rows, r, generator=g), torch.randn(rows, r, generator=g), torch.randn(r, cols, generator=g)
    gx = torch.randn(rows, cols, generator=g)
    mask = ~dropout_mask.keep_mask((rows, cols), p, seed)
    xd = x * mask
    got_h = h.clone()
    dropped = kernel.drop_forward_(got_h, x, a, p, seed)
    out = {
        "forward": (got_h, h - xd @ a.t()),
        "grad_a": (kernel.drop_grad_a_(ga.clone(), x, gh, p, seed, dropped), ga - gh.t() @ xd),
        "grad_x": (kernel.drop_grad_x_(gx.clone(), gh, a, p, seed, dropped), gx - (gh @ a) * mask),
    }
    if dropped is not None:
        indices = mask.view(-1).nonzero().view(-1)
        out["list"] = (dropped[0].long(), indices)
        out["values"] = (dropped[1], x.view(-1)[indices])
    return out


SHAPES = [(1, 1, 1), (3, 63, 4), (5, 64, 16), (7, 130, 6), (200, 300, 8), (300, 1100, 33), (1024, 512, 16)]


@pytest.fixture(params=[(0, "1"), (1, "1"), (2, "1"), (2, "3")], ids=["plain-C", "avx2", "avx512", "avx512-3-threads"])
def kernel_variant(request, monkeypatch):
    """The C kernel limited to one instruction set (the best the CPU has at most) and run on a number of threads."""
    lib = kernel.library()
    if lib is None:
        pytest.skip("no C compiler here: the torch ops are all that runs")
    level, threads = request.param
    monkeypatch.setenv("DELTATUNE_KERNEL_THREADS", threads)
    lib.deltatune_limit_isa(level)
    yield
    lib.deltatune_limit_isa(2)


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES)
@pytest.mark.parametrize("p", [0.05, 0.5, 0.999])
def test_kernel_takes_out_the_dropped_elements(rows, cols, r, p, kernel_variant):
    """The C kernel (each instruction set, threads, per-thread partials, block edges, padded ranks) against the
    definition."""
    results = corrections(rows, cols, r, p, dropout_mask.draw_seed())
    assert "list" in results
    for name, (got, want) in results.items():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize(("rows", "cols", "r"), SHAPES[:4])
def test_without_the_kernel_the_torch_ops_give_the_same(rows, cols, r, monkeypatch):
    monkeypatch.setattr(kernel, "library", lambda: None)
    results = corrections(rows, cols, r, 0.3, 99)
    assert "list" not in results  # the backward recomputed the mask from the seed
    for name, (got, want) in results.items():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=name)


def test_threshold_covers_p():
    assert dropout_mask.threshold(0.0) == 0
    assert dropout_mask.threshold(0.05) == round(0.05 * 2**32)
    assert dropout_mask.threshold(1 - 1e-12) == 2**32 - 1
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        dropout_mask.threshold(1.0)


def _hooked(lora: LoraLinear) -> None:
    lora.lora_A["default"].register_forward_hook(lambda *args: None)


@pytest.mark.parametrize("case", ["dora", "hook_on_lora_A", "trainable_base", "two_active", "autocast",
                                  "tensor_scaling"])
def test_cases_it_does_not_cover_take_the_plain_path(case, count_fast):
    torch.manual_seed(0)
    lora = layer(nn.Linear(24, 20))
    x = torch.randn(3, 24)
    if case == "dora":
        lora.update_layer("default", r=3, alpha=6.0, dropout=0.0, init=False, use_rslora=False, use_dora=True)
    elif case == "hook_on_lora_A":
        _hooked(lora)
    elif case == "trainable_base":
        lora.base_layer.weight.requires_grad_(True)
    elif case == "two_active":
        lora.update_layer("other", r=2, alpha=2.0, dropout=0.0, init=False, use_rslora=False)
        lora.set_adapter(["default", "other"])
    elif case == "tensor_scaling":
        lora.scaling["default"] = torch.tensor(2.0)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lora(x)
    else:
        lora(x)
    assert not count_fast


def test_quantized_and_mixed_batch_layers_take_the_plain_path(count_fast):
    from deltatune.mixed_batch import BASE

    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    model.add_adapter("b", deltatune.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
    ids = torch.randint(1, 128, (2, 5))
    with torch.no_grad():
        model(input_ids=ids, adapter_names=["b", BASE])
    assert not count_fast
    model(input_ids=ids)
    assert count_fast


def test_a_lora_model_compiles_without_graph_breaks():
    """Under torch.compile the layers take the plain path, which dynamo traces whole: one graph, no break."""
    model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")).train()
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_gradient_checkpointing_recomputes_the_same_dropout_masks():
    """Checkpointing reruns each layer's forward in the backward pass; the masks must be the first run's (the seeds
    come from torch's generator, whose state checkpointing restores), or the gradients would mix two masks."""
    results = []
    for checkpointing in (False, True):
        model = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.3, init_lora_weights=False, target_modules="all-linear",
            task_type="CAUSAL_LM"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(123)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_plain, plain), (loss_ckpt, ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=1e-6)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
