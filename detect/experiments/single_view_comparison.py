"""The single-view comparison study: several scoring methods on one single-view dataset, one report.

Each method adds its scoring overrides (:data:`METHODS`) to the base config and runs through the normal
single-view code path (:func:`detect.pipeline.single_view.run_single_view`) into ``<out>/<method>/``, all
of them sharing one token cache (``<out>/features``). A method whose ``results.json`` sits next to an
identical ``config.yaml`` is reused. Writes ``<out>/report.md``: the command, the data, the encoders, one
table (I-AUROC, P-AUROC, AUPRO@30 %, AUPRO@1 % per class + mean for every method) and the run times —
every number comes from the runs. Command line: ``detect/single_view_report.py``.
"""

import json
import math
import os
import shlex
import time
import warnings
from pathlib import Path

from detect.config import DetectConfig
from detect.pipeline.base import RunError, deterministic
from detect.pipeline.results import ALL_PIXEL_P_AUROC
from shared.config import (
    ConfigError,
    from_dict,
    load_yaml,
    merge_dicts,
    parse_overrides,
    save_config,
    to_dict,
)
from shared.io import atomic_write_json, atomic_write_text

# method name → detect/run.py overrides (the names are detect.pipeline.single_view.method_name of the config)
METHODS: dict[str, list[str]] = {
    "modmap": ["scoring=modmap"],
    "cfm": ["scoring=cfm"],
    "cmdr": ["scoring=cmdr"],
    "cmdr_image_only": ["scoring=cmdr", "modality=image"],
    "cmdr_depth_only": ["scoring=cmdr", "modality=depth"],
    "cmdr_image_fallback": ["scoring=cmdr", "missing_depth=image_fallback"],
}
DESCRIPTIONS = {
    "modmap": "ModMap with one view (= CFM networks with the configured depth encoder), ModMap scoring: "
              "1 − cos maps, Ξ = max, no smoothing, image score = max of the map",
    "cfm": "same networks, CFM scoring: product of √(2 − 2cos) maps, Gaussian smoothing (σ = 4.69 px at 224), "
           "CFM's three per-image normalisations",
    "cmdr": "CMDR-IAD-style fusion: + image and depth reconstruction decoders, reliability-gated mapping "
            "anomaly × confidence-weighted reconstruction anomaly, CFM smoothing and normalisations",
    "cmdr_image_only": "image reconstruction branch alone (never reads depth)",
    "cmdr_depth_only": "depth reconstruction branch alone (never reads images)",
    "cmdr_image_fallback": "cmdr + missing-depth robustness: foreground holes without valid depth scored by the "
                           "image branch",
}

def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _generator_command(root: Path) -> list[str]:
    """How a synthetic benchmark root was made (from its ``benchmark.json``), for the report."""
    try:
        doc = json.loads((root / "benchmark.json").read_text())
        c = doc["config"]
        setups = c["setups"]
        cmd = (f"python data_prep/synthetic.py --out {shlex.quote(str(root))} --classes {' '.join(c['classes'])} "
               f"--views {c['n_views']} --size {c['width']} --aspect {c['height'] / c['width']:g} "
               f"--n-test {c['n_test']} --anomalous-fraction {c['anomalous_fraction']:g} --seed {c['seed']} "
               f"--setup {'both' if len(setups) > 1 else setups[0]}")
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return []
    rest = {k: v for k, v in c.items() if k not in ("classes", "n_views", "width", "height", "n_test",
                                                   "anomalous_fraction", "seed", "setups")}
    return ["The data were generated with (generator version "
            f"{doc.get('generator_version', '?')}; other generator settings {json.dumps(rest)}):", "",
            "```bash", cmd, "```", ""]


def _data_summary(cfg, classes: list[str]) -> list[str]:
    from detect.data.single_view_datasets import open_single_view_class
    from detect.pipeline.single_view import dataset_options

    lines = ["| class | training images | test images | anomalous | s.e. of an I-AUROC near 0.5 |",
             "|---|---|---|---|---|"]
    for c in classes:
        ds = open_single_view_class(cfg.dataset, cfg.data_root, c, **dataset_options(cfg))
        setup = cfg.setup if cfg.setup != "both" else "real2real"
        n_train = len(ds.train_set(setup))
        if cfg.train_limit:
            n_train = min(n_train, cfg.train_limit)
        n_pos = sum(r.label for r in ds.test_records)
        n_neg = len(ds.test_records) - n_pos
        # Hanley & McNeil's standard error of an AUROC of 0.5: how far chance alone moves the number
        se = math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg)) if n_pos and n_neg else float("nan")
        lines.append(f"| {c} | {n_train} | {len(ds.test_records)} | {n_pos} | {se:.3f} |")
    return lines


