"""Shard reader vs source files: samples/s of (read + decode + normalise), same samples, same run.

Builds datasets in the real on-disk formats (``data_prep.fixtures``) at realistic frame sizes —
MVTec 3D-AD xyz TIFFs (float32 (H, W, 3)), Eyecandies 16-bit PNG + YAML (512×512), Real-IAD D³ xyz
TIFFs inside a category zip (large frames, so the source path must downsample like the converter
does) — converts them with ``data_prep.convert``, then times, per source and overall:

* **shards**: ``SampleTable.read(i)`` (pread at indexed offsets, exact ``.npy`` decode) + nearness
  normalisation with the percentiles the converter recorded (``norm_range``, converter ≥ 1.1);
* **source**: the reader's ``load`` (decode the original file) + the converter's NaN-aware
  downsampling to the same ``max_side`` + the same normalisation — i.e. what a loader without shards
  would do to obtain the same array.

Both paths run from the page cache (one warm-up pass each), in one process of their own configured
like a loader worker (one thread, :func:`shared.memory.keep_freed_memory`); both normalisations run
on the identical arrays and give the same map bit for bit (checked). ``ratio`` = overall speed-up for the
paper's split-B mix of sources (target ≥ 3); per-source ratios and decode-only ratios are reported
too (for small frames the normalisation dominates both paths).

    python bench/bench_shards.py [--full]
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import tempfile
import time
from pathlib import Path

TARGET = 3.0


def _sizes(quick: bool) -> dict:
    if quick:
        return {"mvtec3d": {"hw": (400, 400), "n": 6}, "eyecandies": {"hw": (512, 512), "n": 6},
                "realiad_d3": {"hw": (1200, 1800), "n": 2}, "repeats": 2}
    return {"mvtec3d": {"hw": (800, 800), "n": 24}, "eyecandies": {"hw": (512, 512), "n": 24},
            "realiad_d3": {"hw": (3040, 5328), "n": 4}, "repeats": 3}


def _time_per_sample(fn, indices, repeats: int) -> float:
    for i in indices:  # warm-up: page cache, imports, allocator
        fn(i)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in indices:
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return best / len(indices)


PAPER_MIX_B = {"mvtec3d": 4147, "eyecandies": 15500, "realiad_d3": 4249}  # dino_depth.md §13, split B


def run(quick: bool = True) -> dict:
    """Per-source and overall samples/s of both paths (:func:`measure`, in a worker process set up
    like a loader worker); ``ratio`` is the overall speed-up for the paper's split-B mix."""
    from bench.common import check, run_worker, with_checks

    result = run_worker("bench.bench_shards", [] if quick else ["--full"])
    checks = [check("shards vs source files, split-B mix (read + decode + normalise)", result["ratio"], TARGET)]
    checks += [check(f"shards vs source files, {src} only", result[src]["ratio"], TARGET) for src in PAPER_MIX_B]
    return with_checks(result, checks)


