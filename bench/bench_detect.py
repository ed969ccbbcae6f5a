"""ModMap detection benchmarks (issue 8): scaling in the number of views, mapping-stage FLOP/s, voxel
aggregation throughput and exact V-AUPRO cost.

    python bench/bench_detect.py                       # everything, CPU-sized defaults
    python bench/bench_detect.py --part mapping --views 6,12,24,36 --grid 64 --device cuda   # paper size on a GPU
    python bench/bench_detect.py --part voxel --height 3000 --width 4096
    python bench/bench_detect.py --part aupro --volumes 8 --shape 240,210,225

Parts:

* ``mapping``: per-instance inference (cached tokens → all per-view maps: min-ensembling over every source,
  upsampling, foreground, combination; volume excluded) for each N, each run in a fresh subprocess so
  that its peak memory (CUDA: max allocated; CPU: peak RSS above an idle baseline) is its own. Memory
  should grow linearly in N (the 2N cached maps), time quadratically (N² pairs). The achieved FLOP/s of
  the mapping networks is compared with the machine's dense matmul FLOP/s (``torch.mm`` of 4096² fp32).
* ``voxel``: points/s of the streaming voxel max (:class:`detect.volume.VolumeAccumulator.add_view`)
  vs the straightforward baseline (``shared.geometry.backproject_depth`` + ``np.maximum.at``) on
  one synthetic full-resolution view.
* ``aupro``: exact V-AUPRO (all four limits + V-AUROC from one sort) vs one ``np.argsort`` of the same
  pooled scores.

Results are printed as a table and written to ``--out`` (JSON).
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


# -- mapping stage -----------------------------------------------------------------------------------
def _mapper_flops_per_token(ci: int, cd: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of M_{I→D} + M_{D→I} and the FiLM application, per token."""
    def mlp(i, o):
        h = (i + o) // 2
        return 2 * (i * h + h * h + h * o)

    return mlp(ci, cd) + mlp(cd, ci) + 2 * (ci + cd)


