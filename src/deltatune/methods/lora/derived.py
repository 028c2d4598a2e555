"""A cache for tensors derived from parameters: DoRA's weight norm, the stacked factors of mixed-adapter batches.

Recomputing those in every forward is what makes DoRA and mixed batches slow; reusing them after the parameters
changed gives silently wrong outputs. A cached value is reused only while
- every source tensor is the same Python object as when it was computed (held by weak reference: a deleted
  adapter's parameters cannot pass for the new ones that reuse their freed memory),
- with the same storage address and in-place version counter (optimizer steps, `copy_`, `load_state_dict`),
- no `torch.optim.Optimizer` has stepped since (caught even where the update reaches the parameters without
  touching their own version counters, as under FSDP, whose optimizer updates a flat parameter the model's
  parameters are views of),
- and inference mode is the same (a value made under `torch.inference_mode()` cannot be saved for backward).
Writes that bypass all of these (`param.data.add_` outside an optimizer) are not seen: clear the cache after them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class DerivedCache:
    """One cached value and the state of the tensors it was computed from."""

    __slots__ = ("_key", "_refs", "value")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple[weakref.ref, ...] = ()
        self.value: Any = None

    @staticmethod
    def _key_of(sources: Sequence[torch.Tensor], extra: Any) -> tuple:
        return (_optimizer_steps, torch.is_inference_mode_enabled(), extra,
                tuple([(t.data_ptr(), t._version) for t in sources]))

    def get(self, sources: Sequence[torch.Tensor], extra: Any = None) -> Any:
        """The cached value if it is still valid for `sources` (and `extra`, any other input), else None."""
        return self.value if self._valid(self._key_of(sources, extra), sources) else None

    def get_or_compute(self, sources: Sequence[torch.Tensor], compute: Callable[[], Any], extra: Any = None) -> Any:
        """The cached value, or `compute()` cached in its place: one key for both (this runs per layer and call)."""
        key = self._key_of(sources, extra)
        if self._valid(key, sources):
            return self.value
        self._store(key, sources, compute())
        return self.value

    def put(self, sources: Sequence[torch.Tensor], value: Any, extra: Any = None) -> Any:
        self._store(self._key_of(sources, extra), sources, value)
        return value

    def _valid(self, key: tuple, sources: Sequence[torch.Tensor]) -> bool:
        return (self.value is not None and key == self._key and len(sources) == len(self._refs)
                and all(ref() is t for ref, t in zip(self._refs, sources, strict=True)))

    def _store(self, key: tuple, sources: Sequence[torch.Tensor], value: Any) -> None:
        self._key = key
        self._refs = tuple([weakref.ref(t) for t in sources])
        self.value = value

    # A cache is not part of a model's state: a pickled or copied model (torch.save(model), deepcopy) starts empty.
    def __getstate__(self) -> bool:
        return True  # a true value, so that unpickling calls __setstate__

    def __setstate__(self, state: bool) -> None:
        self.clear()

    def __deepcopy__(self, memo: dict) -> DerivedCache:
        return DerivedCache()
