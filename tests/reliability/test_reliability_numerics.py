"""Numerical faults: half-precision KoLeo on duplicate embeddings stays finite (values and gradients).

In half precision the KoLeo epsilon underflows and a duplicated row gives −log 0 = inf (upstream
DINOv2's "koleo_loss: inf"); :func:`pretrain.losses.koleo_loss` computes in fp32 with autocast off.
The NaN guard of the trainer is tested in ``test_reliability_pretrain.py`` (a NaN batch).
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.losses import koleo_loss

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
B, D = 8, 384


def _embeddings(case: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=g)
    if case == "one_duplicate":
        x[1] = x[0]
    elif case == "all_identical":  # a collapsed batch
        x[:] = x[0]
    elif case == "duplicate_pairs":
        x[1::2] = x[0::2]
    elif case == "zero_rows":  # norm 0: the normalisation must not divide by zero
        x[2:5] = 0
    elif case == "tiny_norm":  # below the half-precision normal range
        x = x * 1e-6
    elif case == "huge_norm":  # near fp16's maximum (65504): the squared norm overflows in half precision
        x = (x * 1e4).clamp(-6e4, 6e4)
    elif case == "nearly_identical":  # different in fp32, equal after rounding to half precision
        x[1] = x[0] + 1e-5
    return x


CASES = ["one_duplicate", "all_identical", "duplicate_pairs", "zero_rows", "tiny_norm", "huge_norm",
         "nearly_identical"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES)
def test_koleo_is_finite_in_half_precision_on_duplicate_embeddings(device, dtype, case):
    x = _embeddings(case).to(device=device, dtype=dtype).requires_grad_(True)
    assert torch.isfinite(x).all()
    with torch.autocast(device_type=device, dtype=dtype):  # as in the trainer's student forward
        loss = koleo_loss(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss), (case, loss)
    # a duplicate contributes −log(eps·√D + eps) ≈ 15.4 at most: large, finite, bounded
    assert loss.item() <= -math.log(1e-8 * math.sqrt(D) + 1e-8) + 1e-3
    # The gradient is finite where the loss computes it (fp32) ...
    x32 = x.detach().float().requires_grad_(True)
    (grad32,) = torch.autograd.grad(koleo_loss(x32), x32)
    assert torch.isfinite(grad32).all(), case
    # ... and in the half-precision input too, except fp16 zero rows: the normalisation clamp turns
    # them into a gradient ≈ 1e14 that no fp16 number can hold. The fp16 trainer path runs under
    # a GradScaler, which skips such a step and lowers the scale (a skipped step, not divergence).
    loss.backward()
    if not (dtype == torch.float16 and case == "zero_rows"):
        assert torch.isfinite(x.grad.float()).all(), case


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_koleo_in_half_precision_is_the_fp32_value_of_the_rounded_input(dtype):
    x = _embeddings("distinct").to(dtype)
    assert koleo_loss(x).item() == koleo_loss(x.float()).item()


def test_trainer_koleo_on_identical_cls_tokens_is_finite(tmp_path):
    """At initialisation LayerScale 1e-5 makes every cls token the same vector: KoLeo sees nothing but
    duplicates (≈ 15.4 per crop) and must stay finite."""
    import json

    from test_pretrain_utils import memory_table, tiny_config

    from pretrain.train import train

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(tmp_path, **{"train.stop_at_iteration": 1}), table=memory_table(4))
    finally:
        torch.set_num_threads(previous)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(first["koleo"]) and first["koleo"] > 20  # two crops, both in the duplicate regime
    assert math.isfinite(first["total"])
