"""Zoo checkpoints: install a run's export under ``models/zoo/`` with a model card (issue 22, item 3).

``make zoo`` trains small encoders on CPU and keeps their exports in the repository; each comes with
``<name>.pth``, ``<name>.pth.sha256`` (``sha256sum`` format) and ``<name>.md``, a card that says how it
was made and what it is worth: the command, the resolved config, the data (and its generator seed),
the held-out probe results of the run (``metrics.jsonl`` ``probe`` events, every evaluation, each next
to random init with paired 95 % intervals), the final teacher entropies against ln K, collapse
warnings, the time it took, and optionally the same probes recomputed *on the installed file* on a
second held-out set (``--confirm-root``): a generator seed used neither for training nor for choosing
the recipe, so the card's verdict does not rest on the set the recipe was chosen on.

CLI::

    python -m pretrain.model_card --run runs/zoo/depth --install models/zoo/dinodepth_tiny.pth \
        --command "make zoo" --data-note "synthetic nominal set, seed 1001" \
        --confirm-root runs/zoo/confirm_set --timings runs/zoo/timings.tsv

The card's numbers are read from the run and recomputed here, never typed in.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

if __name__ == "__main__":  # --help and argument errors answer before the torch import below
    from pretrain.cli import model_card_parser
    from shared.cli import preparse

    preparse(model_card_parser)

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from pretrain.config import PretrainConfig
from pretrain.export import json_block
from pretrain.probes import PROBE_NAMES, PretrainProbes
from shared.checkpoint import file_sha256, load_checkpoint, write_sha256_sidecar
from shared.cli import fail, run_main
from shared.config import load_config
from shared.encoder_export import load_dinodepth
from shared.vit import ViTConfig

PROBE_TITLES = {"knn_class": "k-NN class probe (accuracy)", "mask_knn": "defect-mask k-NN (token AUROC)",
                "shape_ridge": "shape ridge (R²)"}


# -- reading a run ------------------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (iteration records and events), in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_summary(records: list[dict], n_prototypes: int, n_last: int = 5) -> dict[str, Any]:
    """Probe events, collapse warnings and the final entropies of a run's records.

    The entropy of one logged batch is noisy, so the mean of the last ``n_last`` logged records is
    given next to the last one."""
    its = [r for r in records if "event" not in r and "teacher_entropy" in r]
    last = its[-n_last:]
    ln_k = math.log(n_prototypes)

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in last if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    tpi = [float(r["time_per_iteration"]) for r in its if r.get("time_per_iteration") is not None]
    return {
        "iterations": its[-1]["iteration"] if its else 0,
        "ln_k": ln_k,
        "teacher_entropy_last": float(its[-1]["teacher_entropy"]) if its else None,
        "teacher_entropy_mean_last": mean("teacher_entropy"),
        "ibot_teacher_entropy_mean_last": mean("ibot_teacher_entropy"),
        "n_last": len(last),
        "time_per_iteration_mean": sum(tpi) / len(tpi) if tpi else None,
        "probes": [r for r in records if r.get("event") == "probe"],
        "collapse_warnings": [r for r in records if r.get("event") == "collapse_warning"],
    }


def beats_random_everywhere(probe_record: dict) -> bool:
    """True when every probe of the record has a paired interval above zero (``beats_random``)."""
    present = [probe_record[n] for n in PROBE_NAMES if isinstance(probe_record.get(n), dict)]
    return bool(present) and all(p.get("beats_random") is True for p in present)


# -- probing an installed export ----------------------------------------------------------------------------
def probe_export(export: str | Path, root: str | Path, overrides: list[str] | None = None,
                 device: str = "cpu") -> dict:
    """The probes of :mod:`pretrain.probes` on an exported encoder and a held-out set ``root``.

    The probe settings and input normalisation come from the resolved training config stored in the
    export (``train_meta.config``), so the numbers are those the run would log on that set; the random
    reference is the same architecture at ``probe.random_init_seed``."""
    obj = load_checkpoint(export, map_location="cpu")
    meta = obj.get("train_meta") or {}
    if not meta.get("config"):
        raise ValueError(f"{export}: no resolved training config in train_meta; cannot rebuild its probe settings")
    cfg = load_config(PretrainConfig, None, [f"probe.root={root}", *(overrides or [])], base=meta["config"])
    vit_cfg = ViTConfig.from_dict(obj.get("config") or obj["arch"])
    backbone, _ = load_dinodepth(export, map_location=device)
    probes = PretrainProbes(cfg, vit_cfg, torch.device(device))
    record = probes.evaluate(backbone, int(meta.get("iteration", 0)))
    record["root"] = str(root)
    return record


# -- the card -----------------------------------------------------------------------------------------------
def _fmt_ci(ci: list[float] | None, signed: bool = False) -> str:
    if not ci:
        return "[n/a]"
    f = "{:+.3f}" if signed else "{:.3f}"
    return "[" + f.format(ci[0]) + ", " + f.format(ci[1]) + "]"


def probe_table(records: list[dict], label: str = "iteration") -> list[str]:
    """Markdown table: one row per probe record, one column per probe (trained [CI] vs random: Δ [CI])."""
    names = [n for n in PROBE_NAMES if any(isinstance(r.get(n), dict) for r in records)]
    lines = ["| " + label + " | " + " | ".join(PROBE_TITLES[n] for n in names) + " | all beat random |",
             "|---|" + "---|" * len(names) + "---|"]
    for r in records:
        cells = []
        for n in names:
            p = r.get(n)
            if not isinstance(p, dict):
                cells.append("–")
                continue
            cell = f"{p['value']:.3f} {_fmt_ci(p.get('ci95'))}"
            if "delta" in p:
                cell += (f" vs {p['random']:.3f}: **Δ {p['delta']:+.3f} {_fmt_ci(p.get('delta_ci95'), True)}**"
                         f"{' ✓' if p.get('beats_random') else ''}")
            cells.append(cell)
        key = r.get("root", r.get("iteration")) if label != "iteration" else r.get("iteration")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {'yes' if beats_random_everywhere(r) else 'no'} |")
    return lines


def read_timings(path: str | Path | None) -> list[tuple[str, float, float]]:
    """``stage<TAB>wall<TAB>user<TAB>sys`` lines (the Makefile's timing log) → (stage, wall s, CPU s)."""
    if path is None or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append((parts[0], float(parts[1]), float(parts[2]) + float(parts[3])))
    return rows


def zoo_card(name: str, installed: Path, meta: dict, input_norm: dict, summary: dict, commands: list[str],
             data_notes: list[str], confirm: dict | None = None, timings: list[tuple[str, float, float]] | None = None,
             notes: list[str] | None = None) -> str:
    """The Markdown model card of one zoo checkpoint (every number from the run or recomputed)."""
    cfg = meta.get("config") or {}
    final = summary["probes"][-1] if summary["probes"] else None
    modality = meta.get("modality", "depth")
    lines = [f"# {name}", "",
             f"`{installed.name}`: {'an image' if modality == 'image' else 'a depth'} encoder (teacher backbone) trained "
             "self-supervised "
             "by the DINO-Depth recipe of this toolkit (DINO + iBOT + KoLeo, EMA teacher, multi-crop) on CPU, "
             "kept in the repository by `make zoo` (issue 22). Written by `pretrain/model_card.py` from the "
             "run's `metrics.jsonl` and export; do not edit by hand.", "",
             f"sha256 `{file_sha256(installed)}` (sidecar `{installed.name}.sha256`).", "",
             "## Verdict", ""]
    if final is None:
        lines += ["No held-out probe was run (`probe.root` unset): nothing is claimed about the features.", ""]
    else:
        lines += [f"At the final evaluation (iteration {final['iteration']}) every probe beats random init with "
                  f"a paired 95 % interval above zero: **{'yes' if beats_random_everywhere(final) else 'no'}**"
                  + (f"; on the confirmation set (`{confirm['root']}`): "
                     f"**{'yes' if beats_random_everywhere(confirm) else 'no'}**" if confirm else "") + ".", ""]
    e_last, e_mean = summary["teacher_entropy_last"], summary["teacher_entropy_mean_last"]
    if e_last is not None:
        lines += [f"Teacher entropy at the end: {e_last:.2f} nat (mean of the last {summary['n_last']} logged records "
                  f"{e_mean:.2f}) against ln K = {summary['ln_k']:.2f}: {summary['ln_k'] - e_mean:.2f} nat below "
                  f"(target ≥ 1); iBOT teacher {summary['ibot_teacher_entropy_mean_last'] or float('nan'):.2f}. "
                  f"Collapse warnings: {len(summary['collapse_warnings'])}.", ""]
    lines += ["## Use", ""]
    if modality == "depth":
        lines += ["```bash", f"python detect/run.py --ckpt {installed} ...", "```", ""]
    lines += ["```python", "from shared.encoder_export import load_dinodepth",
              f"backbone, input_norm = load_dinodepth('{installed}')  # checks the sha256 sidecar", "```", "",
              "Input normalisation (required):", "", json_block({"input_norm": input_norm}), "",
              "## Reproduce", "", "The commands, in order (`make zoo` runs the ones after it):" if len(commands) > 1 else "",
              "", "```bash", *commands, "```", ""]
    data = meta.get("data") or {}
    lines += ["## Data", "", f"{meta.get('table_size', 'unknown')} maps from `{data.get('glob') or data.get('shards')}` "
              f"(sample-table fingerprint `{meta.get('fingerprint', 'unknown')}`); training seed {meta.get('seed')}, "
              f"global batch {meta.get('global_batch_size')}, {meta.get('iteration')} iterations, code "
              f"{meta.get('code_version', 'unknown')}.", ""]
    lines += [f"- {n}" for n in data_notes] + ([""] if data_notes else [])
    probe_cfg = cfg.get("probe") or {}
    if summary["probes"]:
        lines += ["## Held-out probes during training", "",
                  f"Probe set `{probe_cfg.get('root')}` at {probe_cfg.get('size')} px (`pretrain/probes.py`, "
                  f"docs/pretraining.md \"Probes\"; k-NN label `{probe_cfg.get('knn_label')}`, "
                  f"{probe_cfg.get('bootstrap')} bootstrap resamples over instances, paired difference). Each cell: "
                  "trained [95 % CI] vs random init: Δ [paired 95 % CI]; ✓ = interval above zero.", "",
                  *probe_table(summary["probes"]), ""]
    if confirm is not None:
        lines += ["## Confirmation on a second held-out set (recomputed on this file)", "",
                  *probe_table([confirm], label="probe set"), ""]
    if timings or summary.get("time_per_iteration_mean"):
        lines += ["## Cost", ""]
        for stage, wall, cpu in timings or []:
            lines.append(f"- {stage}: {wall:.0f} s wall, {cpu:.0f} s CPU (user + sys)")
        if summary.get("time_per_iteration_mean"):
            lines.append(f"- mean logged time per iteration: {summary['time_per_iteration_mean']:.3f} s")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["<details><summary>resolved training config</summary>", "", json_block(cfg), "", "</details>", ""]
    return "\n".join(lines)


def install(run_dir: str | Path, dest: str | Path, commands: list[str], data_notes: list[str] | None = None,
            confirm_root: str | Path | None = None, timings: str | Path | None = None,
            notes: list[str] | None = None, name: str | None = None) -> dict[str, Path]:
    """Copy ``<run_dir>/dinodepth.pth`` to ``dest`` (+ sidecar) and write the card ``dest`` with ``.md``."""
    run_dir, dest = Path(run_dir), Path(dest)
    export = run_dir / "dinodepth.pth"
    if not export.is_file():
        raise FileNotFoundError(f"{export}: the run has no final export (not finished?)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(export, dest)
    sidecar = write_sha256_sidecar(dest)
    obj = load_checkpoint(dest, map_location="cpu")
    meta = obj.get("train_meta") or {}
    n_prototypes = int(((meta.get("config") or {}).get("dino") or {}).get("head_n_prototypes", 0)) or 1
    summary = run_summary(read_metrics(run_dir), n_prototypes)
    confirm = probe_export(dest, confirm_root) if confirm_root else None
    card = zoo_card(name or dest.stem, dest, meta, obj.get("input_norm") or {}, summary, commands, data_notes or [],
                    confirm, read_timings(timings), notes)
    card_path = dest.with_suffix(".md")
    card_path.write_text(card)
    if confirm is not None:  # machine-readable twin of the confirmation numbers
        dest.with_suffix(".confirm.json").write_text(json.dumps(confirm, indent=2, sort_keys=True) + "\n")
    return {"checkpoint": dest, "sha256": sidecar, "card": card_path}


def main(argv: list[str] | None = None) -> int:
    from pretrain.cli import model_card_parser

    args = model_card_parser().parse_args(argv)
    try:
        out = install(args.run, args.install, args.command, args.data_note, args.confirm_root, args.timings,
                      args.note, args.name)
    except (FileNotFoundError, ValueError) as exc:
        return fail(exc, status=2)
    print("\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, status=1))