def measure(quick: bool = True) -> dict:
    """Measure per-source and overall samples/s of both paths; ``ratio`` is the overall speed-up for
    the paper's split-B mix of metric sources (MVTec 3D-AD 4,147 : Eyecandies 15,500 : Real-IAD 4,249
    samples), decode + normalise."""
    from data_prep import fixtures
    from data_prep.convert import convert
    from data_prep.shards import ShardParams, filter_splits
    from data_prep.sources import make_source
    from pretrain.data import SampleTable, normalize_sample
    from shared.depth import downsample_depth

    sizes = _sizes(quick)
    max_side = 1024
    repeats = sizes["repeats"]
    result: dict = {"quick": quick, "max_side": max_side}
    per_sample: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        tmp = Path(tmp)
        fixtures.write_mvtec3d(tmp / "mvtec3d", categories=("bagel",), hw=sizes["mvtec3d"]["hw"],
                               layout={"train": {"good": sizes["mvtec3d"]["n"]}})
        fixtures.write_eyecandies(tmp / "eyecandies", categories=("CandyCane",), hw=sizes["eyecandies"]["hw"],
                                  counts={"train": sizes["eyecandies"]["n"]})
        fixtures.write_realiad_d3(tmp / "realiad_d3", categories=("pcb",), hw=sizes["realiad_d3"]["hw"],
                                  n_train=sizes["realiad_d3"]["n"], n_test=0)
        out = tmp / "shards"
        conv_s = {}
        for src in PAPER_MIX_B:
            t0 = time.perf_counter()
            convert(src, tmp / src, out, progress=False, max_side=max_side)
            conv_s[src] = time.perf_counter() - t0
        table = SampleTable.from_shard_dirs([out])
        index_of = {table.key(i): i for i in range(len(table))}
        for src in PAPER_MIX_B:
            reader = make_source(src, tmp / src)
            items = filter_splits(reader.enumerate(), ShardParams().splits)
            rows = [index_of[it.key(src)] for it in items]
            by_row = dict(zip(rows, items))
            stored = {i: table.read(i) for i in rows}

            def shard_decode(i):
                return table.read(i)

            def source_decode(i, reader=reader, by_row=by_row):
                # what a loader without shards must do to get the same array
                return downsample_depth(reader.load(by_row[i]).depth, max_side, "nan_median", 0.5)

            def normalise_shard(i, stored=stored):  # with the range the shard recorded at conversion
                return normalize_sample(*stored[i])

            def normalise_source(i, stored=stored):  # same array, the percentiles searched for
                depth, meta = stored[i]
                return normalize_sample(depth, {k: v for k, v in meta.items() if k != "norm_range"})

            first = rows[0]
            assert stored[first][0].tobytes() == source_decode(first).tobytes()
            assert normalise_shard(first)[0].tobytes() == normalise_source(first)[0].tobytes()
            t_shard = _time_per_sample(shard_decode, rows, repeats)
            t_source = _time_per_sample(source_decode, rows, max(1, repeats - 1))
            t_norm_shard = _time_per_sample(normalise_shard, rows, repeats)
            t_norm = _time_per_sample(normalise_source, rows, repeats)
            reader.close()
            shard_total, source_total = t_shard + t_norm_shard, t_source + t_norm
            per_sample[src] = (shard_total, source_total)
            h, w = sizes[src]["hw"]
            result[src] = {
                "frame": f"{h}x{w}", "samples": len(rows), "convert_s": round(conv_s[src], 2),
                "shard_decode_norm_per_s": round(1.0 / shard_total, 1),
                "source_decode_norm_per_s": round(1.0 / source_total, 2),
                "ratio": round(source_total / shard_total, 2),
                "decode_only_ratio": round(t_source / t_shard, 1),
                "normalise_ms": round(1e3 * t_norm, 2),
                "normalise_stored_range_ms": round(1e3 * t_norm_shard, 2),
            }
        table.close()
    wsum = sum(PAPER_MIX_B.values())
    t_mix_shard = sum(PAPER_MIX_B[s] * per_sample[s][0] for s in PAPER_MIX_B) / wsum
    t_mix_source = sum(PAPER_MIX_B[s] * per_sample[s][1] for s in PAPER_MIX_B) / wsum
    result["mix_B_shard_samples_per_s"] = round(1.0 / t_mix_shard, 1)
    result["mix_B_source_samples_per_s"] = round(1.0 / t_mix_source, 2)
    result["min_source_ratio"] = min(result[s]["ratio"] for s in PAPER_MIX_B)
    result["ratio"] = round(t_mix_source / t_mix_shard, 2)
    result["target"] = TARGET
    result["passed"] = result["ratio"] >= TARGET
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="realistic sizes (default: quick)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # one process set up like a loader worker
        import torch

        from shared.memory import keep_freed_memory

        torch.set_num_threads(1)
        kept = keep_freed_memory()
        print(json.dumps({**measure(quick=not args.full), "malloc_kept": kept}))
        return 0
    res = run(quick=not args.full)
    print(json.dumps(res, indent=2))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
