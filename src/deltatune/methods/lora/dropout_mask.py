"""LoRA dropout without a stored mask: every element's keep / drop decision is a hash of (seed, element index).

peft's definition is kept: each input element is dropped independently with probability p and the survivors are
scaled by 1 / (1 - p), with a mask of its own for every adapted layer and call. What differs is where the random
bits come from. nn.Dropout draws a mask from torch's generator and keeps it (or a dropped copy of the input) for
the backward pass; here the decision for element i (in row-major order of the layer's 2-D input) is 32 bits of
SplitMix64's output for counter `seed + (i // 2) * GAMMA` (the low half for even i, the high half for odd i), and an
element is kept when those bits are >= round(p * 2**32).
So the backward pass recomputes the same mask from one saved integer, no mask or copy is kept, and a decision costs
a few integer operations, which a compiled kernel makes while it applies them (kernel.py). `draw_seed` takes the
seed from torch's default generator, so `torch.manual_seed` makes runs repeatable as it does with nn.Dropout.

The functions here are the definition, in plain torch integer ops (any device); kernel.py applies the same masks
faster on the CPU.
"""

from __future__ import annotations

import math

import torch

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's counter increment
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as torch's int64 holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def threshold(p: float) -> int:
    """Elements whose 32 random bits are below this are dropped: p rounded to a multiple of 2**-32 (at most
    1 - 2**-32, so that the threshold fits 32 bits)."""
    if not 0 <= p < 1:
        raise ValueError(f"A dropout probability must be in [0, 1), got {p}.")
    return min(round(p * 2**32), 2**32 - 1)


def draw_seed() -> int:
    """A fresh 64-bit seed from torch's default CPU generator (so it follows torch.manual_seed)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch shifts arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def random_bits(numel: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32 random bits of elements 0 .. numel - 1 (int64 values in [0, 2**32)): elements 2k and 2k + 1 take the
    low and the high half of SplitMix64's output for counter seed + k * GAMMA."""
    z = torch.arange((numel + 1) // 2, dtype=torch.int64, device=device).mul_(_signed(GAMMA)).add_(_signed(seed))
    z = (z ^ _shift_right(z, 30)).mul_(_signed(MIX1))
    z = (z ^ _shift_right(z, 27)).mul_(_signed(MIX2))
    z ^= _shift_right(z, 31)
    return torch.stack([z & 0xFFFFFFFF, _shift_right(z, 32)], dim=1).view(-1)[:numel]


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """The bool mask of kept elements of a contiguous tensor of `shape`."""
    return (random_bits(math.prod(shape), seed, device) >= threshold(p)).view(shape)
