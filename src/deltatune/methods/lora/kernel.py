"""LoRA dropout masks (dropout_mask.py) applied fast on the CPU, by a small C kernel built once with the system
C compiler.

Why: with torch ops, applying a mask costs a random-number pass on one thread, a comparison and a select over the
input, three times per adapted layer and step (forward, and twice in backward); on a CPU that is more than all of
LoRA's own arithmetic. The kernel (dropout_kernel.c) hashes and applies in one pass, on torch's thread count.
It is plain C, compiled on first use into <cache>/kernels/<hash of source, compiler and platform>/ (the cache
folder of embedded.py) and loaded with ctypes; float32 CPU tensors use it. Everything else (other dtypes, GPUs,
no C compiler, a failed build, DELTATUNE_KERNELS=0) runs the torch definition: the same masks, more slowly.
"""

from __future__ import annotations

import ctypes
import hashlib
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
    args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int]
    for name in ("deltatune_dropped_f32", "deltatune_add_dropped_f32"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    _library = lib
    return lib


def _kernel_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return library()
    return None


def dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x (contiguous) with the dropped elements zeroed (not yet scaled by 1 / (1 - p))."""
    lib = _kernel_for(x)
    if lib is None:
        return dropout_mask.dropped(x, p, seed)
    out = torch.empty_like(x)
    lib.deltatune_dropped_f32(x.data_ptr(), out.data_ptr(), x.numel(), seed & _MASK64, dropout_mask.threshold(p),
                              torch.get_num_threads())
    return out


def add_dropped_(acc: torch.Tensor, t: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """acc += t with t's dropped elements zeroed (not scaled), in place; both contiguous and of one shape."""
    lib = _kernel_for(acc, t)
    if lib is None:
        return dropout_mask.add_dropped_(acc, t, p, seed)
    lib.deltatune_add_dropped_f32(acc.data_ptr(), t.data_ptr(), t.numel(), seed & _MASK64,
                                  dropout_mask.threshold(p), torch.get_num_threads())
    return acc
