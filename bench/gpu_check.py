"""One command that runs every CUDA path of the toolkit and writes one JSON of figures (issue 21).

On a CUDA machine (≤ ~8 min on one H100), in this order, each step timed and recorded as ok / failed /
skipped (with the reason), a failing step never stopping the others:

1. ``pytest_gpu``       the GPU-marked tests (``pytest -m gpu``) and the CUDA cases of the reliability
                        numerics;
2. ``device_augment``   the depth crops warped on the GPU vs CPU torch (max ulp, validity equal; target
                        ≤ 2 ulp) and their cost (CUDA-event ms per sample, split-B-like map sizes);
3. ``xformers``         ViT-S/14 forward with SDPA vs xformers (when probed working): max difference,
                        ms per batch each;
4. ``compile``          ``torch.compile`` of the ViT-S/14: forward + backward vs eager (max difference),
                        compile seconds, ms per step each;
5. ``pseudo_depth``     Depth-Anything-V2-Small architecture (random weights) at 518² in fp32 and bf16:
                        images/s and the bf16 output's error relative to fp32;
6. ``table8``           ``bench/bench_table8.py``: 36 views at 896², bf16 and fp32/TF32, ms per instance;
7. ``train_*``          pretraining through its public entry (``python -m pretrain.train --config ...
                        key=value``, and ``torchrun --nproc_per_node=1`` for DDP / FSDP2) with the real
                        ViT-S/14 recipe (K = 65,536) in bf16 on synthetic 800² depth maps: a few steps, a
                        checkpoint, resumed to the end (round trip) with the export loaded back; fp16;
                        deterministic; data time vs step time from ``metrics.jsonl`` (the real loader).

``--dry-run`` runs the same sequence at toy sizes on the CPU (no CUDA needed, figures meaningless): it
is what CI's slow suite runs (``tests/test_gpu_check.py``). Without CUDA and without ``--dry-run`` the
command refuses to start.

    python bench/gpu_check.py [--out bench/results_gpu_check.json] [--dry-run] [--only device_augment,table8]
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ULP_TARGET = 2


@dataclass
class Context:
    dry_run: bool
    device: str  # "cuda" or "cpu" (dry run)
    tmp: Path
    timeout_s: float  # per subprocess

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(cmd: list[str], ctx: Context, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=ctx.timeout_s)


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# -- 1. pytest --------------------------------------------------------------------------------------------
def step_pytest_gpu(ctx: Context) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text(errors="replace"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    out = _run(cmd, ctx)
    summary = _tail(out.stdout, 1)
    result = {"files": files, "summary": summary, "returncode": out.returncode}
    if out.returncode != 0:
        raise RuntimeError(f"GPU-marked tests failed:\n{_tail(out.stdout, 30)}")
    reliability = REPO / "tests" / "reliability" / "test_reliability_numerics.py"
    if reliability.is_file() and not ctx.dry_run:  # its CUDA cases are parametrised, not marked
        rel = _run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", str(reliability)], ctx)
        result["reliability_cuda"] = _tail(rel.stdout, 1)
        if rel.returncode not in (0, 5):
            raise RuntimeError(f"CUDA reliability numerics failed:\n{_tail(rel.stdout, 30)}")
    return result


# -- 2. device augmentation ---------------------------------------------------------------------------------
def _synthetic_nearness(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A nearness-normalised map (valid in [0.1, 1], invalid 0) with a step edge and holes."""
    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    x = 0.5 + 0.3 * np.sin(xx / 37.0) * np.cos(yy / 23.0) + 0.1 * rng.standard_normal((H, W)).astype(np.float32)
    x[:, W // 2:] += 0.2
    x = np.clip(x, 0.1, 1.0).astype(np.float32)
    valid = rng.random((H, W)) > 0.05
    valid[: H // 5, : W // 4] = False
    x[~valid] = 0.0
    return x, valid


def step_device_augment(ctx: Context) -> dict:
    from pretrain.augment import depth_crop_params
    from pretrain.config import AugConfig, CropsConfig
    from pretrain.device_augment import pack_sources, warp_batch

    rng = np.random.default_rng(0)
    aug = AugConfig()
    if ctx.dry_run:
        crops, shapes, B = CropsConfig(global_crops_size=56, local_crops_size=28, local_crops_number=2), \
            [(80, 96), (64, 64)], 4
    else:  # split-B-like frames: MVTec 3D-AD 800², Eyecandies 512², Real-IAD D³ 584 × 1024
        crops, shapes, B = CropsConfig(), [(800, 800), (512, 512), (584, 1024)], 32
    maps = [_synthetic_nearness(rng, shapes[k % len(shapes)]) for k in range(B)]
    params = [depth_crop_params(v, crops, aug, np.random.default_rng(k)) for k, (_, v) in enumerate(maps)]
    batch = pack_sources([m for m, _ in maps], [v for _, v in maps], [p[0] for p in params], [p[1] for p in params],
                         crops.global_crops_size, crops.local_crops_size)
    reference = warp_batch(batch, aug.interp, aug.edge_thresh)  # CPU torch (= numpy, bit for bit)
    on_dev = {k: (v.to(ctx.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    result: dict = {"batch": B, "frames": ["x".join(map(str, s)) for s in shapes]}
    ctx.sync()
    if ctx.device == "cuda":  # the warp must never wait for the device
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = warp_batch(on_dev, aug.interp, aug.edge_thresh)
        result["host_syncs"] = 0
    finally:
        if ctx.device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    ctx.sync()
    for kind in ("global", "local"):
        a, b = reference[f"{kind}_crops"], out[f"{kind}_crops"].cpu()
        ulp = (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()
        result[f"{kind}_max_ulp"] = int(ulp.max()) if ulp.numel() else 0
        result[f"{kind}_validity_equal"] = bool(torch.equal(reference[f"{kind}_valid"], out[f"{kind}_valid"].cpu()))
    reps = 2 if ctx.dry_run else 10
    t0 = time.perf_counter()
    for _ in range(reps):
        warp_batch(on_dev, aug.interp, aug.edge_thresh)
    ctx.sync()
    result["warp_ms_per_sample"] = round(1e3 * (time.perf_counter() - t0) / (reps * B), 4)
    result["host_to_device_mb_per_sample"] = round(batch["sources"].numel() * 5 / B / 1e6, 2)
    ok = all(result[f"{k}_max_ulp"] <= ULP_TARGET and result[f"{k}_validity_equal"] for k in ("global", "local"))
    if not ok:
        raise AssertionError(f"device crops differ from CPU beyond {ULP_TARGET} ulp or in validity: {result}")
    return result


# -- 3./4. ViT: xformers, compile ---------------------------------------------------------------------------
def _vit(ctx: Context, **overrides):
    from shared.vit import create_vit

    kw = {"in_chans": 1}
    if ctx.dry_run:
        kw.update(embed_dim=32, depth=2, num_heads=2, img_size=56)
    kw.update(overrides)
    torch.manual_seed(0)
    return create_vit("vit_small_patch14", **kw).to(ctx.device)


def _time_ms(fn: Callable, ctx: Context, reps: int) -> float:
    fn()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    ctx.sync()
    return 1e3 * (time.perf_counter() - t0) / reps


def step_xformers(ctx: Context) -> dict:
    import shared.vit as vit

    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    if not vit.xformers_works(torch.device(ctx.device), dtype):
        reason = "not installed" if vit._xformers_attention is None else f"installed but not usable on {ctx.device}"
        result = {"skipped": f"xformers {reason}"}
    else:
        result = {}
    size, B = (56, 2) if ctx.dry_run else (224, 64)
    x = torch.randn(B, 1, size, size, device=ctx.device)
    sdpa = _vit(ctx, attn_impl="sdpa").eval()
    autocast = torch.autocast(ctx.device, dtype=dtype) if ctx.device == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        ref = sdpa(x)["x_norm_patchtokens"].float()
        result["sdpa_ms"] = round(_time_ms(lambda: sdpa(x), ctx, 3 if ctx.dry_run else 20), 3)
        if "skipped" in result:
            return result
        xf = _vit(ctx, attn_impl="xformers").eval()
        xf.load_state_dict(sdpa.state_dict())
        got = xf(x)["x_norm_patchtokens"].float()
        result["xformers_ms"] = round(_time_ms(lambda: xf(x), ctx, 3 if ctx.dry_run else 20), 3)
    result["max_abs_diff"] = float((got - ref).abs().max())
    if result["max_abs_diff"] > 0.05:
        raise AssertionError(f"xformers and SDPA outputs differ by {result['max_abs_diff']}")
    return result


def step_compile(ctx: Context) -> dict:
    size, B = (56, 2) if ctx.dry_run else (224, 64)
    x = torch.randn(B, 1, size, size, device=ctx.device)
    eager = _vit(ctx).train()
    compiled_model = _vit(ctx).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled_model.compile()
    autocast = (torch.autocast(ctx.device, dtype=torch.bfloat16) if ctx.device == "cuda"
                else contextlib.nullcontext())

    def step(model) -> torch.Tensor:
        with autocast:
            out = model(x)["x_norm_clstoken"].float()
        out.square().mean().backward()
        return out.detach()

    torch.manual_seed(1)
    ref = step(eager)
    t0 = time.perf_counter()
    torch.manual_seed(1)
    got = step(compiled_model)
    ctx.sync()
    result = {"compile_s": round(time.perf_counter() - t0, 2), "max_abs_diff": float((got - ref).abs().max())}
    grads = [(a.grad, b.grad) for a, b in zip(eager.parameters(), compiled_model.parameters()) if a.grad is not None]
    result["max_grad_diff"] = max(float((a - b).abs().max()) for a, b in grads)
    reps = 2 if ctx.dry_run else 10
    result["eager_ms"] = round(_time_ms(lambda: step(eager), ctx, reps), 3)
    result["compiled_ms"] = round(_time_ms(lambda: step(compiled_model), ctx, reps), 3)
    tol = 0.05 if ctx.device == "cuda" else 1e-3  # bf16 on CUDA
    if result["max_abs_diff"] > tol:
        raise AssertionError(f"compiled ViT differs from eager by {result['max_abs_diff']}")
    return result


# -- 5. pseudo-depth ---------------------------------------------------------------------------------------
def step_pseudo_depth(ctx: Context) -> dict:
    from bench.bench_pseudo_depth import _small_model, _tiny_model, images_per_second

    model_fn, size, batch = (_tiny_model, 64, 2) if ctx.dry_run else (_small_model, 518, 8)
    torch.manual_seed(0)
    model = model_fn().to(ctx.device)
    x = torch.rand(batch, 3, size, size, device=ctx.device)
    with torch.inference_mode():
        ref = model(pixel_values=x).predicted_depth.float()
        low = model.to(dtype=torch.bfloat16)(pixel_values=x.to(torch.bfloat16)).predicted_depth.float()
    scale = float(ref.abs().max()) or 1.0
    result = {"size": size, "batch": batch, "bf16_max_rel_error": float((low - ref).abs().max()) / scale}
    t = 0.2 if ctx.dry_run else 3.0
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        result[f"{name}_img_per_s"] = round(images_per_second(model_fn(), batch, size, ctx.device, dtype, t), 2)
    if result["bf16_max_rel_error"] > 0.1:
        raise AssertionError(f"bf16 pseudo-depth is {result['bf16_max_rel_error']:.3f} (relative) from fp32")
    return result


# -- 6. Table 8 --------------------------------------------------------------------------------------------
def step_table8(ctx: Context) -> dict:
    from bench.bench_table8 import PAPER_MS, TARGET_MS, measure_instance

    if ctx.dry_run:
        kwargs = {"n_views": 3, "size": 56, "dev": "cpu", "instances": 1, "tiny": True}
    else:
        kwargs = {"n_views": 36, "size": 896, "dev": "cuda", "instances": 3}
    result: dict = {"paper_ms": PAPER_MS, "target_ms": TARGET_MS}
    for variant in ("bf16", "fp32"):
        result[variant] = measure_instance(variant=variant, **kwargs)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    result["bf16_meets_target"] = result["bf16"]["total_ms"] <= TARGET_MS
    return result


# -- 7. training through the public entry ------------------------------------------------------------------
def _depth_folder(ctx: Context) -> Path:
    folder = ctx.tmp / "depth"
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n, (H, W) = (6, (72, 88)) if ctx.dry_run else (48, (800, 800))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    for i in range(n):  # metric z (mm): tilted plane + bumps + NaN holes
        z = 500 + rng.uniform(-0.2, 0.2) * xx + rng.uniform(-0.2, 0.2) * yy
        for _ in range(3):
            cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.05, 0.2) * min(H, W)
            z -= rng.uniform(-15, 30) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        z[rng.integers(0, H - 10):, : W // 8] = np.nan
        np.save(folder / f"scan_{i:03d}.npy", z.astype(np.float32))
    return folder


def _train_overrides(ctx: Context, run: Path, iterations: int) -> list[str]:
    common = [f"data.glob={_depth_folder(ctx)}/*.npy", f"train.output_dir={run}", "train.progress=false",
              "train.log_period=1", "train.eval_period=0", "train.export_period=0",
              f"train.epoch_length={iterations}", "optim.epochs=1", "optim.warmup_epochs=0.5",
              "optim.freeze_last_layer_epochs=0", "teacher.warmup_teacher_temp_epochs=0.5"]
    if ctx.dry_run:
        return ["--config", str(REPO / "configs/pretrain/tiny_cpu.yaml"), *common, "train.device=cpu",
                "train.batch_size_per_gpu=2", "train.num_workers=1"]
    return ["--config", str(REPO / "configs/pretrain/dinodepth_vits14.yaml"), *common, "train.device=cuda",
            "train.batch_size_per_gpu=32", "train.num_workers=8", "train.precision=bf16"]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if "event" not in r]


def _train(ctx: Context, name: str, extra: list[str], iterations: int = 4, stop_at: int | None = 2,
           launcher: str = "python", env: dict | None = None, resume: bool = True) -> dict:
    """Train ``iterations`` steps through the public entry (first to ``stop_at`` with a checkpoint,
    then resumed to the end: the checkpoint round trip), then load the final export back."""
    run = ctx.tmp / name
    base = _train_overrides(ctx, run, iterations) + extra
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                  "-m", "pretrain.train"]
    else:
        prefix = [sys.executable, "-m", "pretrain.train"]
    legs = ([f"train.stop_at_iteration={stop_at}", f"train.ckpt_period={stop_at}"], []) if stop_at else ([],)
    result: dict = {"iterations": iterations}
    stderr = ""
    for i, leg in enumerate(legs):
        t0 = time.perf_counter()
        out = _run(prefix + base + leg, ctx, env)
        stderr += out.stderr
        result[f"leg{i}_s"] = round(time.perf_counter() - t0, 1)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(prefix[-2:])} exited {out.returncode}:\n{_tail(out.stderr, 25)}")
    match = re.search(r"\(B=\d+ × W=(\d+), (\w+)\)", stderr)
    result["strategy_ran"] = match.group(2) if match else None
    records = _metrics(run)
    result["logged_iterations"] = [r["iteration"] for r in records]
    if sorted(result["logged_iterations"]) != list(range(iterations)):
        raise AssertionError(f"expected iterations 0..{iterations - 1} logged once each across the resume, "
                             f"got {result['logged_iterations']}")
    steady = records[1:] or records
    result["step_s"] = round(float(np.median([r["time_per_iteration"] for r in steady])), 4)
    result["data_s"] = round(float(np.median([r["data_time"] for r in steady])), 4)
    result["data_over_step"] = round(result["data_s"] / result["step_s"], 3) if result["step_s"] else None
    result["final_loss"] = records[-1]["total"]
    if not np.isfinite(result["final_loss"]):
        raise AssertionError(f"non-finite loss {result['final_loss']}")
    export = run / "dinodepth.pth"
    if export.is_file():
        from shared.encoder_export import load_dinodepth

        model, _ = load_dinodepth(export, map_location=ctx.device)
        size = 56 if ctx.dry_run else 224
        with torch.no_grad():
            tokens = model(torch.rand(1, 1, size, size, device=ctx.device))["x_norm_patchtokens"]
        result["export_loaded"] = bool(torch.isfinite(tokens).all())
    else:
        result["export_loaded"] = False
    if not result["export_loaded"]:
        raise AssertionError(f"no usable export at {export}")
    return result


def step_train_single(ctx: Context) -> dict:
    return _train(ctx, "train_single", [])


def step_train_ddp(ctx: Context) -> dict:
    result = _train(ctx, "train_ddp", ["dist.strategy=ddp"], launcher="torchrun")
    if result["strategy_ran"] != "ddp":
        result["note"] = ("one rank ran without a process group (issue 21 item 6: DDP is not exercised at "
                          "world size 1 until the one-rank process group lands in pretrain/train.py)")
    return result


def step_train_fsdp(ctx: Context) -> dict:
    result = _train(ctx, "train_fsdp", ["dist.strategy=fsdp"], launcher="torchrun")
    if result["strategy_ran"] != "fsdp":
        result["note"] = "one rank ran without a process group (issue 21 item 6): FSDP2 not exercised"
    return result


def step_train_fp16(ctx: Context) -> dict:
    return _train(ctx, "train_fp16", ["train.precision=fp16"], stop_at=None, iterations=3)


def step_train_deterministic(ctx: Context) -> dict:
    # cuBLAS needs a fixed workspace for deterministic results (issue 21 item 3: pretrain/train.py should
    # set it itself); set here so the check measures the rest of the deterministic path.
    env = {**_env(), "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")}
    return _train(ctx, "train_deterministic", ["train.deterministic=true"], stop_at=None, iterations=3, env=env)


STEPS: dict[str, Callable[[Context], dict]] = {
    "pytest_gpu": step_pytest_gpu,
    "device_augment": step_device_augment,
    "xformers": step_xformers,
    "compile": step_compile,
    "pseudo_depth": step_pseudo_depth,
    "table8": step_table8,
    "train_single": step_train_single,
    "train_ddp": step_train_ddp,
    "train_fsdp": step_train_fsdp,
    "train_fp16": step_train_fp16,
    "train_deterministic": step_train_deterministic,
}


def run_checks(dry_run: bool, only: list[str] | None = None, timeout_s: float = 600,
               progress: Callable[[str], None] | None = None) -> dict:
    """Run the steps (all, or ``only``) and return the JSON-able record of every result."""
    unknown = sorted(set(only or []) - set(STEPS))
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    cuda = torch.cuda.is_available()
    if not cuda and not dry_run:
        raise RuntimeError("no CUDA device: run on a GPU machine, or use --dry-run for the CPU rehearsal")
    record: dict = {
        "dry_run": dry_run, "device": torch.cuda.get_device_name(0) if cuda and not dry_run else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {},
    }
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(dry_run=dry_run, device="cpu" if dry_run else "cuda", tmp=Path(tmp), timeout_s=timeout_s)
        for name, fn in STEPS.items():
            if only and name not in only:
                continue
            if progress:
                progress(name)
            t0 = time.perf_counter()
            try:
                entry = {"status": "ok", **fn(ctx)}
                if "skipped" in entry:
                    entry["status"] = "skipped"
            except Exception as exc:  # one failing path must not hide the others
                entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": _tail(traceback.format_exc(), 12)}
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            record["steps"][name] = entry
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    record["failed"] = [n for n, e in record["steps"].items() if e["status"] == "failed"]
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results_gpu_check.json"),
                    help="the JSON of figures (default: bench/results_gpu_check.json, git-ignored)")
    ap.add_argument("--dry-run", action="store_true", help="the same sequence at toy sizes on the CPU")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(STEPS)}")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per subprocess (tests, training runs)")
    args = ap.parse_args(argv)
    from shared.io import atomic_write_json

    only = [s for s in args.only.split(",") if s] or None
    try:
        record = run_checks(args.dry_run, only, args.timeout,
                            progress=lambda name: print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True))
    except (RuntimeError, ValueError) as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.out, record)
    for name, entry in record["steps"].items():
        print(f"{name:22s} {entry['status']:8s} {entry['seconds']:7.1f} s  {entry.get('error', entry.get('skipped', ''))}")
    print(f"wrote {args.out}: {len(record['steps']) - len(record['failed'])} ok/skipped, "
          f"{len(record['failed'])} failed, {record['seconds']} s")
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
