"""Benchmark entry point: ``python bench/run.py [names] [--quick] [--out bench/results.json]``.

Each benchmark is a module ``bench/bench_<name>.py`` with ``run(quick: bool) -> dict``. A result
dict holds measured figures; the keys ``ratio`` / ``target`` / ``passed`` (optional) state a figure
measured as a ratio against a reference in the same run (machines are noisy, absolute numbers
drift). The table is printed and all results are written as JSON with the machine description.
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    parser.add_argument("--out", default="bench/results.json", help="JSON file for the results")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    results: dict = {"machine": machine(), "quick": args.quick, "results": {}}
    failed = 0
    for name in names:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            res = module.run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            res = {"error": traceback.format_exc().splitlines()[-1]}
            failed += 1
        res["wall_s"] = round(time.perf_counter() - start, 2)
        results["results"][name] = res
        for key, value in res.items():
            print(f"   {key:<34} {_fmt(value)}")
    from shared.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
