"""Depth-Anything-V2 pseudo-depth for image-only datasets → webdataset depth shards.

    python data_prep/pseudo_depth.py --source mvtec_ad --root /data/mvtec_ad --out /data/shards

Each RGB image of MVTec AD, MVTec LOCO AD, MVTec AD 2, VisA, an image folder or a Hugging Face
dataset goes through Depth-Anything-V2 (transformers); the predicted relative disparity is stored
raw (``kind: rel_disparity``, larger = nearer, unknown scale and shift) in the common shard schema,
written by the same resumable shard writer as every other converter (:mod:`data_prep.shards`).
Images are batched by processed shape (the model cannot concatenate different sizes).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# torch and transformers are imported when inference starts (fast --help, shared/cli.py).
from data_prep.depth_anything import (
    DEFAULT_MODEL,
    PERMISSIVE_MODEL,
    DepthAnythingRunner,
    ModelUnavailableError,
    load_depth_anything,
    to_original_size,
)
from data_prep.rgb_sources import RGB_SOURCES, ImageRecord, LayoutError, enumerate_source
from data_prep.shards import (
    DEFAULT_SPLITS,
    ConversionError,
    DepthSource,
    LoadedDepth,
    Outcome,
    SampleJob,
    ShardParams,
    SkippedItem,
    SkipSample,
    SourceItem,
    conversion_params,
    make_sample,
    parse_splits,
    run_conversion,
)
from shared.cli import ArgumentParser, fail, run_main


class PseudoDepthSource(DepthSource):
    """An image-only dataset seen as a depth source: enumeration here, inference in :func:`process_many`."""

    kind = "rel_disparity"
    unit = None

    def __init__(self, source: str, root: str | Path, splits: Sequence[str] | None, categories: Sequence[str] | None,
                 options: dict, model_params: dict) -> None:
        super().__init__(root)
        if source not in RGB_SOURCES:
            raise ConversionError(f"unknown image source {source!r}; expected one of {', '.join(RGB_SOURCES)}")
        self.source_id = source
        self.root_arg = str(root)
        self.splits = splits
        self.categories = list(categories) if categories else None
        self.options = options
        self.model_params = model_params
        self.records: list[ImageRecord] = []
        self.expected_layout = f"the {source} layout (see data_formats.md §5)"

    def roots(self) -> list[Path]:
        return [self.root] if self.root.exists() else []

    def params(self) -> dict:
        return {"categories": self.categories, **self.model_params,
                **{k: str(v) for k, v in self.options.items() if v is not None}}

    def enumerate(self) -> list[SourceItem]:
        try:
            self.records = enumerate_source(self.source_id, self.root_arg, self.splits, self.categories, **self.options)
        except LayoutError as exc:
            raise ConversionError(str(exc)) from None
        items = []
        for rec in self.records:
            size = rec.path.stat().st_size if rec.path is not None and rec.path.exists() else -1
            items.append(SourceItem(category=rec.category, split=rec.split, split_orig=rec.split_orig, stem=rec.stem,
                                    rel_path=rec.rel_path, label=rec.label, defect_type=rec.defect_type, ref=rec,
                                    size=size))
        return items

    def load(self, item: SourceItem) -> LoadedDepth:  # pragma: no cover - inference runs in process_many
        raise NotImplementedError("pseudo-depth samples are produced in batches by process_many()")


class _Preprocessed:
    """Decode + preprocess images in DataLoader workers (a map-style dataset); failures come back as a
    reason string."""

    def __init__(self, tasks: list[tuple[int, SourceItem]], processor) -> None:
        self.tasks = tasks
        self.processor = processor

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int):
        index, item = self.tasks[i]
        try:
            image = item.ref.open_rgb()
            pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
            return index, pixels, (image.height, image.width), None
        except Exception as exc:  # truncated/corrupt files raise library-specific errors
            return index, None, None, f"unreadable image: {type(exc).__name__}: {exc}"


def make_process_many(runner: DepthAnythingRunner, job: SampleJob, batch_size: int, output: str, workers: int,
                      preview_dir: Path | None = None, n_preview: int = 0):
    """Build the ``process_many`` callback of :func:`run_conversion`: batched inference, ordered output."""
    pseudo_meta = {"model_id": runner.model_id, "model_revision": runner.model_revision,
                   "transformers_version": runner.transformers_version, "dtype": runner.dtype_name}
    previews = {"left": n_preview}

    def finish(index: int, item: SourceItem, disparity: np.ndarray, orig_hw: tuple[int, int]) -> Outcome:
        try:
            input_hw = list(disparity.shape)
            if output == "original":
                disparity = to_original_size(disparity, *orig_hw)
                method = None
            else:
                method = "da_processed"
            sample = make_sample(job, index, item, disparity.astype(np.float32), orig_hw=orig_hw,
                                 resize_method=method, pseudo={**pseudo_meta, "input_hw": input_hw})
        except SkipSample as exc:
            return SkippedItem(index, item.rel_path, str(exc))
        if preview_dir is not None and previews["left"] > 0:
            previews["left"] -= 1
            save_preview(item, disparity, preview_dir / f"{sample.key.replace('/', '__')}.png")
        return sample

    def process_many(tasks: Iterator[tuple[int, SourceItem]]) -> Iterator[Outcome]:
        import torch

        task_list = list(tasks)
        in_memory = any(item.ref.loader is not None for _, item in task_list)
        loader = torch.utils.data.DataLoader(
            _Preprocessed(task_list, runner.processor), batch_size=None, shuffle=False,
            num_workers=0 if in_memory else workers, persistent_workers=False)
        done: dict[int, Outcome] = {}
        buckets: dict[tuple, list] = defaultdict(list)
        items = dict(task_list)
        pending = 0
        next_index = task_list[0][0] if task_list else 0

        def run_bucket(shape: tuple) -> None:
            nonlocal pending
            group = buckets.pop(shape)
            batch = torch.stack([g[1] for g in group])
            preds = runner.predict(batch)
            for (index, _, orig_hw), pred in zip(group, preds):
                done[index] = finish(index, items[index], pred, orig_hw)
            pending -= len(group)

        for index, pixels, orig_hw, error in loader:
            if error is not None:
                done[index] = SkippedItem(index, items[index].rel_path, error)
            else:
                shape = tuple(pixels.shape)
                buckets[shape].append((index, pixels, tuple(orig_hw)))
                pending += 1
                if len(buckets[shape]) >= batch_size:
                    run_bucket(shape)
                # Rare shapes would hold back the ordered output: flush everything past a window.
                if pending >= 4 * batch_size:
                    for shape in list(buckets):
                        run_bucket(shape)
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1
        for shape in list(buckets):
            run_bucket(shape)
        while next_index in done:
            yield done.pop(next_index)
            next_index += 1

    return process_many


def save_preview(item: SourceItem, disparity: np.ndarray, path: Path) -> None:
    """Side-by-side PNG: the input image | its pseudo-depth (per-image min-max, viewing only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.io import atomic_open

    image = np.asarray(item.ref.open_rgb())
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(image)
    axes[0].set_title(f"{item.category}/{item.stem}", fontsize=8)
    axes[1].imshow(disparity, cmap="turbo")
    axes[1].set_title("pseudo-depth (near = bright)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


def pseudo_depth(source: str, root: str | Path, out: str | Path, *, model: str = DEFAULT_MODEL,
                 splits: str | Sequence[str] | None = DEFAULT_SPLITS, categories: Sequence[str] | None = None,
                 da_size: int | None = None, da_output: str = "processed", batch_size: int = 8,
                 dtype: str = "auto", device: str = "auto", max_side: int = 1024, seed: int = 0,
                 shard_max_bytes: float = 1e9, shard_max_count: int | None = None, num_parts: int = 1, part: int = 0,
                 workers: int = 2, save_preview_n: int = 0, progress: bool = True,
                 runner: DepthAnythingRunner | None = None, **source_options) -> dict:
    """Library entry point: predict pseudo-depth for one image source and write shards to ``out``."""
    if da_output not in ("processed", "original"):
        raise ValueError(f"--da-output must be 'processed' or 'original', got {da_output!r}")
    if batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    split_sel = parse_splits(splits)
    runner = runner or load_depth_anything(model, device=device, dtype=dtype, size=da_size)
    proc_size = getattr(runner.processor, "size", None)
    if proc_size is not None and not isinstance(proc_size, int):  # dict or transformers' SizeDict
        proc_size = {k: getattr(proc_size, k, None) if not isinstance(proc_size, dict) else proc_size.get(k)
                     for k in ("height", "width", "shortest_edge", "longest_edge")}
        proc_size = {k: v for k, v in proc_size.items() if v is not None}
    model_params = {"model_id": runner.model_id, "model_revision": runner.model_revision,
                    "da_size": proc_size,
                    "da_output": da_output, "dtype": runner.dtype_name}
    src = PseudoDepthSource(source, root, split_sel, categories, source_options, model_params)
    shard_params = ShardParams(splits=split_sel, max_side=max_side, seed=seed, shard_max_bytes=shard_max_bytes,
                               shard_max_count=shard_max_count, num_parts=num_parts)
    _, phash = conversion_params(src, shard_params)  # the hash run_conversion records for this source
    job = SampleJob(source=src.source_id, kind=src.kind, unit=src.unit, max_side=max_side,
                    downsample=shard_params.downsample, valid_frac_min=shard_params.valid_frac_min, params_hash=phash)
    preview_dir = Path(out) / "previews" if save_preview_n else None
    process_many = make_process_many(runner, job, batch_size, da_output, workers, preview_dir, save_preview_n)
    return run_conversion(src, out, shard_params, part=part, progress=progress, process_many=process_many)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python data_prep/pseudo_depth.py",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=RGB_SOURCES, help="image dataset layout")
    p.add_argument("--root", required=True, help="dataset root folder (hf: a hub id, a saved dataset or an image folder)")
    p.add_argument("--out", required=True, help="output shard folder (may hold other sources' shards)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or local save_pretrained folder (default {DEFAULT_MODEL}: 335 M parameters, "
                        f"CC-BY-NC-4.0, best relative depth; {PERMISSIVE_MODEL}: 24.8 M, Apache-2.0, the "
                        "permissive and lighter choice; Base: 97.5 M, CC-BY-NC-4.0)")
    p.add_argument("--splits", default="train,validation",
                   help="comma-separated canonical splits or 'all' (default train,validation: pretraining on test "
                        "images leaks into evaluation)")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: all found)")
    p.add_argument("--da-size", type=int, default=None,
                   help="processing size (multiple of 14; default: the model's 518)")
    p.add_argument("--da-output", choices=("processed", "original"), default="processed",
                   help="store at the processed resolution (default) or bicubic-resized to the image size")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (grouped by processed shape)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto = fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--max-side", type=int, default=1024, help="NaN-aware downsampling above this side (default 1024)")
    p.add_argument("--visa-split-csv", default=None, help="VisA split_csv/1cls.csv for the raw Data/Images layout (else VisA split = "
                        "'unsplit'); a root in the 1cls/<object>/{train,test}/{good,bad} layout of "
                        "prepare_data.py needs none")
    p.add_argument("--folder-category", default=None, help="category name for image_folder / hf sources")
    p.add_argument("--hf-image-column", default="image", help="hf: image column name")
    p.add_argument("--hf-label-column", default="label", help="hf: label column name ('' for none)")
    p.add_argument("--hf-streaming", action="store_true", help="hf hub ids: stream instead of downloading")
    p.add_argument("--max-images", type=int, default=None, help="hf: stop after this many images")
    p.add_argument("--workers", type=int, default=2, help="image decoding/preprocessing workers")
    p.add_argument("--seed", type=int, default=0, help="sample shuffling seed")
    p.add_argument("--shard-max-bytes", type=float, default=1e9, help="shard size limit (default 1e9)")
    p.add_argument("--shard-max-count", type=int, default=None, help="optional samples-per-shard limit")
    p.add_argument("--num-parts", type=int, default=1, help="split the work for SLURM array jobs")
    p.add_argument("--part", type=int, default=0, help="which part this process converts")
    p.add_argument("--save-preview", type=int, default=0, metavar="N",
                   help="write N side-by-side PNGs (image | pseudo-depth) to OUT/previews")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {"visa_split_csv": args.visa_split_csv, "folder_category": args.folder_category,
               "hf_image_column": args.hf_image_column, "hf_label_column": args.hf_label_column or None,
               "hf_streaming": args.hf_streaming, "max_images": args.max_images}
    options = {k: v for k, v in options.items() if v not in (None, False)}
    categories = [c.strip() for c in args.categories.split(",")] if args.categories else None
    try:
        summary = pseudo_depth(
            args.source, args.root, args.out, model=args.model, splits=args.splits, categories=categories,
            da_size=args.da_size, da_output=args.da_output, batch_size=args.batch_size, dtype=args.dtype,
            device=args.device, max_side=args.max_side, seed=args.seed, shard_max_bytes=args.shard_max_bytes,
            shard_max_count=args.shard_max_count, num_parts=args.num_parts, part=args.part, workers=args.workers,
            save_preview_n=args.save_preview, progress=not args.no_progress, **options)
    except (ModelUnavailableError, ConversionError, ValueError, OSError) as exc:  # OSError: e.g. a full disk
        return fail(exc)
    brief = {k: summary[k] for k in ("source", "items", "written", "resumed", "skipped", "shards", "checks_failed")}
    print(json.dumps(brief, indent=2))
    for skipped in summary["skipped_items"][:20]:
        print(f"skipped {skipped['rel_path']}: {skipped['reason']}", file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
