"""LoRA dropout (dropout_mask.py) applied to the LoRA products: on the CPU by a small C kernel, built once with the
system C compiler; by torch ops elsewhere.

The fast path computes the LoRA products on x itself, then removes the dropped elements' share: h -= (x * d) A^T
in the forward, and in the backward gA -= gh^T (x * d) and gx -= (gh A) * d, where d marks the dropped elements.
With torch ops that means the mask and masked copies of input-sized tensors, three times per layer and step; on a
CPU that costs more than all of LoRA's own arithmetic. The kernel (dropout_kernel.c) hashes the decisions once, in
the forward, and keeps the dropped elements as a list of int32 indices and their float32 values (about p of the
elements: the mask, packed) for the backward; each dropped element costs r multiply-adds, and nothing input-sized
is written. It is plain C, compiled on first use into <cache>/kernels/<hash of source, compiler and platform>/ (the
cache folder of embedded.py) and loaded with ctypes; float32 CPU tensors use it. Everything else (other dtypes,
GPUs, no C compiler, a failed build, DELTATUNE_KERNELS=0) runs torch ops that recompute the mask from the seed in
the backward: the same masks, the same results up to float rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from deltatune.embedded import default_cache_dir
from deltatune.methods.lora import dropout_mask

SOURCE = Path(__file__).with_name("dropout_kernel.c")
_MASK64 = (1 << 64) - 1
_library: ctypes.CDLL | None = None
_loaded = False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str) -> Path:
    """The compiled library's path, building it if this source, compiler and platform have none yet."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), platform.machine().encode(),
                                     platform.system().encode()])).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / key / "dropout_kernel.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # then renamed: concurrent builds never clash
    os.close(fd)
    try:
        subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", tmp],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; None where it cannot be (the torch definition runs instead)."""
    global _library, _loaded
    if _loaded:
        return _library
    _loaded = True
    if os.environ.get("DELTATUNE_KERNELS", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"deltatune could not build its CPU dropout kernel with {compiler} ({detail}); LoRA dropout "
                      "runs on torch ops instead (same results, slower). Set DELTATUNE_KERNELS=0 to skip the build.",
                      stacklevel=2)
        return None
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.deltatune_drop_forward.argtypes = [pointer, pointer, pointer, i64, i64, i64, i64, ctypes.c_uint64,
                                           ctypes.c_uint32, pointer, pointer, i64, ctypes.c_int]
    lib.deltatune_drop_forward.restype = i64
    lib.deltatune_limit_isa.argtypes = [ctypes.c_int]
    lib.deltatune_limit_isa.restype = None
    for name in ("deltatune_drop_grad_a", "deltatune_drop_grad_x"):
        getattr(lib, name).argtypes = [pointer, pointer, pointer, pointer, i64, i64, i64, ctypes.c_int]
        getattr(lib, name).restype = None
    _library = lib
    return lib


def _threads() -> int:
    """Threads for one kernel call: 1 unless DELTATUNE_KERNEL_THREADS says otherwise. torch's OpenMP workers keep
    spinning for a while after each op, so threads started here compete with them for the cores; on 2 cores one
    thread made the dropout step faster than two (bench/README.md)."""
    return max(1, int(os.environ.get("DELTATUNE_KERNEL_THREADS", "1")))


def _kernel_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return library()
    return None


def _capacity(numel: int, p: float) -> int:
    """Room for the dropped elements' indices: far above any count a binomial draw reaches (the kernel reports an
    overflow, and the torch ops take over)."""
    threads = _threads()
    spread = math.sqrt(numel * p * (1 - p))
    return int(numel * p + 12 * spread * math.sqrt(threads)) + 2 * BATCH_ELEMENTS * threads


