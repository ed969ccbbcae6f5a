"""Summarise a shard folder and render previews of random samples.

    python data_prep/inspect_shards.py shards/ --previews 8

(Named ``inspect_shards`` rather than ``inspect``: a script called ``inspect.py`` would shadow
Python's standard ``inspect`` module when run as ``python data_prep/inspect.py``.)

Prints, per source: samples, shards, bytes, skipped inputs, counts per category/split/label, the
value-range report (per-split z statistics) and the conversion checks. Writes preview PNGs of random
samples, nearness-normalised with the shared function (near = bright, invalid = black).
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import json
import sys
from pathlib import Path

import numpy as np

from data_prep.shards import MANIFEST_NAME, file_sha256, load_manifest
from shared.cli import ArgumentParser, fail, run_main
from shared.io import atomic_open


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def summarize(shard_dir: str | Path, verify: bool = False) -> dict:
    """Per-source summary of ``<shard_dir>/manifest.json`` (``verify``: re-hash every shard)."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir, required=True)
    out: dict = {"dir": str(shard_dir), "fingerprint": manifest.get("fingerprint"), "sources": {}, "problems": []}
    for sid, entry in sorted(manifest.get("sources", {}).items()):
        shards = entry.get("shards", [])
        problems = []
        for rec in shards:
            path = shard_dir / rec["name"]
            if not path.is_file():
                problems.append(f"missing shard {rec['name']}")
            elif path.stat().st_size != rec["bytes"]:
                problems.append(f"size mismatch {rec['name']}")
            elif verify and file_sha256(path) != rec["sha256"]:
                problems.append(f"sha256 mismatch {rec['name']}")
        checks = entry.get("report", {}).get("checks", [])
        out["sources"][sid] = {
            "complete": entry.get("complete", False),
            "samples": entry.get("counts", {}).get("total", 0),
            "shards": len(shards),
            "bytes": sum(r["bytes"] for r in shards),
            "skipped": entry.get("skipped", []),
            "counts": entry.get("counts", {}).get("categories", {}),
            "z_stats": entry.get("report", {}).get("z_stats", {}),
            "checks": checks,
            "params": entry.get("params", {}),
            "problems": problems,
        }
        out["problems"].extend(f"{sid}: {p}" for p in problems)
        if not entry.get("complete", False):
            out["problems"].append(f"{sid}: incomplete (parts missing)")
    return out


def format_summary(summary: dict) -> str:
    lines = [f"shard folder {summary['dir']}  fingerprint {str(summary['fingerprint'])[:16]}"]
    for sid, s in summary["sources"].items():
        p = s["params"]
        lines.append(f"\n[{sid}] {s['samples']} samples in {s['shards']} shard(s), {_fmt_bytes(s['bytes'])}"
                     f"{'' if s['complete'] else '  (INCOMPLETE)'}; splits={p.get('splits')} "
                     f"max_side={p.get('max_side')} downsample={p.get('downsample')}")
        for cat, splits in s["counts"].items():
            parts = ", ".join(f"{sp}: " + "/".join(f"{lab} {n}" for lab, n in labs.items())
                              for sp, labs in splits.items())
            lines.append(f"  {cat}: {parts}")
        for split, z in s["z_stats"].items():
            if z.get("median") is None:
                lines.append(f"  z[{split}]: no valid pixels")
                continue
            lines.append(f"  z[{split}] n={z['samples']} min {z['min']:.5g}  p1 {z['p1']:.5g}  median "
                         f"{z['median']:.5g}  p99 {z['p99']:.5g}  max {z['max']:.5g}  valid {z['valid_frac']:.3f}")
        for c in s["checks"]:
            status = "ok" if c["ok"] else ("FAILED" if c["fatal"] else "WARNING")
            lines.append(f"  check {c['name']}: {status} - {c['detail']}")
        for item in s["skipped"][:10]:
            lines.append(f"  skipped {item['rel_path']}: {item['reason']}")
        if len(s["skipped"]) > 10:
            lines.append(f"  ... {len(s['skipped']) - 10} more skipped (see {MANIFEST_NAME})")
        for prob in s["problems"]:
            lines.append(f"  PROBLEM {prob}")
    return "\n".join(lines)


def render_previews(shard_dir: str | Path, n: int, out_dir: str | Path, seed: int = 0,
                    sources: list[str] | None = None) -> list[str]:
    """Write ``n`` preview PNGs of random samples (nearness-normalised, invalid black) to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.shards import SampleTable, normalize_sample

    table = SampleTable.from_shard_dirs([shard_dir], sources=sources, splits=["all"])
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(table), size=min(n, len(table)), replace=False).tolist()) if n > 0 else []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cmap = plt.get_cmap("turbo").copy()
    cmap.set_bad("black")
    for i in picks:
        depth, meta = table.read(i)
        x, valid, degenerate = normalize_sample(depth, meta)
        shown = np.where(valid, x, np.nan)
        fig, ax = plt.subplots(figsize=(5, 5 * depth.shape[0] / max(depth.shape[1], 1) + 0.6))
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"{meta['key']}\n{meta['kind']} {meta.get('unit')}  {depth.shape[0]}x{depth.shape[1]}  "
                     f"valid {meta['valid_frac']:.2f}{'  DEGENERATE' if degenerate else ''}", fontsize=7)
        ax.axis("off")
        fig.tight_layout()
        path = out_dir / (meta["key"].replace("/", "__") + ".png")
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", dpi=80)
        plt.close(fig)
        written.append(str(path))
    return written


def inspect_shards(shard_dir: str | Path, previews: int = 8, preview_dir: str | Path | None = None,
                   seed: int = 0, verify: bool = False) -> dict:
    """Summary dict (see :func:`summarize`) plus ``previews``: the PNG paths written."""
    summary = summarize(shard_dir, verify=verify)
    if previews > 0 and any(s["samples"] for s in summary["sources"].values()):
        target = Path(preview_dir) if preview_dir else Path(shard_dir) / "previews"
        summary["previews"] = render_previews(shard_dir, previews, target, seed)
    else:
        summary["previews"] = []
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python data_prep/inspect_shards.py",
                        description="Manifest summary, value-range report and preview PNGs of a shard "
                                    "folder written by data_prep/convert.py or pseudo_depth.py.")
    ap.add_argument("dir", help="shard folder (contains manifest.json)")
    ap.add_argument("--previews", type=int, default=8, help="number of random samples to render (0 = none)")
    ap.add_argument("--preview-dir", default=None, help="where to write previews (default <dir>/previews)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random sample choice")
    ap.add_argument("--verify", action="store_true", help="re-hash every shard against the manifest")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        summary = inspect_shards(args.dir, args.previews, args.preview_dir, args.seed, args.verify)
    except (FileNotFoundError, ValueError) as exc:
        return fail(exc)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if summary["previews"]:
            print(f"\n{len(summary['previews'])} preview(s) in {Path(summary['previews'][0]).parent}")
    failed = any(not c["ok"] and c["fatal"] for s in summary["sources"].values() for c in s["checks"])
    return 1 if (summary["problems"] or failed) else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
