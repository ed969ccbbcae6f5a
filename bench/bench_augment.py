"""Loader throughput per worker vs the training step's consumption (is the loader ever the bottleneck?).

**Per worker**: one process with one thread, as a ``DataLoader`` worker
(:func:`pretrain.loader._worker_init`), producing batches with :class:`pretrain.loader.MultiCropBatches`
— shard read (``SampleTable.read``), nearness normalisation of the full map, 2 × 224 + 8 × 98 depth
crops, collation and iBOT masks — from shards of the paper's split-B sources at their converted frame
sizes (MVTec 3D-AD 800², Eyecandies 512², Real-IAD D³ 584 × 1024), weighted by the split-B mix
(4,147 : 15,500 : 4,249 samples). Two variants, each in a fresh process:

* ``before``: the straightforward numpy crops and normalisation (the code of commit 2c64201, loaded from
  the git history by ``bench/frozen.py``) and glibc's default allocator settings — the loader as it was;
* ``after``: :mod:`pretrain.augment`, :func:`shared.depth.normalize_depth` and
  :func:`shared.memory.keep_freed_memory` — the loader now.

* ``device``: the loader of ``aug.warp_on=device`` (issue 21): the worker reads, normalises, draws the
  crop parameters (redraw decisions from validity alone, :func:`pretrain.augment.depth_crop_params`)
  and packs the maps (:func:`pretrain.device_augment.pack_sources`); the warp runs on the training
  device. Its cost is measured separately on CPU torch (one thread, ``warp_s_per_sample``) and, on a
  CUDA machine, on the GPU.

The current normalised maps and crops are checked to be bit-identical to the reference ones on the
benchmark samples, and the device path's crops (CPU torch) to the numpy path's.
A per-stage split (read / normalise / crops, ``after``; read / normalise / params / pack, ``device``)
is reported too.

**Consumption** (samples/s the step eats):

* this machine: the step at the CPU MFU target (35 % of the fp32 matmul peak measured here) —
  ``bench_pretrain`` measures the real step;
* a 16-core GPU node (estimate, no GPU measured unless CUDA is present): the step at the GPU MFU
  target, 40 % of the bf16 dense matmul peak — the measured one on a CUDA machine, else H100 SXM's
  989 TFLOP/s spec figure (a real matmul reaches ~70–80 % of it, so the estimate errs towards a
  faster step, i.e. against the loader). FLOPs per sample from ``FlopCounterMode`` on the default
  model (``bench_pretrain.model_flops_per_sample``).

``ratio`` = workers × per-worker samples/s ÷ consumption, for the default ``train.num_workers`` (8)
and for 15 workers (all but one core of the node); target ≥ 1. Per-worker throughput on the node is
taken as this machine's per-CPU-second rate (this VM is shared: its wall-clock rate is lower).
For the device path the GPU also spends time on the warp: without CUDA that time is **estimated**
from the warp's memory traffic, counted op by op on CPU torch (:func:`warp_memory_traffic`: it is a
chain of gathers and elementwise ops, memory-bound), at 60 % of the H100's spec bandwidth; the
consumption is then that of step + warp. Everything on the node is an **estimate** unless measured there.

    python bench/bench_augment.py [--full]      (or python bench/run.py augment)
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Timer, check, run_worker, with_checks

PAPER_MIX_B = {"mvtec3d": 4147, "eyecandies": 15500, "realiad_d3": 4249}  # dino_depth.md §13, split B
DEFAULT_WORKERS = 8  # train.num_workers (dino_depth.md §17)
NODE_CORES = 16
TARGET_RATIO = 1.0
GPU_MFU_TARGET = 0.40
CPU_MFU_TARGET = 0.35
ASSUMED_GPU_BF16_PEAK = 989e12  # H100 SXM dense bf16 (spec sheet); used only without a CUDA device
ASSUMED_GPU_BANDWIDTH = 3.35e12  # H100 SXM HBM3 bytes/s (spec sheet); used only without a CUDA device
GPU_BANDWIDTH_EFFICIENCY = 0.6  # share of it eager elementwise/gather kernels reach (assumption, conservative)


def _sizes(quick: bool) -> dict:
    if quick:
        return {"mvtec3d": {"hw": (200, 200), "n": 3}, "eyecandies": {"hw": (128, 128), "n": 3},
                "realiad_d3": {"hw": (300, 500), "n": 2}, "batch": 4, "iters": 1, "max_side": 1024}
    # Real-IAD D³ frames are 3040 × 5328; converted at max_side 1024 they are 584 × 1024, as here.
    return {"mvtec3d": {"hw": (800, 800), "n": 8}, "eyecandies": {"hw": (512, 512), "n": 8},
            "realiad_d3": {"hw": (1520, 2664), "n": 6}, "batch": 16, "iters": 3, "max_side": 1024}


def make_shards(root: Path, quick: bool) -> Path:
    """Write the three sources in their on-disk formats and convert them to shards under root/shards."""
    from data_prep import fixtures
    from data_prep.convert import convert

    sz = _sizes(quick)
    fixtures.write_mvtec3d(root / "mvtec3d", categories=("bagel",), hw=sz["mvtec3d"]["hw"],
                           layout={"train": {"good": sz["mvtec3d"]["n"]}})
    fixtures.write_eyecandies(root / "eyecandies", categories=("CandyCane",), hw=sz["eyecandies"]["hw"],
                              counts={"train": sz["eyecandies"]["n"]})
    fixtures.write_realiad_d3(root / "realiad_d3", categories=("pcb",), hw=sz["realiad_d3"]["hw"],
                              n_train=sz["realiad_d3"]["n"], n_test=0)
    out = root / "shards"
    for src in PAPER_MIX_B:
        convert(src, root / src, out, progress=False, max_side=sz["max_side"])
    return out


def _config(shards: Path, source: str):
    from pretrain.config import PretrainConfig
    from shared.config import load_config

    return load_config(PretrainConfig, None, [f"data.shards=[{shards}]", f"data.sources=[{source}]",
                                              "train.output_dir=unused"])


def loader_worker(shards: str, source: str, variant: str, batch: int, iters: int) -> dict:
    """Batches/s of one single-threaded worker process (like ``_worker_init``) for one source. Changes
    process-wide state (allocator settings, or the loader's crop function for ``before``): run it in
    a process of its own (``run`` does)."""
    import torch

    from pretrain import loader
    from shared import memory

    torch.set_num_threads(1)
    if variant == "after":
        kept = memory.keep_freed_memory()  # as loader._worker_init does
    elif variant == "device":
        kept = memory.keep_freed_memory()
    elif variant == "before":
        from bench.frozen import reference_depth_multicrop, reference_normalize_depth

        loader.depth_multicrop = reference_depth_multicrop  # the loader as it was (from the git history)
        loader.normalize_depth = reference_normalize_depth
        kept = False
    else:
        raise ValueError(f"unknown variant {variant!r}")
    cfg = _config(Path(shards), source)
    table = loader.open_sample_table(cfg)
    dataset = loader.MultiCropBatches(cfg, table, batch, warp="device" if variant == "device" else "numpy")
    dataset[0]  # warm-up: imports, page cache, allocator
    with Timer() as t:
        batches = [dataset[i] for i in range(1, 1 + iters)]
    n = batch * iters
    out = {"source": source, "variant": variant, "samples": n, "wall_s_per_sample": t.wall / n,
           "cpu_s_per_sample": t.cpu / n, "malloc_kept": kept, "frame": list(table.read(0)[0].shape)}
    if variant == "after":
        out["stages_ms"] = stage_split(cfg, table, dataset, n)
    if variant == "device":
        from pretrain.device_augment import warp_batch

        out["bytes_per_sample"] = sum(b["sources"].numel() * 5 for b in batches) / n  # float32 + bool
        warp_batch(batches[0], cfg.aug.interp, cfg.aug.edge_thresh)  # warm-up
        with Timer() as tw:
            for b in batches:
                warp_batch(b, cfg.aug.interp, cfg.aug.edge_thresh)
        out["warp_cpu_s_per_sample"] = tw.cpu / n  # the warp on CPU torch, one thread
        out["warp_traffic_per_sample"] = warp_memory_traffic(batches[0], cfg) / batch
        out["stages_ms"] = device_stage_split(cfg, table, dataset, n)
    return out


def warp_memory_traffic(batch: dict, cfg) -> float:
    """Bytes the eager warp reads and writes, summed over its torch ops (inputs + outputs; a gather
    counts its indices and result, not the whole map). The warp is a chain of elementwise ops and
    gathers, memory-bound on a GPU: bytes ÷ bandwidth estimates its GPU time."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from pretrain.device_augment import warp_batch

    total = [0]

    def nbytes(tensors) -> int:  # a broadcast (expanded) input is read from its storage, not per element
        return sum(min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
                   for t in tree_flatten(tensors)[0] if isinstance(t, torch.Tensor))

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.startswith("index.") or func.__name__.startswith("index_"):
                total[0] += nbytes(args[1:]) + nbytes(out)  # indices + gathered values
            elif not func.__name__.startswith(("empty", "arange", "zeros", "lift_fresh", "_to_copy", "detach")):
                total[0] += nbytes(args) + nbytes(kwargs) + nbytes(out)
            return out

    with Count():
        warp_batch(batch, cfg.aug.interp, cfg.aug.edge_thresh)
    return float(total[0])


def device_path_identical(shards: Path, sources, batch: int = 3) -> bool:
    """The device path's batches (warped on CPU torch) == the numpy path's, bit for bit."""
    from pretrain.device_augment import warp_batch
    from pretrain.loader import MultiCropBatches, open_sample_table

    for source in sources:
        cfg = _config(shards, source)
        table = open_sample_table(cfg)
        a = MultiCropBatches(cfg, table, batch)[0]
        b = warp_batch(MultiCropBatches(cfg, table, batch, warp="device")[0], cfg.aug.interp, cfg.aug.edge_thresh)
        for key in ("global_crops", "local_crops"):
            if a[key].numpy().tobytes() != b[key].numpy().tobytes():
                return False
        if a["keys"] != b["keys"]:
            return False
    return True


def gpu_warp_s_per_sample(shards: Path, quick: bool) -> float | None:
    """Seconds of CUDA time per sample of the warp (synchronised, after a warm-up); None without CUDA."""
    import torch

    from pretrain.device_augment import warp_batch
    from pretrain.loader import MultiCropBatches, open_sample_table

    if not torch.cuda.is_available():
        return None
    cfg = _config(shards, "mvtec3d")
    batch = MultiCropBatches(cfg, open_sample_table(cfg), 4 if quick else 16, warp="device")[0]
    on_gpu = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    warp_batch(on_gpu, cfg.aug.interp, cfg.aug.edge_thresh)
    torch.cuda.synchronize()
    reps = 3 if quick else 10
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        warp_batch(on_gpu, cfg.aug.interp, cfg.aug.edge_thresh)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 1e3 / (reps * batch["batch_size"])


def _stage_split(cfg, table, dataset, n: int, crop_stages) -> dict:
    """Milliseconds (CPU) per sample of read / normalise / each of ``crop_stages`` (name, fn(prepared, q)),
    sample by sample as the loader does (nothing is kept between samples)."""
    from pretrain.loader import prepare_sample

    spent = {"read": 0.0, "normalise": 0.0, **{name: 0.0 for name, _ in crop_stages}}
    for q in range(n):
        t0 = time.process_time()
        raw, meta = table.read(dataset.order(q))
        t1 = time.process_time()
        prepared = prepare_sample(cfg, raw, meta)
        spent["read"] += t1 - t0
        spent["normalise"] += time.process_time() - t1
        state = {}
        for name, fn in crop_stages:
            t = time.process_time()
            if prepared is not None:
                fn(prepared, q, state)
            spent[name] += time.process_time() - t
        del raw, prepared
    return {k: 1e3 * v / n for k, v in spent.items()}


def stage_split(cfg, table, dataset, n: int) -> dict:
    """Read / normalise / crops of the numpy path (current implementation)."""
    from pretrain.augment import depth_multicrop
    from pretrain.loader import _AUG_STREAM, _rng

    def crops(prepared, q, _state):
        depth_multicrop(prepared[0][0], prepared[1], cfg.crops, cfg.aug, _rng(cfg.train.seed, _AUG_STREAM, q))

    return _stage_split(cfg, table, dataset, n, [("crops", crops)])


def device_stage_split(cfg, table, dataset, n: int) -> dict:
    """The device path's worker: read / normalise / crop parameters (with the validity-only redraw
    decisions) / packing into the batch buffers."""
    from pretrain.augment import depth_crop_params
    from pretrain.device_augment import pack_sources
    from pretrain.loader import _AUG_STREAM, _rng

    def params(prepared, q, state):
        state["params"] = depth_crop_params(prepared[1], cfg.crops, cfg.aug, _rng(cfg.train.seed, _AUG_STREAM, q))

    def pack(prepared, _q, state):
        g, loc = state["params"]
        pack_sources([prepared[0][0]], [prepared[1]], [g], [loc], cfg.crops.global_crops_size,
                     cfg.crops.local_crops_size)

    return _stage_split(cfg, table, dataset, n, [("params", params), ("pack", pack)])


def bit_identical(shards: Path, sources, n: int = 3) -> bool:
    """Current normalised maps and crops == the reference ones (values and validity, bit for bit) on the
    benchmark samples."""
    from bench.frozen import reference_depth_multicrop, reference_normalize_depth
    from pretrain.augment import depth_multicrop
    from pretrain.loader import _AUG_STREAM, _rng, open_sample_table, prepare_sample

    for source in sources:
        cfg = _config(shards, source)
        table = open_sample_table(cfg)
        for i in range(min(n, len(table))):
            raw, meta = table.read(i)
            ref_x, ref_valid, _ = reference_normalize_depth(raw, meta["kind"])
            p = prepare_sample(cfg, raw, meta)
            if p is None:
                continue
            if p[0][0].tobytes() != ref_x.tobytes() or not np.array_equal(p[1], ref_valid):
                return False
            a = depth_multicrop(p[0][0], p[1], cfg.crops, cfg.aug, _rng(1, _AUG_STREAM, i))
            b = reference_depth_multicrop(p[0][0], p[1], cfg.crops, cfg.aug, _rng(1, _AUG_STREAM, i))
            for x, y in ((a.global_crops, b.global_crops), (a.local_crops, b.local_crops),
                         (a.global_valid, b.global_valid), (a.local_valid, b.local_valid)):
                if x.tobytes() != y.tobytes():
                    return False
    return True


def mix_rate(rows: list[dict], key: str) -> float:
    """Samples/s of the split-B mix from per-source seconds per sample."""
    per = {r["source"]: r[key] for r in rows}
    total = sum(PAPER_MIX_B.values())
    return 1.0 / (sum(PAPER_MIX_B[s] * per[s] for s in PAPER_MIX_B) / total)


def run(quick: bool = True) -> dict:
    import torch

    from bench.bench_matmul import peak_flops
    from bench.bench_pretrain import model_flops_per_sample

    sz = _sizes(quick)
    result: dict = {"quick": quick, "batch": sz["batch"]}
    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        shards = make_shards(Path(tmp), quick)
        result["bit_identical_to_reference"] = bit_identical(shards, PAPER_MIX_B, 2 if quick else 3)
        result["device_path_bit_identical"] = device_path_identical(shards, PAPER_MIX_B, 2 if quick else 3)
        gpu_warp = gpu_warp_s_per_sample(shards, quick)
        rows = {v: [] for v in ("before", "after", "device")}
        for source in PAPER_MIX_B:
            for variant in ("before", "after", "device"):
                rows[variant].append(run_worker("bench.bench_augment", [
                    "--shards", str(shards), "--source", source, "--variant", variant,
                    "--batch", str(sz["batch"]), "--iters", str(sz["iters"])]))
    for r in rows["after"]:
        result[r["source"]] = {
            "frame": "x".join(map(str, r["frame"])),
            "after_ms_per_sample_cpu": round(1e3 * r["cpu_s_per_sample"], 2),
            "before_ms_per_sample_cpu": round(1e3 * next(b["cpu_s_per_sample"] for b in rows["before"]
                                                         if b["source"] == r["source"]), 2),
            "stages_ms_cpu": {k: round(v, 2) for k, v in r["stages_ms"].items()}}
    for r in rows["device"]:
        result[r["source"]]["device_worker_ms_per_sample_cpu"] = round(1e3 * r["cpu_s_per_sample"], 2)
        result[r["source"]]["device_stages_ms_cpu"] = {k: round(v, 2) for k, v in r["stages_ms"].items()}
        result[r["source"]]["warp_ms_per_sample_cpu_torch"] = round(1e3 * r["warp_cpu_s_per_sample"], 2)
        result[r["source"]]["host_to_device_mb_per_sample"] = round(r["bytes_per_sample"] / 1e6, 2)
    per_worker = {v: {"wall": mix_rate(rows[v], "wall_s_per_sample"), "cpu": mix_rate(rows[v], "cpu_s_per_sample")}
                  for v in rows}
    warp_cpu_rate = mix_rate(rows["device"], "warp_cpu_s_per_sample")  # samples/s of the warp, 1 core, CPU torch
    result["warp_cpu_torch_samples_per_s_per_core"] = round(warp_cpu_rate, 2)
    mix_bytes = 1.0 / mix_rate(rows["device"], "bytes_per_sample")  # split-B weighted mean
    mix_traffic = 1.0 / mix_rate(rows["device"], "warp_traffic_per_sample")
    result["per_worker_samples_per_s"] = {v: {k: round(x, 2) for k, x in d.items()} for v, d in per_worker.items()}
    result["speedup_after_vs_before_cpu"] = round(per_worker["after"]["cpu"] / per_worker["before"]["cpu"], 2)
    result["malloc_kept"] = rows["after"][0]["malloc_kept"]

    flops = model_flops_per_sample()
    cpu_peak, _ = peak_flops("cpu", quick)
    if torch.cuda.is_available():
        gpu_peak, _ = peak_flops("cuda", quick)
        gpu_peak_src = f"measured ({torch.cuda.get_device_name(0)})"
    else:
        gpu_peak, gpu_peak_src = ASSUMED_GPU_BF16_PEAK, "assumed: H100 SXM dense bf16 spec, no GPU measured"
    cpu_step = CPU_MFU_TARGET * cpu_peak / flops
    gpu_step = GPU_MFU_TARGET * gpu_peak / flops
    rate = per_worker["after"]["cpu"]
    device_rate = per_worker["device"]["cpu"]
    # GPU seconds per sample of the warp: measured on CUDA, else its memory traffic (counted op by op)
    # at GPU_BANDWIDTH_EFFICIENCY of the H100's spec bandwidth — an estimate.
    result["warp_memory_traffic_mb_per_sample"] = round(mix_traffic / 1e6, 1)
    if gpu_warp is not None:
        warp_gpu_s, warp_src = gpu_warp, "measured on CUDA"
    else:
        warp_gpu_s = mix_traffic / (GPU_BANDWIDTH_EFFICIENCY * ASSUMED_GPU_BANDWIDTH)
        warp_src = (f"estimate: {mix_traffic / 1e6:.0f} MB of eager-op traffic per sample at "
                    f"{GPU_BANDWIDTH_EFFICIENCY:.0%} of {ASSUMED_GPU_BANDWIDTH / 1e12:.2f} TB/s (H100 SXM HBM3)")
    result["consumption"] = {
        "gflop_per_sample": round(flops / 1e9, 1),
        "cpu_matmul_peak_gflops": round(cpu_peak / 1e9, 1),
        "cpu_step_samples_per_s_at_target": round(cpu_step, 3),
        "gpu_bf16_peak_tflops": round(gpu_peak / 1e12, 1), "gpu_peak_source": gpu_peak_src,
        "gpu_step_samples_per_s_at_target": round(gpu_step, 1),
    }
    workers_needed = math.ceil(gpu_step / rate)
    result["gpu_node_workers_needed"] = workers_needed
    result["gpu_node_ratio_by_workers"] = {w: round(w * rate / gpu_step, 3)
                                           for w in (DEFAULT_WORKERS, NODE_CORES - 1)}
    # Device path: the GPU does step + warp for each sample, so it consumes fewer samples/s.
    device_step = 1.0 / (1.0 / gpu_step + warp_gpu_s)
    result["device_path"] = {
        "worker_samples_per_s_per_core": round(device_rate, 1),
        "warp_gpu_ms_per_sample": round(1e3 * warp_gpu_s, 4), "warp_gpu_source": warp_src,
        "gpu_step_plus_warp_samples_per_s": round(device_step, 1),
        "warp_share_of_gpu_time": round(warp_gpu_s * device_step, 4),
        "host_to_device_mb_per_sample": round(mix_bytes / 1e6, 2),
        "host_to_device_gb_per_s_at_consumption": round(mix_bytes * device_step / 1e9, 2),
        "workers_needed": math.ceil(device_step / device_rate),
        "ratio_by_workers": {w: round(w * device_rate / device_step, 3) for w in (DEFAULT_WORKERS, NODE_CORES - 1)},
    }
    # This machine: one loader worker (wall clock, as loaded as it is) vs the CPU step at its target.
    cpu_ratio = per_worker["after"]["wall"] / cpu_step
    checks = [
        check(f"loader/step, GPU node estimate, {DEFAULT_WORKERS} workers (default)",
              DEFAULT_WORKERS * rate / gpu_step, TARGET_RATIO,
              note=f"step at {GPU_MFU_TARGET:.0%} of {gpu_peak / 1e12:.0f} TFLOP/s ({gpu_peak_src})"),
        check(f"loader/step, GPU node estimate, {NODE_CORES - 1} workers", (NODE_CORES - 1) * rate / gpu_step,
              TARGET_RATIO),
        check(f"loader/step, GPU node estimate, device warp, {DEFAULT_WORKERS} workers (default)",
              DEFAULT_WORKERS * device_rate / device_step, TARGET_RATIO,
              note=f"step + warp on the GPU; warp {warp_src}"),
        check("device-path crops (CPU torch) bit-identical to the numpy path", float(result["device_path_bit_identical"]),
              1.0),
        check("loader/step, this CPU, 1 worker", cpu_ratio, TARGET_RATIO,
              note=f"step at {CPU_MFU_TARGET:.0%} of the measured fp32 matmul peak"),
        check("normalised maps + crops bit-identical to the reference (before)",
              float(result["bit_identical_to_reference"]),
              1.0),
    ]
    return with_checks(result, checks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="realistic frame sizes (default: quick)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(loader_worker(args.shards, args.source, args.variant, args.batch, args.iters)))
        return 0
    res = run(quick=not args.full)
    print(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