BATCH_ELEMENTS = 1024  # dropout_kernel.c's BATCH * BLOCK: the room each thread wants free before hashing a batch


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t (n, r) as a contiguous (n, rp) tensor, rp the next multiple of 16 (zeros past r): the kernel's layout."""
    rp = -(-t.shape[1] // 16) * 16
    if rp == t.shape[1] and t.is_contiguous():
        return t
    out = t.new_zeros(t.shape[0], rp)
    out[:, : t.shape[1]] = t
    return out


# What the forward hands the backward where the kernel ran: the dropped elements' flat indices (int32) and values.
Dropped = tuple[torch.Tensor, torch.Tensor]


def drop_forward_(h: torch.Tensor, x: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> Dropped | None:
    """h -= (x * dropped) A^T, in place: turns h = x A^T into dropout(x) A^T (before the 1 / (1 - p) scale).
    x: (rows, cols) contiguous, a: (r, cols), h: (rows, r) contiguous. Returns the dropped elements (indices and
    values) where the kernel ran, for the backward pass; None where torch ops did (the backward recomputes the
    mask)."""
    at = _padded(a.t())
    if _kernel_for(h, x, at) is not None and x.numel() < 2**31:
        capacity = _capacity(x.numel(), p)
        indices, values = torch.empty(capacity, dtype=torch.int32), torch.empty(capacity)
        count = library().deltatune_drop_forward(
            h.data_ptr(), x.data_ptr(), at.data_ptr(), x.shape[0], x.shape[1], a.shape[0], at.shape[1], seed & _MASK64,
            dropout_mask.threshold(p), indices.data_ptr(), values.data_ptr(), capacity, _threads())
        if count >= 0:
            return indices[:count].clone(), values[:count].clone()
        h.copy_(torch.mm(x, a.t()))  # overflowed halfway: start over with torch ops
    keep = dropout_mask.keep_mask(x.shape, p, seed, x.device)
    h.sub_(torch.mm(torch.where(keep, 0, x), a.t()))
    return None


def _dropped_mask(shape: torch.Size, p: float, seed: int, dropped: Dropped | None, device) -> torch.Tensor:
    if dropped is None:
        return ~dropout_mask.keep_mask(shape, p, seed, device)
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=device)
    return mask.index_fill_(0, dropped[0].to(device=device, dtype=torch.int64), True).view(shape)


def drop_grad_a_(ga: torch.Tensor, x: torch.Tensor, gh: torch.Tensor, p: float, seed: int,
                 dropped: Dropped | None) -> torch.Tensor:
    """ga -= gh^T (x * dropped), in place: turns gh^T x into gh^T dropout(x). ga: (r, cols), gh: (rows, r);
    `dropped`: what drop_forward_ returned."""
    ghp = _padded(gh)
    if dropped is not None and _kernel_for(ga, x, ghp) is not None:
        correction = torch.zeros(x.shape[1], ghp.shape[1])  # (gh^T (x * dropped))^T, padded
        indices, values = dropped
        library().deltatune_drop_grad_a(correction.data_ptr(), values.data_ptr(), ghp.data_ptr(), indices.data_ptr(),
                                        indices.numel(), x.shape[1], ghp.shape[1], _threads())
        return ga.add_(correction[:, : gh.shape[1]].t())
    mask = _dropped_mask(x.shape, p, seed, dropped, x.device)
    return ga.sub_(torch.mm(gh.t(), torch.where(mask, x, 0)))


def drop_grad_x_(gx: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, p: float, seed: int,
                 dropped: Dropped | None) -> torch.Tensor:
    """gx -= (gh A) * dropped, in place: turns gx + gh A into gx + (gh A) * mask. gx: (rows, cols) contiguous."""
    ghp, at = _padded(gh), _padded(a.t())
    if dropped is not None and _kernel_for(gx, ghp, at) is not None:
        library().deltatune_drop_grad_x(gx.data_ptr(), ghp.data_ptr(), at.data_ptr(), dropped[0].data_ptr(),
                                        dropped[0].numel(), gx.shape[1], ghp.shape[1], _threads())
        return gx
    mask = _dropped_mask(gx.shape, p, seed, dropped, gx.device)
    return gx.sub_(torch.where(mask, torch.mm(gh, a), 0).to(gx.dtype))
