"""Pseudo-depth throughput: images/s of Depth-Anything-V2 inference by batch size.

CPU: the tiny random model of the tests (data_formats.md §6) on 64×64 images and the Small
architecture (random weights; speed does not depend on them) at 518 px. GPU (when present): the Small
architecture in fp16 at 518 px. Figures are model forward passes only (preprocessing excluded).
"""

from __future__ import annotations

import time

import torch


def _tiny_model():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(image_size=32, patch_size=16, num_channels=3, hidden_size=4, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=8, out_indices=[1, 2], reshape_hidden_states=False)
    return DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=4, patch_size=16, neck_hidden_sizes=[2, 2],
        fusion_hidden_size=6)).eval()


def _small_model():
    """Depth-Anything-V2-Small's architecture (ViT-S/14 backbone, DPT head 64 features)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12,
                            num_attention_heads=6, intermediate_size=1536, layerscale_value=1.0,
                            out_indices=[3, 6, 9, 12], reshape_hidden_states=False)
    return DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=384, patch_size=14, neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64, head_hidden_size=32)).eval()


@torch.inference_mode()
def images_per_second(model, batch: int, size: int, device: str, dtype: torch.dtype, min_time_s: float) -> float:
    model = model.to(device, dtype)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    model(pixel_values=x)
    if device == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while True:
        model(pixel_values=x)
        n += batch
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= min_time_s:
            return n / dt


def run(quick: bool = False) -> dict:
    t = 0.5 if quick else 2.0
    res = {"cpu_tiny_64px_img_per_s": {b: images_per_second(_tiny_model(), b, 64, "cpu", torch.float32, t)
                                       for b in (1, 4, 16)}}
    res["cpu_small_518px_img_per_s"] = {b: images_per_second(_small_model(), b, 518, "cpu", torch.float32, t)
                                        for b in ((1,) if quick else (1, 4))}
    if torch.cuda.is_available():
        res["gpu_small_518px_fp16_img_per_s"] = {
            b: images_per_second(_small_model(), b, 518, "cuda", torch.float16, t) for b in (1, 8, 32)}
    return res


if __name__ == "__main__":
    print(run())
