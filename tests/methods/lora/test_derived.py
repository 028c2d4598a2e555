import torch

from deltatune.methods.lora.derived import DerivedCache


def counting_sum(tensors):
    calls = [0]

    def compute():
        calls[0] += 1
        return sum(t.sum() for t in tensors)

    return compute, calls


def test_get_or_compute_reuses_the_value_until_a_source_or_extra_changes():
    a, b = torch.ones(3), torch.ones(2)
    cache = DerivedCache()
    compute, calls = counting_sum((a, b))
    assert cache.get_or_compute((a, b), compute, 1.0) == 5
    assert cache.get_or_compute((a, b), compute, 1.0) == 5
    assert calls[0] == 1
    assert cache.get((a, b), 1.0) == 5
    a.add_(1)  # in place: the version counter moves
    assert cache.get((a, b), 1.0) is None
    assert cache.get_or_compute((a, b), compute, 1.0) == 8
    assert calls[0] == 2
    cache.get_or_compute((a, b), compute, 2.0)  # another extra (a scaling, say)
    assert calls[0] == 3
    other = torch.ones(2)
    cache.get_or_compute((a, other), compute, 2.0)  # another tensor object
    assert calls[0] == 4


def test_an_optimizer_step_invalidates_even_without_touching_the_sources():
    a = torch.ones(3)
    param = torch.nn.Parameter(torch.ones(1))
    param.grad = torch.ones(1)
    cache = DerivedCache()
    compute, calls = counting_sum((a,))
    cache.get_or_compute((a,), compute)
    torch.optim.SGD([param], lr=0.1).step()
    cache.get_or_compute((a,), compute)
    assert calls[0] == 2


def test_put_and_get_agree_with_get_or_compute():
    a = torch.ones(3)
    cache = DerivedCache()
    cache.put((a,), "value", "extra")
    assert cache.get((a,), "extra") == "value"
    assert cache.get((a,), "other") is None
    assert cache.get_or_compute((a,), lambda: "new", "extra") == "value"


def test_a_value_computed_in_inference_mode_is_not_reused_outside_it():
    a = torch.ones(3)
    cache = DerivedCache()
    compute, calls = counting_sum((a,))
    with torch.inference_mode():
        cache.get_or_compute((a,), compute)
    cache.get_or_compute((a,), compute)
    assert calls[0] == 2
