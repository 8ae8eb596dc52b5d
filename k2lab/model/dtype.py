"""The compute dtype for training, chosen by measurement: bf16 only where the device runs it natively and faster.

bf16 is not a safe default on CPUs: with avx512_bf16 or AMX a bf16 GEMM runs 2-5x faster than fp32, on AVX2-only
CPUs torch emulates it and it runs ~100x slower. So the probe asks the CPU (its flags) and then the clock (a GEMM
of training size in both dtypes, medians of alternating runs), and picks fp32 unless both say bf16.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MARGIN = 1.1  # bf16 must be at least this much faster: a tie is not worth the precision


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether the device computes bf16 natively, the evidence)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() = {ok}"
    cpuinfo = Path("/proc/cpuinfo")
    if device.type != "cpu" or not cpuinfo.exists():
        return False, f"no way to check bf16 support on {device.type} here"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), [])
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    return bool(found), f"CPU flags: {', '.join(found) or 'none of ' + ', '.join(NATIVE_BF16_FLAGS)}"


def gemm_gflops(dtype: torch.dtype, m: int, k: int, n: int, device: torch.device, repeats: int = 5) -> float:
    """Median GFLOP/s of torch.mm [m, k] x [k, n] in `dtype` (one warm-up call)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


@functools.cache
def compute_dtype(device: str = "cpu", tokens: int = 4096, hidden: int = 256) -> tuple[torch.dtype, dict]:
    """(bf16 or fp32, a report of why) for training `tokens` per step at width `hidden` on `device`; measured once
    per process. The GEMM is [tokens, hidden] x [hidden, 4 * hidden], an FFN-sized training matmul."""
    dev = torch.device(device)
    native, evidence = native_bf16(dev)
    report = {"device": device, "native_bf16": native, "evidence": evidence, "gemm": [tokens, hidden, 4 * hidden]}
    if not native:
        return torch.float32, {**report, "dtype": "float32", "reason": "bf16 is not native here"}
    fp32, bf16 = [], []
    for _ in range(3):  # alternate, so load from elsewhere hits both alike
        fp32.append(gemm_gflops(torch.float32, tokens, hidden, 4 * hidden, dev))
        bf16.append(gemm_gflops(torch.bfloat16, tokens, hidden, 4 * hidden, dev))
    report.update(fp32_gflops=statistics.median(fp32), bf16_gflops=statistics.median(bf16))
    speedup = report["bf16_gflops"] / report["fp32_gflops"]
    report["bf16_speedup"] = speedup
    if speedup < MARGIN:
        return torch.float32, {**report, "dtype": "float32", "reason": f"bf16 only {speedup:.2f}x fp32"}
    return torch.bfloat16, {**report, "dtype": "bfloat16", "reason": f"native and {speedup:.2f}x fp32"}
