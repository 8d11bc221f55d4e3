"""Process-wide settings for the processes that train: the CLI, the sweep driver, the benchmark."""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt() parameter numbers (glibc <malloc.h>)


def keep_freed_memory(threshold: int = 2**30) -> bool:
    """Have glibc keep freed blocks below `threshold` bytes for reuse instead of returning them to the OS.

    By default glibc maps every block above 32 MiB afresh and unmaps it on free, so each weight-sized
    tensor a training step creates (gradients, normalized weights) pays a page fault per 4 KiB: on this
    suite's CPU machines allocating and filling 42 MB took 15 ms instead of 2 ms. The price is that the
    process keeps its peak memory. Returns False where this does not apply (no glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


def native_bf16() -> bool:
    """Whether bf16 matrix products run at hardware speed here: a CUDA GPU with bf16, or a CPU with AVX-512,
    where oneDNN has bf16 kernels. On an AVX2-only CPU (most laptops, some cloud machines) oneDNN emulates
    them: measured on such a 2-core machine, a bf16 matmul ran at 0.9 GFLOP/s against 101 in fp32, and a
    bf16-mixed training step 16× slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


AUTO = "auto"  # a profile's precision: bf16 where it is native (`native_bf16`), fp32 where it would be emulated


def resolve_precision(value: str, bf16: str, fp32: str) -> str:
    """`value`; for "auto", the bf16 spelling where bf16 is native and the fp32 one elsewhere."""
    return (bf16 if native_bf16() else fp32) if value == AUTO else value