def compare_methods(base: DetectConfig, methods: list[str], command: str, reuse: bool = True,
                    report: str | None = None) -> str:
    """Run every method of ``methods`` on ``base`` (each into ``<out>/<method>/``, one shared token cache)
    and write ``<out>/report.md`` (and ``report``); returns the report text."""
    from detect.pipeline.results import results_table
    from detect.pipeline.single_view import method_name, run_single_view

    if base.dataset == "sim3d":
        raise RunError("the single-view comparison needs --dataset mvtec3d, eyecandies or sim3d_single")
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = base.cache_dir or str(out / "features")
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    reused: list[str] = []
    random_encoder = False
    for name in methods:
        try:
            cfg = from_dict(DetectConfig, merge_dicts(to_dict(base), parse_overrides(
                [f"out={out / name}", f"cache_dir={cache}", *METHODS[name]])))
            cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        assert method_name(cfg) == name
        method_out = out / name
        done = method_out / "results.json"
        if reuse and done.is_file() and (method_out / "config.yaml").is_file() \
                and load_yaml(method_out / "config.yaml") == to_dict(cfg):
            saved = json.loads(done.read_text())
            results[name] = saved["results"]
            random_encoder |= bool(saved.get("random_image_encoder"))
            reused.append(name)
            timing = method_out / "report_timing.json"
            if timing.is_file():
                seconds[name] = json.loads(timing.read_text())["seconds"]
            print(f"[{name}] reused {done}")
            continue
        print(f"[{name}] {' '.join(METHODS[name])}")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="--image-encoder random")
                with deterministic(cfg):
                    res = run_single_view(cfg)
        except RunError as exc:
            raise RunError(f"{name}: {exc}") from None
        seconds[name] = time.perf_counter() - t0
        atomic_write_json(method_out / "report_timing.json", {"seconds": seconds[name], "loadavg": _loadavg()})
        results[name] = res[name]
        random_encoder |= any(m.get("random_image_encoder") for m in res[name].values())
    save_config(base, out / "base_config.yaml")
    table, _ = results_table(results, [0.3, 0.01])
    classes = sorted({c for per in results.values() for c in per})
    lines = [f"# Single-view comparison — {base.dataset}", ""]
    if random_encoder:
        lines += ["**Randomly initialised encoders (`--image-encoder random`): these numbers compare the scoring "
                  "methods on toy features; they are not results of the real DINOv2 / DINO-Depth encoders.**", ""]
    lines += ["Command (repository root):", "", "```bash", command, "```", "",
              f"Data: `{base.data_root}` ({base.dataset}"
              + (f", views {base.single_views or 'first stem'}" if base.dataset == "sim3d_single" else "") + ")", ""]
    lines += _generator_command(Path(base.data_root))
    try:
        lines += _data_summary(base, classes) + [""]
    except Exception as exc:  # noqa: BLE001  (the summary is informative only)
        lines += [f"(data summary unavailable: {exc})", ""]
    any_metrics = next(iter(next(iter(results.values())).values()))
    lines += ["Methods:", ""] + [f"- `{m}`: {DESCRIPTIONS[m]}" for m in results] + [""]
    lines += table
    lines += ["", f"I-AUROC over per-image scores; {ALL_PIXEL_P_AUROC}; AUPRO@30 % / @1 % = exact PRO (every score a "
              "threshold, 8-connected GT regions) integrated up to that FPR and divided by it (metrics.md). "
              f"Evaluation resolution: {any_metrics.get('eval_res')}. Per-class columns and the unweighted mean.", ""]
    lines += ["Encoders and training: image encoder `" + base.image_encoder + "`"
              + (f" ({base.random_encoder_arch}, {base.random_encoder_depth} blocks)" if base.image_encoder == "random"
                 else "") + f", depth encoder `{base.depth_encoder}`, input {base.image_size} px, "
              f"{base.epochs} epochs (mapping), {base.cmdr_epochs or base.epochs} epochs (decoders), seed {base.seed}.", ""]
    if seconds:
        loads = [json.loads((out / m / "report_timing.json").read_text()).get("loadavg")
                 for m in seconds if (out / m / "report_timing.json").is_file()]
        loads = [x[0] for x in loads if x]
        lines += ["Wall time per method (fit + predict + evaluate, all classes; token cache shared, so the first "
                  "method also pays the encoding): "
                  + ", ".join(f"{m} {s:.0f} s" for m, s in seconds.items())
                  + (f" ({os.cpu_count()} CPU cores, 1-min load average {min(loads):.1f}–{max(loads):.1f} at the "
                     "end of the runs: other jobs shared the machine)" if loads else "") + ".", ""]
    if reused:
        lines += [f"Runs reused from earlier identical invocations: {', '.join(reused)}.", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "report.md", text)
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(report), text)
    return text