def matmul_flops(device: str, n: int = 4096, reps: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mapping_worker(n_views: int, grid: int, size: int, ci: int, cd: int, device: str, chunk: int) -> dict:
    """One N in this process: returns time and peak memory of the mapping stage."""
    import torch

    from detect.model import ModMap
    from detect.modmap import InferenceSettings, iter_view_maps

    torch.manual_seed(0)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = grid * grid
    image = torch.randn(n_views, t, ci, device=device)
    depth = torch.randn(n_views, t, cd, device=device)
    model = ModMap(n_views, ci, cd).to(device).eval()
    with torch.no_grad():
        model.modulator_image.fc2.weight.normal_(std=0.01)
        model.modulator_depth.fc2.weight.normal_(std=0.01)
    depth_input = torch.ones(size, size)
    depth_input[: size // 8] = 0  # some background
    settings = InferenceSettings(source_chunk=chunk)
    # warm-up on one target
    for _ in iter_view_maps(model, image[:2], depth[:2], (grid, grid), lambda i: depth_input, size, settings):
        break
    _sync(device)
    t0 = time.perf_counter()
    n_maps = 0
    for maps in iter_view_maps(model, image, depth, (grid, grid), lambda i: depth_input, size, settings):
        n_maps += 1
        del maps
    _sync(device)
    elapsed = time.perf_counter() - t0
    flops = _mapper_flops_per_token(ci, cd) * t * n_views * n_views
    out = {"n_views": n_views, "tokens": t, "map_s": elapsed, "map_flops": flops, "achieved_flops": flops / elapsed,
           "n_maps": n_maps, "cached_feature_bytes": (image.numel() + depth.numel()) * 4}
    if device.startswith("cuda"):
        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    else:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_bytes"] = int((peak_kb - baseline_rss) * 1024)
    return out


def bench_mapping(args) -> dict:
    rows = []
    for n in args.views:
        cmd = [sys.executable, __file__, "--worker", "--views", str(n), "--grid", str(args.grid), "--size",
               str(args.size), "--ci", str(args.ci), "--cd", str(args.cd), "--device", args.device,
               "--chunk", str(args.chunk)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parents[1])
        if res.returncode != 0:
            raise RuntimeError(f"worker for N={n} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    peak_matmul = matmul_flops(args.device)
    for r in rows:
        r["fraction_of_matmul"] = r["achieved_flops"] / peak_matmul
    return {"matmul_flops": peak_matmul, "rows": rows}


# -- voxel aggregation -------------------------------------------------------------------------------
def bench_voxel(args) -> dict:
    from shared.geometry import VoxelGrid, backproject_depth, look_at_c2w
    from detect.volume import ViewCalibration, VolumeAccumulator

    h, w = args.height, args.width
    f = 1.1 * w
    K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])
    T = look_at_c2w(np.array([0.0, -0.55, 0.3]), np.zeros(3))
    # a sphere of radius 0.22 m seen from 0.63 m: the object fills most of the frame
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    rays = np.stack([(u - K[0, 2]) / f, (v - K[1, 2]) / f, np.ones_like(u)], -1)
    rays_w = rays @ T[:3, :3].T.astype(np.float32)
    o = T[:3, 3].astype(np.float32)
    b = rays_w @ o
    c = o @ o - 0.22 ** 2
    a = (rays_w ** 2).sum(-1)
    disc = b * b - a * c
    depth = np.where(disc > 0, (-b - np.sqrt(np.maximum(disc, 0))) / a, np.nan).astype(np.float32)
    del rays, rays_w, v, u
    rng = np.random.default_rng(0)
    scores = rng.random((h, w), dtype=np.float32)
    fg = np.isfinite(depth)
    grid = VoxelGrid(origin=np.array([-0.24, -0.21, -0.225]), voxel_size=0.002, shape=(240, 210, 225))
    calib = ViewCalibration(K, T)
    n_points = int(fg.sum())

    # One grid per instance, many views: the grids are allocated outside the timed per-view work.
    acc = VolumeAccumulator(grid)
    base_vol = np.zeros(grid.shape, np.float32)

    def ours():
        acc.add_view(depth, calib, scores, fg)

    def baseline():
        pts, pix = backproject_depth(depth, K, T, mask=fg)
        grid.scatter_max(base_vol, pts, scores[pix[:, 0], pix[:, 1]])

    ours()
    baseline()
    assert np.array_equal(base_vol, acc.volume()), "voxel aggregation differs from the np.maximum.at baseline"
    times = {}
    for name, fn in (("ours", ours), ("baseline_maximum_at", baseline)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    return {"pixels": h * w, "points": n_points, "grid": list(grid.shape),
            "ours_s": times["ours"], "baseline_s": times["baseline_maximum_at"],
            "ours_points_per_s": n_points / times["ours"],
            "baseline_points_per_s": n_points / times["baseline_maximum_at"],
            "speedup": times["baseline_maximum_at"] / times["ours"],
            "timing": "best of --repeats, per view, grid allocation excluded for both",
            "note": "ours also marks the occupancy of every valid pixel; the baseline does not"}


# -- exact V-AUPRO -----------------------------------------------------------------------------------
def bench_aupro(args) -> dict:
    from scipy import ndimage

    from detect.metrics import segmentation_metrics

    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    vols, gts = [], []
    for _ in range(args.volumes):
        g = np.zeros(shape, bool)
        for _ in range(3):  # a few blob-shaped anomalies per volume
            c = [rng.integers(10, s - 10) for s in shape]
            g[c[0] - 4:c[0] + 4, c[1] - 4:c[1] + 4, c[2] - 4:c[2] + 4] = True
        score = rng.random(shape, dtype=np.float32) * 0.5
        score += ndimage.uniform_filter(g.astype(np.float32), 5)
        vols.append(score)
        gts.append(g)
    pooled = np.concatenate([v.ravel() for v in vols]).astype(np.float64)
    t0 = time.perf_counter()
    np.argsort(pooled)
    t_argsort = time.perf_counter() - t0
    del pooled
    t0 = time.perf_counter()
    res = segmentation_metrics(vols, gts, None, limits=(0.3, 0.1, 0.05, 0.01))
    t_metrics = time.perf_counter() - t0
    return {"elements": int(np.prod(shape)) * args.volumes, "volumes": args.volumes, "shape": list(shape),
            "exact_metrics_s": t_metrics, "argsort_s": t_argsort, "ratio": t_metrics / t_argsort,
            "voxel_aupro@0.01": res["voxel_aupro"][0.01], "voxel_auroc": res["voxel_auroc"],
            "note": "metrics time includes GT labelling (26-connectivity), pooling, V-AUROC and 4 AUPRO limits"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "mapping", "voxel", "aupro"], default="all")
    p.add_argument("--views", default="6,12,24,36", help="comma-separated N values (mapping)")
    p.add_argument("--grid", type=int, default=16, help="token grid side (64 = the paper's 896 px)")
    p.add_argument("--size", type=int, default=224, help="input size the maps are upsampled to")
    p.add_argument("--ci", type=int, default=768)
    p.add_argument("--cd", type=int, default=384)
    p.add_argument("--chunk", type=int, default=0, help="sources per mapping batch (0: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=1500)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--volumes", type=int, default=4)
    p.add_argument("--shape", default="120,105,112")
    p.add_argument("--out", default="bench/results_detect.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(mapping_worker(int(args.views), args.grid, args.size, args.ci, args.cd, args.device,
                                        args.chunk)))
        return 0
    args.views = [int(v) for v in str(args.views).split(",")]
    args.shape = [int(v) for v in str(args.shape).split(",")]
    import torch

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads(), "device": args.device}}
    if args.part in ("all", "mapping"):
        res = bench_mapping(args)
        results["mapping"] = res
        print(f"\nmapping stage (tokens {args.grid}×{args.grid}, dims {args.ci}/{args.cd}, maps at {args.size}², "
              f"{args.device}); matmul peak {res['matmul_flops'] / 1e9:.1f} GFLOP/s")
        print(f"{'N':>4} {'time s':>9} {'s/N²':>9} {'GFLOP/s':>9} {'of mm':>7} {'peak MB':>9} {'feat MB':>9}")
        for r in res["rows"]:
            print(f"{r['n_views']:>4} {r['map_s']:>9.3f} {r['map_s'] / r['n_views'] ** 2:>9.5f} "
                  f"{r['achieved_flops'] / 1e9:>9.1f} {r['fraction_of_matmul']:>7.1%} "
                  f"{r['peak_bytes'] / 2**20:>9.1f} {r['cached_feature_bytes'] / 2**20:>9.1f}")
    if args.part in ("all", "voxel"):
        res = bench_voxel(args)
        results["voxel"] = res
        print(f"\nvoxel aggregation ({args.height}×{args.width} view, {res['points']:,} foreground points, grid "
              f"{res['grid']}): ours {res['ours_points_per_s'] / 1e6:.1f} M points/s, np.maximum.at baseline "
              f"{res['baseline_points_per_s'] / 1e6:.1f} M points/s → {res['speedup']:.1f}×")
    if args.part in ("all", "aupro"):
        res = bench_aupro(args)
        results["aupro"] = res
        print(f"\nexact V-AUPRO ({res['volumes']} volumes {res['shape']}, {res['elements']:,} voxels): "
              f"{res['exact_metrics_s']:.2f} s vs one np.argsort {res['argsort_s']:.2f} s → {res['ratio']:.2f}×")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
