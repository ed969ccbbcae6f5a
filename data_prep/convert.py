"""Convert a real depth dataset (or the built-in synthetic benchmark) into webdataset shards.

    python data_prep/convert.py --source mvtec3d --root /data/mvtec_3d_anomaly_detection --out shards/

See ``docs/data_prep.md`` and ``../shared/spec/data_formats.md`` §8, §9, §12. Library use::

    from data_prep.convert import convert
    summary = convert("synthetic", root, out, splits="all", max_side=512)
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from data_prep.shards import ConversionError, ShardParams, parse_splits, run_conversion
from data_prep.sources import SOURCES, make_source
from shared.cli import ArgumentParser, fail, run_main


@dataclass
class ConvertParams:
    """All options of a conversion (CLI flags with ``-`` → ``_``)."""

    splits: str = "train,validation"
    max_side: int = 1024
    downsample: str = "nan_median"
    valid_frac_min: float = 0.5
    bg: str = "none"
    realiad_unit: str | None = None
    realiad_json_dir: str | None = None
    eyecandies_pose: str = "official"
    folder_kind: str = "metric_z"
    folder_unit: str | None = None
    folder_glob: str = "**/*"
    folder_category: str | None = None
    folder_split: str = "train"
    folder_source_id: str | None = None
    shard_max_bytes: float = 1e9
    shard_max_count: int | None = None
    seed: int = 0
    num_parts: int = 1
    part: int = 0
    workers: int = 0
    overwrite: bool = False
    allow_skipped: bool = False
    progress: bool = True


def convert(source: str, root: str | Path, out: str | Path, **params) -> dict:
    """Convert ``source`` at ``root`` into shards in ``out``; returns the summary dict.

    ``params`` are the fields of :class:`ConvertParams`. The summary has ``ok`` (False if a fatal
    check failed: unreadable inputs without ``allow_skipped``, or no sample written), ``written``,
    ``resumed``, ``skipped``, ``skipped_items``, ``shards``, ``checks``, ``manifest`` and
    ``fingerprint``. Raises :class:`ConversionError` / ``ValueError`` for a wrong root, bad options,
    key collisions or an output folder inside the input.
    """
    names = {f.name for f in dataclasses.fields(ConvertParams)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown conversion parameter(s) {unknown}; valid: {sorted(names)}")
    p = ConvertParams(**params)
    reader = make_source(source, root, bg=p.bg, realiad_unit=p.realiad_unit, realiad_json_dir=p.realiad_json_dir,
                         eyecandies_pose=p.eyecandies_pose,
                         folder_kind=p.folder_kind, folder_unit=p.folder_unit, folder_glob=p.folder_glob,
                         folder_category=p.folder_category, folder_split=p.folder_split,
                         folder_source_id=p.folder_source_id)
    shard_params = ShardParams(splits=parse_splits(p.splits), max_side=int(p.max_side), downsample=p.downsample,
                               valid_frac_min=float(p.valid_frac_min), seed=int(p.seed),
                               shard_max_bytes=float(p.shard_max_bytes),
                               shard_max_count=int(p.shard_max_count) if p.shard_max_count else None,
                               num_parts=int(p.num_parts))
    return run_conversion(reader, out, shard_params, part=int(p.part), workers=int(p.workers),
                          progress=p.progress, overwrite=p.overwrite, allow_skipped=p.allow_skipped)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python data_prep/convert.py",
        description="Convert depth maps of a real dataset (or of the built-in synthetic benchmark) into "
                    "webdataset shards <source>-NNNNNN.tar (members <key>.depth.npy float32 NaN-invalid + "
                    "<key>.json) with a manifest.json. Idempotent and resumable: re-running the same "
                    "command skips complete shards; shards are written to a temp name and renamed when "
                    "complete. Sources are never modified.",
        epilog="Exit status: 0 ok; 1 a check failed (unreadable inputs were skipped - see the manifest's "
               "'skipped' list; use --allow-skipped to accept them - or nothing was written); 2 bad "
               "arguments, wrong dataset root or unusable output folder; 130 interrupted (re-run to resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--source", required=True, choices=sorted(SOURCES),
                    help="dataset format: mvtec3d (MVTec 3D-AD xyz TIFFs), eyecandies (16-bit depth PNG + "
                         "info_depth.yaml), realiad_d3 (Real-IAD D3 zips/folders + JSON splits, or the benchmark's <cat>/{train,test}/{GOOD,<defect>}/xyz folders), folder "
                         "(generic .npy/.tif/16-bit .png), synthetic (the built-in multiview benchmark)")
    ap.add_argument("--root", required=True, help="dataset root folder (read-only)")
    ap.add_argument("--out", required=True, help="output folder for shards and manifest.json (outside --root)")
    g = ap.add_argument_group("selection and resampling")
    g.add_argument("--splits", default="train,validation",
                   help="comma-separated canonical splits (train, validation, test, test_private, "
                        "test_private_mixed, unsplit) or 'all'. Test splits are excluded by default: "
                        "pretraining on them leaks into evaluation")
    g.add_argument("--max-side", type=int, default=1024, help="maps with a longer side are downsampled")
    g.add_argument("--downsample", default="nan_median", choices=["nan_median", "nan_mean", "nearest"],
                   help="NaN-aware downsampling method (bilinear/bicubic are never used on depth)")
    g.add_argument("--valid-frac-min", type=float, default=0.5,
                   help="an output pixel is valid if at least this fraction of its footprint is valid")
    s = ap.add_argument_group("source-specific")
    s.add_argument("--bg", default="none", choices=["none", "plane", "ransac_dbscan"],
                   help="mvtec3d background removal on the stored copy (ransac_dbscan needs open3d)")
    s.add_argument("--realiad-unit", default=None, choices=["m", "mm", "unknown"],
                   help="realiad_d3 depth unit to record (undocumented upstream; default 'unknown')")
    s.add_argument("--realiad-json-dir", default=None,
                   help="realiad_d3 folder of <category>.json split files (default <root>/realiad_d3_jsons "
                        "or <root>/realiad_d3_jsons.zip)")
    s.add_argument("--eyecandies-pose", default="official", choices=["official", "cfm"],
                   help="eyecandies: how <idx>_pose.txt becomes the stored camera-to-world T_c2w: official = the "
                        "file as is (the dataset's convention, camera-to-world), cfm = its inverse (M3DM/CFM "
                        "preprocessing treats the file as world-to-camera; parity experiments only)")
    s.add_argument("--folder-kind", default="metric_z", choices=["metric_z", "rel_disparity"],
                   help="folder: metric z-depth (values <= 0 invalid) or relative disparity (larger = nearer)")
    s.add_argument("--folder-unit", default=None, choices=["m", "mm", "unknown"],
                   help="folder: unit of metric_z values (default 'unknown')")
    s.add_argument("--folder-glob", default="**/*",
                   help="folder: glob relative to --root selecting files (.npy/.tif/.tiff/.png kept)")
    s.add_argument("--folder-category", default=None, help="folder: category name (default: root folder name)")
    s.add_argument("--folder-split", default="train", help="folder: canonical split of every map")
    s.add_argument("--folder-source-id", default=None,
                   help="folder: source id used in keys, shard names and the manifest (default 'folder')")
    o = ap.add_argument_group("shards and execution")
    o.add_argument("--shard-max-bytes", type=float, default=1e9, help="maximum shard size in bytes")
    o.add_argument("--shard-max-count", type=int, default=None, help="maximum samples per shard")
    o.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle before writing")
    o.add_argument("--workers", type=int, default=0,
                   help="decoding worker processes (0 = decode in the main process)")
    o.add_argument("--num-parts", type=int, default=1, help="split the work into this many parts (SLURM arrays)")
    o.add_argument("--part", type=int, default=0,
                   help="which part to convert (0-based); part p numbers its shards from p*100000")
    o.add_argument("--overwrite", action="store_true",
                   help="rewrite this part even if complete shards exist (default: resume/skip them)")
    o.add_argument("--allow-skipped", action="store_true",
                   help="exit 0 even if some unreadable inputs were skipped (they are still listed)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return ap


def format_summary(summary: dict) -> str:
    head = (f"{summary['source']} part {summary['part']}/{summary['num_parts']}: "
            f"{summary['written']} written, {summary['resumed']} kept from complete shards, "
            f"{summary['skipped']} skipped, {len(summary['shards'])} shard(s) -> {summary['out']}")
    lines = [head]
    for item in summary["skipped_items"][:20]:
        lines.append(f"  skipped {item['rel_path']}: {item['reason']}")
    if len(summary["skipped_items"]) > 20:
        lines.append(f"  ... {len(summary['skipped_items']) - 20} more in {summary['manifest']}")
    for split, z in summary.get("z_stats", {}).items():
        if z.get("median") is not None:
            lines.append(f"  z[{split}] ({z['samples']} maps): min {z['min']:.5g}  p1 {z['p1']:.5g}  median "
                         f"{z['median']:.5g}  p99 {z['p99']:.5g}  max {z['max']:.5g}  valid {z['valid_frac']:.3f}")
    for check in summary["checks"]:
        status = "ok" if check["ok"] else ("FAILED" if check["fatal"] else "WARNING")
        lines.append(f"  check {check['name']}: {status} - {check['detail']}")
    if not summary["source_complete"]:
        lines.append("  (other parts of this source are still missing from the manifest)")
    lines.append(f"  manifest {summary['manifest']} fingerprint {summary['fingerprint'][:16]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = {k: v for k, v in vars(args).items() if k not in ("source", "root", "out", "no_progress", "json")}
    params["progress"] = not args.no_progress
    try:
        summary = convert(args.source, args.root, args.out, **params)
    except (ConversionError, ValueError, OSError) as exc:  # OSError: e.g. an unwritable --out
        return fail(exc)
    except KeyboardInterrupt:
        print("interrupted: complete shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
