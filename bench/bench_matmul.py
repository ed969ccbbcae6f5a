"""Dense matmul peak of this machine: the reference for model-FLOP utilisation (MFU) figures.

CPU: fp32 (the dtype training uses there); GPU: bf16 (and fp32/TF32 for reference).
"""

from __future__ import annotations

import time

import torch


def measure_matmul_flops(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu",
                         min_time_s: float = 1.0) -> float:
    """Best sustained FLOP/s of an n×n @ n×n matmul (2n³ FLOPs each)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    best = 0.0
    deadline = time.perf_counter() + min_time_s
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        reps = 4
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        best = max(best, reps * 2 * n**3 / dt)
    return best


def peak_flops(device: str | None = None, quick: bool = False) -> tuple[float, str]:
    """(FLOP/s, dtype name) of the dtype the toolkit trains with on ``device``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return measure_matmul_flops(4096 if quick else 8192, torch.bfloat16, "cuda", 0.5 if quick else 2.0), "bf16"
    return measure_matmul_flops(1024 if quick else 2048, torch.float32, "cpu", 0.5 if quick else 2.0), "fp32"


def run(quick: bool = False) -> dict:
    res = {}
    flops, dtype = peak_flops("cpu", quick)
    res["cpu_fp32_gflops"] = flops / 1e9
    if torch.cuda.is_available():
        flops, _ = peak_flops("cuda", quick)
        res["gpu_bf16_tflops"] = flops / 1e12
        torch.backends.cuda.matmul.allow_tf32 = True
        res["gpu_tf32_tflops"] = measure_matmul_flops(8192, torch.float32, "cuda", 1.0) / 1e12
    return res


if __name__ == "__main__":
    print(run())
