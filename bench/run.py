"""Benchmark entry point: ``python bench/run.py [names] [--quick] [--device cpu|cuda|auto] [--out FILE]``.

Each benchmark is a module ``bench/bench_<name>.py`` with ``run(quick: bool) -> dict`` (see
``bench/common.py``). Every figure with a target is measured as a ratio against a reference taken in
the same run (machines are noisy, absolute numbers drift) and listed under ``checks``; the keys
``ratio`` / ``target`` / ``passed`` mirror the first one. A benchmark that cannot run here (e.g. needs
CUDA) returns ``{"skipped": reason}``.

The figures of every benchmark are printed, then one summary table (benchmark | figure | measured |
target | met?), and everything is written as JSON together with the machine description and its load
(``os.getloadavg()`` before and after each benchmark: the CPU may be shared with other work).
Exit status: 0 when every benchmark ran (targets missed or not), 1 when one raised.
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from shared.cli import ArgumentParser, run_main

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    import numpy as np
    import torch

    from bench.common import load_avg

    info = {"platform": platform.platform(), "cpu": _cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg_1_5_15": load_avg(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def summary_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, figure, measured, target, met) for every check, skip and error."""
    rows = []
    for name, res in results.items():
        if "error" in res:
            rows.append((name, "(error)", res["error"][:60], "", "ERROR"))
            continue
        if "skipped" in res:
            rows.append((name, "(skipped)", res["skipped"][:60], "", "-"))
            continue
        checks = res.get("checks")
        if checks is None and "ratio" in res and "target" in res:  # a benchmark without a checks list
            checks = [{"name": "ratio", "value": res["ratio"], "target": res["target"], "op": ">=",
                       "passed": res.get("passed", res["ratio"] >= res["target"])}]
        for c in checks or []:
            unit = c.get("unit", "")
            rows.append((name, c["name"], f"{c['value']:.4g}{unit and ' ' + unit}",
                         f"{c['op']} {c['target']:g}{unit and ' ' + unit}", "yes" if c["passed"] else "NO"))
    return rows


def print_summary(results: dict) -> None:
    rows = summary_rows(results)
    if not rows:
        return
    head = ("benchmark", "figure", "measured", "target", "met?")
    widths = [min(70, max(len(r[i]) for r in [head, *rows])) for i in range(5)]
    print("\n" + " | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c)[:w].ljust(w) for c, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke check")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="device of the device-dependent benchmarks (default: CUDA when available)")
    parser.add_argument("--out", default="bench/results.json", help="JSON file for the results")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available()))
        return 0
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    os.environ["BENCH_DEVICE"] = args.device
    from bench.common import load_avg

    command = " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    results: dict = {"machine": machine(), "quick": args.quick, "device": args.device, "command": command,
                     "results": {}}
    failed = 0
    for name in names:
        print(f"== {name}", flush=True)
        load_before = load_avg()
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.bench_{name}")
            res = module.run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            res = {"error": traceback.format_exc().splitlines()[-1]}
            failed += 1
        res["wall_s"] = round(time.perf_counter() - start, 2)
        res["load_avg_before_after"] = [load_before, load_avg()]
        results["results"][name] = res
        for key, value in res.items():
            if key != "checks":
                print(f"   {key:<34} {_fmt(value)}")
        # partial results survive an interrupted run
        _write(args.out, results)
    results["machine"]["load_avg_end"] = load_avg()
    print_summary(results["results"])
    _write(args.out, results)
    print(f"results written to {args.out}")
    return 1 if failed else 0


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write(path: str, results: dict) -> None:
    import json

    from shared.io import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=_json_default) + "\n")


if __name__ == "__main__":
    sys.exit(run_main(main))
