"""DINO-Depth pretraining step: model FLOP/s against the machine's matmul peak (MFU), tokens/s, memory.

The full training step of :class:`pretrain.train.Trainer` (``train_step``): teacher forward on the two
global crops, student forward on 2 global (masked) + 8 local crops, DINO head (K = 65,536) and iBOT
head, DINO + iBOT + KoLeo losses, backward, per-module gradient clipping, AdamW, EMA, centering — the
default configuration (ViT-S/14 on 1-channel depth, 2 × 224 + 8 × 98 crops). Batches are built before
timing (the loader's job, see ``bench_augment``).

* **FLOPs**: counted by ``torch.utils.flop_counter.FlopCounterMode`` on the warm-up step (matmuls,
  convolutions, attention; forward and backward) — the model FLOPs of MFU. Elementwise work, the
  optimizer and the EMA are not counted (they are the overhead MFU measures).
* **MFU** = FLOPs / step time / matmul peak, the peak measured in the same run (``bench_matmul``:
  fp32 on CPU, bf16 on CUDA; the step runs in bf16 autocast on CUDA, fp32 on CPU). Targets: CPU ≥ 35 %,
  GPU ≥ 40 %. Because this CPU is shared, the CPU-time MFU (FLOPs / process CPU seconds × threads,
  against the matmul's own CPU-time rate) is reported too: it does not depend on other load.
* **tokens/s**: ViT tokens per second through the student (2 × 257 + 8 × 50 per sample) and
  samples/s.
* **memory vs batch**: every batch size in a fresh process. CUDA: ``torch.cuda.max_memory_allocated``;
  CPU: peak RSS (model, optimizer state and activations; the process baseline before building the
  trainer is subtracted), with a linear fit (bytes per sample).
* **profile** (when the MFU target is missed, full mode): ``torch.profiler`` breakdown of one step
  into matmul / attention / optimizer+EMA / other operators.

    python bench/bench_pretrain.py [--full] [--device cpu|cuda]      (or python bench/run.py pretrain)
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import os
import statistics
import tempfile

import torch

from bench.common import Timer, check, current_rss_bytes, device, linear_fit, run_worker, sync, with_checks

TARGET_MFU = {"cpu": 0.35, "cuda": 0.40}
# The tiny model of the smoke tests (quick mode on CPU): same code path, seconds per step.
TINY_MODEL = {
    "student.img_size": 56, "student.embed_dim": 96, "student.depth": 4, "student.num_heads": 3,
    "dino.head_n_prototypes": 256, "dino.head_bottleneck_dim": 32, "dino.head_hidden_dim": 128,
    "crops.global_crops_size": 56, "crops.local_crops_size": 28, "crops.local_crops_number": 4,
}


def sizes(dev: str, quick: bool) -> dict:
    """Batch sizes: the timed one and the memory sweep (the largest sweep entry is the timed one)."""
    if dev.startswith("cuda"):
        return {"batches": [16, 32] if quick else [16, 32, 64, 128], "steps": 3 if quick else 10, "warmup": 2}
    if quick:
        return {"batches": [2, 4], "steps": 2, "warmup": 1, "tiny": True}
    # ViT-S/14 at 166 GFLOP per sample is ~8 s per sample on a 2-core CPU: B = 2, 4, 8 (one step each
    # for memory) and two timed steps of B = 8 after the counted one keep this to ~4 minutes.
    return {"batches": [2, 4, 8], "steps": 2, "warmup": 0}


def overrides(batch: int, dev: str, out_dir: str, tiny: bool) -> dict:
    ov = {"train.batch_size_per_gpu": batch, "train.num_workers": 0, "train.progress": False,
          "train.eval_period": 0, "train.export_period": 0, "train.ckpt_period": 0, "train.log_period": 10**6,
          "train.device": dev, "train.output_dir": out_dir}
    if tiny:
        ov.update(TINY_MODEL)
    return ov


def build_trainer(batch: int, dev: str, out_dir: str, tiny: bool = False):
    from bench.bench_distributed import SyntheticTable
    from pretrain.config import PretrainConfig
    from pretrain.train import Trainer
    from shared.config import load_config

    cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides(batch, dev, out_dir, tiny).items()])
    side = 2 * cfg.crops.global_crops_size
    return Trainer(cfg, table=SyntheticTable(max(8, batch), size=(side, side)))


def tokens_per_sample(cfg) -> int:
    """ViT tokens through the student per sample: patches + cls (+ registers) of every crop."""
    p = cfg.student.patch_size
    extra = 1 + getattr(cfg.student, "num_register_tokens", 0)
    g = (cfg.crops.global_crops_size // p) ** 2 + extra
    loc = (cfg.crops.local_crops_size // p) ** 2 + extra
    return 2 * g + cfg.crops.local_crops_number * loc


def model_flops_per_sample(cfg=None, masked_per_sample: float | None = None) -> float:
    """Model FLOPs of one training step per sample, counted on the meta device (no compute): teacher
    forward (2 globals, heads on cls + masked patches), student forward + backward (2 masked globals,
    the locals, heads). ``masked_per_sample``: iBOT-masked patches per sample (default: the mean of
    the configured mask plan)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.config import PretrainConfig
    from pretrain.ssl_model import SSLModel
    from shared.config import load_config

    if cfg is None:
        cfg = load_config(PretrainConfig, None, ["train.output_dir=unused"])
    B = 2
    S, s, n = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    n_patches = (S // cfg.student.patch_size) ** 2
    if masked_per_sample is None:
        masked_per_sample = mean_masked_patches(cfg)
    m = max(1, round(masked_per_sample * B))
    with torch.device("meta"):
        student = SSLModel(cfg.vit_config(), cfg)
        teacher = SSLModel(cfg.vit_config(teacher=True), cfg)
        c = cfg.student.in_chans
        g = torch.zeros(2 * B, c, S, S)
        loc = torch.zeros(n * B, c, s, s)
        masks = torch.zeros(2 * B, n_patches, dtype=torch.bool)
        idx = torch.zeros(m, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher.teacher_logits(g, idx)
        out = student(g, loc, masks, idx)
        (out["cls_logits"].sum() + out["patch_logits"].sum() + out["cls_global"].sum()).backward()
    return counter.get_total_flops() / B


def mean_masked_patches(cfg, batch: int = 128, iterations: int = 4) -> float:
    """Mean iBOT-masked patches per sample (both global crops) of the configured mask plan."""
    from pretrain.masking import assign_masks

    side = cfg.crops.global_crops_size // cfg.student.patch_size
    total = 0
    for it in range(iterations):
        masks = assign_masks(it, cfg.train.seed, batch, (side, side), 0, 1, cfg.ibot.mask_sample_probability,
                             tuple(cfg.ibot.mask_ratio_min_max))
        total += int(masks.sum())
    return total / (iterations * batch)


def matmul_reference(dev: str, seconds: float = 2.0, n: int | None = None) -> tuple[float, float]:
    """(matmul FLOP/s wall, matmul FLOP per CPU-second) of the training dtype on ``dev``."""
    from bench.bench_matmul import measure_matmul_flops

    with Timer() as t:
        flops = measure_matmul_flops(n or (2048 if dev == "cpu" else 8192),
                                     torch.float32 if dev == "cpu" else torch.bfloat16, dev, seconds)
    return flops, flops * t.wall / max(t.cpu, 1e-9)


def step_worker(batch: int, dev: str, steps: int, warmup: int, tiny: bool, profile_below: float | None,
                matmul_n: int | None = None, matmul_seconds: float = 2.0) -> dict:
    """One batch size in this process: FLOPs (first step, which is also a warm-up), ``warmup`` more
    untimed steps, ``steps`` timed steps, peak memory; with timed steps also the matmul reference
    (measured before and after them) and — when ``profile_below`` is given and the MFU is below it —
    a torch.profiler breakdown of one more step."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import peak_rss_bytes, reset_peak_rss

    torch.manual_seed(0)
    reset_peak_rss()  # imports may have peaked higher than the step will
    base_rss = current_rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(batch, dev, tmp, tiny)
        n_batches = 1 + (warmup + steps if steps else 0)
        batches = [trainer.dataset[i] for i in range(n_batches)]
        trainer.student.train()
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batches[0], 0)
            sync(dev)
        flops = counter.get_total_flops()
        out = {"batch": batch, "flops_per_step": flops, "masked_patches_per_step": int(batches[0]["mask_indices"].numel()),
               "tokens_per_sample": tokens_per_sample(trainer.cfg), "threads": torch.get_num_threads()}
        wall, cpu = [], []
        if steps:
            before = matmul_reference(dev, matmul_seconds, matmul_n)
            for i in range(1, n_batches):
                sync(dev)
                with Timer() as t:
                    trainer.train_step(batches[i], i)
                    sync(dev)
                if i > warmup:
                    wall.append(t.wall)
                    cpu.append(t.cpu)
            after = matmul_reference(dev, matmul_seconds, matmul_n)
            out.update(step_s=statistics.median(wall), step_cpu_s=statistics.median(cpu),
                       matmul_flops_before=before[0], matmul_flops_after=after[0],
                       matmul_flops_per_cpu_s=max(before[1], after[1]))
        if dev.startswith("cuda"):
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        else:
            out["peak_bytes"] = peak_rss_bytes() - base_rss
        if steps and profile_below is not None and mfus(out, dev)["mfu"] < profile_below:
            out["profile"] = profile_step(trainer, batches[-1], n_batches, dev)
        del trainer, batches
    return out


def mfus(row: dict, dev: str) -> dict:
    """MFU figures of a timed worker row. Wall: FLOP/s of the step / the larger matmul peak measured
    just before and after the steps (conservative). CPU time (CPU only): FLOPs per CPU-second of the
    step / matmul FLOPs per CPU-second — independent of how much of the cores other processes took."""
    peak = max(row["matmul_flops_before"], row["matmul_flops_after"])
    out = {"wall_mfu": row["flops_per_step"] / row["step_s"] / peak, "matmul_peak": peak}
    if dev.startswith("cuda"):
        out["mfu"] = out["wall_mfu"]
    else:
        out["cpu_time_mfu"] = row["flops_per_step"] / row["step_cpu_s"] / row["matmul_flops_per_cpu_s"]
        out["mfu"] = out["cpu_time_mfu"]
    return out


def profile_step(trainer, batch: dict, it: int, dev: str) -> dict:
    """Share of one step's operator self-time by category (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        trainer.train_step(batch, it)
        sync(dev)
    cats = {"matmul": 0.0, "attention": 0.0, "optimizer_ema_clip": 0.0, "elementwise_norm_other": 0.0}
    use_cuda = dev.startswith("cuda")
    total = 0.0
    for evt in prof.key_averages():
        t = (evt.self_device_time_total if use_cuda else evt.self_cpu_time_total) / 1e6
        if t <= 0:
            continue
        name = evt.key
        if name.startswith(("Optimizer.", "ProfilerStep")):  # wrappers: children carry the time
            continue
        total += t
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
                    "aten::mkldnn_convolution", "aten::convolution_backward") or "gemm" in name.lower():
            cats["matmul"] += t
        elif "attention" in name or "flash" in name or "sdpa" in name.lower():
            cats["attention"] += t
        elif name.startswith("aten::_foreach") or name in ("aten::lerp_", "aten::addcdiv_", "aten::addcmul_",
                                                          "aten::_fused_adamw_", "aten::sqrt", "aten::_fused_adam_"):
            cats["optimizer_ema_clip"] += t
        else:
            cats["elementwise_norm_other"] += t
    top = sorted(((e.key, (e.self_device_time_total if use_cuda else e.self_cpu_time_total) / 1e6)
                  for e in prof.key_averages()), key=lambda kv: -kv[1])[:8]
    return {"total_s": round(total, 3), "share": {k: round(v / total, 3) for k, v in cats.items()} if total else {},
            "top_ops_s": {k: round(v, 3) for k, v in top}}


def run(quick: bool = True) -> dict:
    dev = device()
    sz = sizes(dev, quick)
    tiny = bool(sz.get("tiny"))
    target = TARGET_MFU["cuda" if dev.startswith("cuda") else "cpu"]
    rows = []
    for i, b in enumerate(sz["batches"]):
        timed = i == len(sz["batches"]) - 1
        args = ["--batch", str(b), "--device", dev, "--steps", str(sz["steps"] if timed else 0),
                "--warmup", str(sz["warmup"] if timed else 0)]
        if tiny:
            args.append("--tiny")
        if timed and not quick:
            args += ["--profile-below", str(target)]
        rows.append(run_worker("bench.bench_pretrain", args))
    main = rows[-1]
    B = main["batch"]
    m = mfus(main, dev)
    result: dict = {
        "device": dev, "model": "tiny (smoke test)" if tiny else "ViT-S/14, K=65536, 2x224 + 8x98",
        "precision": "bf16 autocast" if dev.startswith("cuda") else "fp32",
        "batch": B, "step_s": round(main["step_s"], 3),
        "gflop_per_sample": round(main["flops_per_step"] / B / 1e9, 2),
        "achieved_gflops": round(main["flops_per_step"] / main["step_s"] / 1e9, 2),
        "matmul_peak_gflops": round(m["matmul_peak"] / 1e9, 2),
        "matmul_peak_gflops_before_after": [round(main["matmul_flops_before"] / 1e9, 2),
                                            round(main["matmul_flops_after"] / 1e9, 2)],
        "mfu_wall": round(m["wall_mfu"], 4),
        "samples_per_s": round(B / main["step_s"], 3),
        "tokens_per_s": round(B * main["tokens_per_sample"] / main["step_s"], 1),
        "threads": main["threads"],
    }
    if "cpu_time_mfu" in m:
        result["mfu_cpu_time"] = round(m["cpu_time_mfu"], 4)
        result["step_cpu_s"] = round(main["step_cpu_s"], 2)
    mem = {r["batch"]: r["peak_bytes"] for r in rows}
    result["peak_memory_mb_by_batch"] = {b: round(v / 2**20, 1) for b, v in mem.items()}
    if len(mem) >= 2:
        fit = linear_fit(list(mem), list(mem.values()))
        result["memory_fit"] = {"fixed_mb": round(fit["intercept"] / 2**20, 1),
                                "mb_per_sample": round(fit["slope"] / 2**20, 2), "r2": round(fit["r2"], 4)}
    if "profile" in main:
        result["profile"] = main["profile"]
    how = ("wall clock" if dev.startswith("cuda") else
           "CPU time: FLOPs per CPU-second of the step / of the fp32 matmul, same process (shared machine)")
    checks = [check(f"pretrain step MFU ({dev}, B={B})", m["mfu"], target,
                    note=f"model FLOPs (FlopCounterMode) / step / matmul peak; {how}")]
    return with_checks(result, checks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="ViT-S at B = 2, 4, 8 (default: quick, tiny model)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: $BENCH_DEVICE, else auto)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-below", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device:
        os.environ["BENCH_DEVICE"] = args.device
    if args.worker:
        print(json.dumps(step_worker(args.batch, device(), args.steps, args.warmup, args.tiny, args.profile_below)))
        return 0
    print(json.dumps(run(quick=not args.full), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
