"""Process-wide settings for the processes that train: the CLI, the sweep driver, the benchmark."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
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


BF16_MARGIN = 1.3  # bf16 "pays" where its matrix products run at least this much faster than fp32's


@functools.lru_cache(maxsize=None)
def bf16_pays() -> bool:
    """Whether bf16 is faster than fp32 here, measured once per process: native (`native_bf16`), and a 1024³
    matrix product at least `BF16_MARGIN` times fp32's speed (`matmul_gflops`, the best of 5 each). Native is not enough: on an
    Intel Xeon with AVX-512 BF16 and no AMX, bf16 products ran at 182-198 GFLOP/s against 324-392 in fp32 and a
    T/4 bf16-mixed training step at 0.76x fp32's (results/bench/xeon-avx512_bf16/), where an AMD EPYC with the
    same flag ran bf16 at 2.2x fp32. The two cases lie far on either side of the margin."""
    import torch

    if not native_bf16():
        return False
    if torch.cuda.is_available():
        return True
    return matmul_gflops(torch.bfloat16, 1024, 5) >= BF16_MARGIN * matmul_gflops(torch.float32, 1024, 5)


def matmul_gflops(dtype, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n×n product on the CPU, the best of `repeats` (the first call, which builds oneDNN's kernel,
    not counted)."""
    import time

    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


AUTO = "auto"  # a profile's precision: bf16 where it pays (`bf16_pays`), fp32 elsewhere


def resolve_precision(value: str, bf16: str, fp32: str) -> str:
    """`value`; for "auto", the bf16 spelling where bf16 is faster than fp32 here and the fp32 one elsewhere."""
    return (bf16 if bf16_pays() else fp32) if value == AUTO else value


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """The named loggers at WARNING or above while inside: their information lines dropped, warnings kept."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
