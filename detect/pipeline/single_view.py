"""Single-view evaluation (MVTec 3D-AD, Eyecandies, one view per SiM3D-layout instance) with 2D metrics.

Selected by ``detect/run.py --dataset mvtec3d|eyecandies|sim3d_single``; the same :class:`DetectConfig`
drives it. Every sample is an instance with N = 1 view, so:

* ``--scoring modmap`` is ModMap with one view — CFM with DINO-Depth, scored with ModMap's 1 − cos maps
  combined by Ξ (``--aggregation``, default max);
* ``--scoring cfm`` scores the same networks the CFM way (product of √(2 − 2 cos) maps, σ ≈ 4.7 px at
  224 Gaussian smoothing, CFM's three per-image normalisations, ``modmap.md`` §20);
* ``--scoring cmdr`` adds the CMDR-IAD reconstruction decoders and fusion (:mod:`detect.cmdr`), with
  ``--modality image|depth`` (the available modality's reconstruction branch alone: only that
  modality's encoder, decoder and files are used) and ``--missing-depth image_fallback``.

Training uses every training image of the class (``train_set``): the mapping networks (one view code)
with ModMap's optimiser and schedule over images instead of view pairs (``--batch-size`` images per
step), and the decoders with Adam (``--cmdr-lr``) for ``--cmdr-epochs`` epochs. Tokens are encoded once
per image and modality and cached on disk (``<cache>/<dataset>-<class>-<role>-<modality>-<key>/``).

Metrics (``metrics.md``): I-AUROC over per-image scores, P-AUROC over all pixels, exact AUPRO at
every ``--pro-limits`` (8-connected GT regions), per class and the unweighted mean, at the GT's native
resolution (``--eval-res 0``) or CFM's 224 convention (``--eval-res 224``: GT square-padded with edge
replication and nearest-resized). Outputs per class in ``<out>/<dataset>/<class>/``: ``model.pt``
(ModMap's format), ``decoders.pt``, ``train_log.jsonl``, ``scores.csv``, ``metrics.json``,
``timing.json``, ``maps/`` (``--save-maps``/``--viz``); tables in ``<out>/results.{md,csv,json}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from detect.pipeline.artifacts import (
    MODEL_FORMAT_VERSION,
    check_encoders,
    load_model,
    read_scores,
    save_maps,
    save_model,
)
from detect.pipeline.base import (
    FinishedClasses,
    RunError,
    device,
    progress_bar,
    run_classes,
    train_with_progress,
)
from detect.pipeline.results import jsonable, write_csv, write_single_view_results
from detect.pipeline.settings import (
    cache_dir,
    decoder_settings,
    depth_encoder,
    feature_settings,
    image_encoder,
    scoring_settings,
    train_settings,
)
from shared.config import save_config
from shared.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from detect.cmdr import Decoders, ScoringSettings
    from detect.config import DetectConfig
    from detect.data.single_view_datasets import SingleViewClass
    from detect.features import ModalityEncoder, ModalityTokens
    from detect.model import ModMap

MAIN_METRICS = (("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc"), ("AUPRO@30%", "pixel_aupro@0.3"),
                ("AUPRO@1%", "pixel_aupro@0.01"))


def score_norm(cfg: DetectConfig) -> str:
    """``auto``: CFM's normalisations for the CFM-style scorings, raw maps for ModMap's."""
    if cfg.score_norm != "auto":
        return cfg.score_norm
    return "none" if cfg.scoring == "modmap" else "cfm"


def method_name(cfg: DetectConfig) -> str:
    """Short label of the scoring configuration (results tables, folder names)."""
    if cfg.scoring != "cmdr":
        return cfg.scoring
    name = "cmdr" if cfg.modality == "both" else f"cmdr_{cfg.modality}_only"
    return name + ("_image_fallback" if cfg.missing_depth == "image_fallback" else "")


def dataset_options(cfg: DetectConfig) -> dict:
    if cfg.dataset == "mvtec3d":
        return {"bg_removal": cfg.bg_removal, "train_splits": tuple(cfg.train_splits or ("train",))}
    if cfg.dataset == "eyecandies":
        return {"image_index": cfg.eyecandies_image, "train_splits": tuple(cfg.train_splits or ("train",))}
    if cfg.dataset == "sim3d_single":
        return {"views": tuple(cfg.single_views), "view_order": cfg.view_order}
    raise RunError(f"{cfg.dataset!r} is not a single-view dataset")


def limit_records(records: list, n: int) -> list:
    """Evenly spaced subset of ``n`` records (deterministic); all when n is 0 or larger."""
    if not n or n >= len(records):
        return list(records)
    idx = np.unique(np.linspace(0, len(records) - 1, n).round().astype(int))
    return [records[i] for i in idx]



@dataclass
class SampleInputs:
    """What scoring one sample needs (None where the mode does not use a modality)."""

    image: torch.Tensor | None  # (1, T, c_I)
    depth: torch.Tensor | None  # (1, T, c_D)
    depth_raw: np.ndarray | None  # (H, W) NaN-invalid, for the foreground
    geometry: Any


def sample_map(inputs: SampleInputs, model: ModMap | None, decoders: Decoders | None, grid: tuple[int, int],
               size: int, depth_norm: dict, cfg: DetectConfig, scoring: ScoringSettings) -> torch.Tensor:
    """The (size, size) anomaly map of one single-view sample (before any per-image normalisation)."""
    from detect.cmdr import (
        CMDRScorer,
        TokenScores,
        gaussian_smooth,
        reconstruction_distance,
        score_tokens,
        token_foreground,
    )
    from detect.infer import InferenceSettings, depth_input_for_mask, iter_view_maps
    from detect.preprocess import foreground_mask, upsample_tokens

    inf = InferenceSettings(aggregation=cfg.aggregation, blur_sigma=cfg.blur_sigma, fg_connectivity=cfg.fg_connectivity,
                            seed=cfg.seed)
    d_in = None
    if inputs.depth_raw is not None:
        d_in = depth_input_for_mask(inputs.depth_raw, size, depth_norm["mode"], depth_norm["eps"],
                                    tuple(depth_norm["pct"]), depth_norm.get("pad_mode", "edge"))
    if scoring.scoring == "modmap":  # ModMap with one view (= CFM networks), ModMap's maps
        (maps,) = iter_view_maps(model, inputs.image, inputs.depth, grid, lambda t: d_in, size, inf)
        return maps.combined
    if scoring.uses_mapping:  # CFM scoring or the full CMDR fusion: ModMap's per-view path
        (maps,) = iter_view_maps(model, inputs.image, inputs.depth, grid, lambda t: d_in, size, inf,
                                 scorer=CMDRScorer(inf, scoring, decoders))
        return maps.combined
    # Single-modality CMDR: the available modality's reconstruction branch alone.
    if scoring.modality == "image":
        fg = np.ones((size, size), bool)  # no depth: every pixel is scored
        ts = TokenScores(d_image_rec=reconstruction_distance(decoders.image, inputs.image[0], grid).reshape(grid))
    else:
        fg = foreground_mask(d_in, cfg.fg_connectivity)
        ts = TokenScores(d_depth_rec=reconstruction_distance(decoders.depth, inputs.depth[0], grid).reshape(grid))
    dev = (inputs.image if inputs.image is not None else inputs.depth).device
    fused = score_tokens(ts, scoring, token_foreground(fg, grid).to(dev))
    m = upsample_tokens(fused.reshape(-1), grid, size) * torch.from_numpy(np.ascontiguousarray(fg)).to(dev)
    return gaussian_smooth(m, scoring.post_sigma_frac * size)



# -- the runner ------------------------------------------------------------------------------------
def depth_training_data(export: str, dataset: str, name: str | None = None) -> dict:
    """What the DINO-Depth export (a .pth, or the HF folder of ``pretrain.export --format hf``, e.g. a
    hub id's snapshot) says it was pretrained on (``train_meta.data``), for the run report; ``name``:
    what the user gave (``--ckpt``) for the warning.

    Evaluating an encoder that saw MVTec 3D-AD / Eyecandies *test* splits on that benchmark is
    transductive (``modmap.md`` §20): warn, and record it in ``predict_info.json``.
    """
    from shared.encoder_export import export_train_meta

    meta = export_train_meta(export)  # {} when none is recorded: the data is unknown, hence the risk
    ckpt = name or export
    data = meta.get("data") or {}
    splits = list(data.get("splits") or [])
    sources = data.get("sources") or data.get("preset")
    record = {"splits": splits or "unknown", "sources": sources or "unknown"}
    src_text = json.dumps(sources).lower() if sources else ""
    if dataset in ("mvtec3d", "eyecandies") and (not splits or "test" in splits or "all" in splits) \
            and (not sources or dataset in src_text):
        record["transductive_risk"] = True
        warnings.warn(f"the DINO-Depth checkpoint {ckpt} records pretraining splits {splits or 'unknown'} (sources "
                      f"{sources or 'unknown'}): if they include the {dataset} test split, this evaluation is "
                      "transductive (modmap.md §20)", stacklevel=3)
    return record


class SingleViewRunner:
    """Fit / predict / evaluate on a single-view dataset (module docstring)."""

    def __init__(self, cfg: DetectConfig) -> None:
        from detect.features import TokenCache

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = device(cfg.device)
        self.scoring = scoring_settings(cfg)
        self.norm = score_norm(cfg)
        self._encoders: dict[str, ModalityEncoder] | None = None
        self.depth_norm: dict = {}
        self.grid: tuple[int, int] = (0, 0)
        self.cache = TokenCache(cache_dir(cfg), cfg.cache_dtype)
        self.random_encoder = cfg.image_encoder == "random" and self.scoring.uses_image
        self.depth_training_data: dict = {}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, used in (("image", self.scoring.uses_image), ("depth", self.scoring.uses_depth)) if used)

    # -- encoders -------------------------------------------------------------------------------
    def encoders(self) -> dict[str, ModalityEncoder]:
        """The encoders of the modalities in use (an image-only run never loads a depth encoder, nor
        a depth-only run an image encoder — unless ``dinov2_on_depth``/``cnn_on_depth`` makes the image encoder the
        depth encoder)."""
        if self._encoders is not None:
            return self._encoders
        from detect.encoders import IMAGE_ENCODER_ON_DEPTH, check_token_grids

        cfg = self.cfg
        need_image = self.scoring.uses_image or (self.scoring.uses_depth and cfg.depth_encoder in IMAGE_ENCODER_ON_DEPTH)
        image_enc = depth_enc = None
        if need_image:
            image_enc = image_encoder(cfg, self.device)
            self.random_encoder = self.random_encoder or image_enc.info.random
        stored: dict = {}
        if self.scoring.uses_depth:
            depth_enc = depth_encoder(cfg, self.device)
            if depth_enc is None:  # dinov2_on_depth / cnn_on_depth
                depth_enc = image_enc
            else:
                stored = depth_enc.info.input_norm
                if cfg.depth_encoder == "dino_depth":
                    self.depth_training_data = depth_training_data(depth_enc.info.weights, cfg.dataset, cfg.ckpt)
        self.depth_norm, settings = feature_settings(cfg, stored)
        if image_enc is not None and depth_enc is not None:
            grid = check_token_grids(image_enc, depth_enc, cfg.image_size, settings.depth_size,
                                     cfg.depth_token_resample)
        elif image_enc is not None:
            grid = image_enc.grid(cfg.image_size)
        else:
            if settings.depth_size != cfg.image_size:
                raise RunError("depth-only mode encodes depth at --image-size; leave --depth-input-size 0")
            grid = depth_enc.grid(cfg.image_size)
        self.grid = tuple(grid)
        encs = {}
        from detect.features import ModalityEncoder

        if self.scoring.uses_image:
            encs["image"] = ModalityEncoder("image", image_enc, settings, self.grid, cfg.encoder_batch_size)
        if self.scoring.uses_depth:
            encs["depth"] = ModalityEncoder("depth", depth_enc, settings, self.grid, cfg.encoder_batch_size)
        self._encoders = encs
        return encs

    def encoder_record(self) -> dict:
        encs = self.encoders()
        rec: dict = {"modalities": list(encs), "grid": list(self.grid), "depth_norm": dict(self.depth_norm)}
        for m, e in encs.items():
            rec[f"{m}_encoder"] = e.encoder.info.to_dict()
            rec["feature_settings"] = e.settings.to_dict()
        return rec

    # -- data -----------------------------------------------------------------------------------
    def dataset(self, class_name: str) -> SingleViewClass:
        from detect.data.single_view_datasets import SingleViewError, open_single_view_class

        try:
            return open_single_view_class(self.cfg.dataset, self.cfg.data_root, class_name,
                                          **dataset_options(self.cfg))
        except (SingleViewError, ValueError) as exc:
            raise RunError(str(exc)) from None

    def classes(self) -> list[str]:
        from detect.data.single_view_datasets import SingleViewError, list_single_view_classes

        try:
            available = list_single_view_classes(self.cfg.dataset, self.cfg.data_root)
        except SingleViewError as exc:
            raise RunError(str(exc)) from None
        if not self.cfg.classes:
            return available
        missing = [c for c in self.cfg.classes if c not in available]
        if missing:
            raise RunError(f"classes {missing} not found under {self.cfg.data_root}; available: {available}")
        return list(self.cfg.classes)

    def class_dir(self, class_name: str) -> Path:
        return self.out / self.cfg.dataset / class_name

    def tokens(self, ds: SingleViewClass, records: list, role: str, desc: str) -> dict[str, ModalityTokens]:
        out = {}
        for m, enc in self.encoders().items():
            bar = progress_bar(len(records), f"encode {desc} ({m})", self.cfg.progress, "image")
            try:
                out[m] = self.cache.get(enc, ds, records, f"{self.cfg.dataset}-{ds.class_name}-{role}",
                                        dataset_options(self.cfg), bar.update)
            except ValueError as exc:  # a sample the preprocessing refuses: the message names it
                raise RunError(str(exc)) from None
            finally:
                bar.close()
        return out

    def _train_records(self, ds: SingleViewClass) -> list:
        from detect.data.single_view_datasets import SingleViewError

        setup = self.cfg.setup if self.cfg.setup != "both" else "real2real"
        try:
            records = ds.train_set(setup)
        except SingleViewError as exc:
            raise RunError(str(exc)) from None
        return limit_records(records, self.cfg.train_limit)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, class_name: str) -> None:
        from detect.cmdr import decoder_steps, fit_class_decoders
        from detect.fit import batch_plan, fit_single_view_mapping

        cfg = self.cfg
        ds = self.dataset(class_name)
        records = self._train_records(ds)
        t0 = time.perf_counter()
        feats = self.tokens(ds, records, "train", f"{class_name}/train")
        encode_s = time.perf_counter() - t0
        out_dir = self.class_dir(class_name)
        out_dir.mkdir(parents=True, exist_ok=True)
        image = feats["image"].tensor(device=self.device) if "image" in feats else None
        depth = feats["depth"].tensor(device=self.device) if "depth" in feats else None
        valid = torch.from_numpy(feats["depth"].valid).to(self.device) if "depth" in feats else None
        log_lines: list[str] = []
        meta_common = {"format_version": MODEL_FORMAT_VERSION, "dataset": cfg.dataset, "class_name": class_name,
                       "classes": [class_name], "n_views": 1, "view_stems": list(ds.stems), "view_order": "natural",
                       "n_train_images": len(records), "train_images": [r.name for r in records],
                       "dataset_options": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in dataset_options(cfg).items()},
                       "random_image_encoder": self.random_encoder, "seed": cfg.seed,
                       "encode_seconds": round(encode_s, 3), **self.encoder_record()}
        if self.scoring.uses_mapping or self.scoring.scoring != "cmdr":
            settings = train_settings(cfg, match_steps=False)
            _, iters = batch_plan(len(records), cfg.batch_size)
            model, lines, train_s = train_with_progress(
                cfg.epochs * iters, f"fit mapping {class_name}", cfg.progress,
                lambda log, progress: fit_single_view_mapping(image, depth, settings, valid, log, progress),
                {"network": "mapping"})
            log_lines += lines
            meta = {**meta_common, "variant": cfg.variant, "image_dim": int(image.shape[-1]),
                    "depth_dim": int(depth.shape[-1]), "modulator_hidden": cfg.modulator_hidden,
                    "train_settings": {**dataclasses.asdict(settings), "betas": list(settings.betas)},
                    "total_steps": cfg.epochs * iters, "train_seconds": round(train_s, 3)}
            save_model(model, meta, out_dir / "model.pt")
        if self.scoring.scoring == "cmdr":
            dec_settings = decoder_settings(cfg)
            n_dec = int(image is not None) + int(depth is not None)
            bar = progress_bar(decoder_steps(len(records), dec_settings, n_dec), f"fit decoders {class_name}", cfg.progress,
                       "step")
            mask = valid if cfg.loss_mask == "foreground" and valid is not None else None
            t1 = time.perf_counter()
            try:
                decs, dlog = fit_class_decoders(image, depth, self.grid, dec_settings, mask, bar.update,
                                                meta={**meta_common, "modality": cfg.modality})
            finally:
                bar.close()
            decs.meta["train_seconds"] = round(time.perf_counter() - t1, 3)
            decs.save(out_dir / "decoders.pt")
            log_lines += [json.dumps({"network": "decoder", **r}) for r in dlog]
        atomic_write_text(out_dir / "train_log.jsonl", "\n".join(log_lines) + "\n")

    def load_models(self, class_name: str) -> tuple[ModMap | None, Decoders | None]:
        from detect.cmdr import Decoders
        from shared.checkpoint import CheckpointError

        out_dir = self.class_dir(class_name)
        model = decoders = None
        current = self.encoder_record()
        if self.scoring.uses_mapping or self.scoring.scoring != "cmdr":
            path = out_dir / "model.pt"
            model, meta = load_model(path, "single-view ModMap model")
            check_encoders(path, meta, current, current["modalities"])
            model = model.to(self.device).eval()
        if self.scoring.scoring == "cmdr":
            path = out_dir / "decoders.pt"
            if not path.is_file():
                raise RunError(f"no trained decoders {path}: run --mode fit with --scoring cmdr first")
            try:
                decoders = Decoders.load(path, self.device)
            except (CheckpointError, KeyError, RuntimeError, ValueError) as exc:
                raise RunError(f"{path} is not a decoders file: {exc}") from None
            check_encoders(path, decoders.meta, current, current["modalities"])
            for m in self.modalities:
                if getattr(decoders, m) is None:
                    raise RunError(f"{path} has no {m} decoder; refit with --modality {self.cfg.modality}")
        return model, decoders

    # -- predict --------------------------------------------------------------------------------
    def predict(self, class_name: str) -> None:
        from detect.infer import eval_frame
        from detect.metrics import SegmentationAccumulator

        cfg = self.cfg
        ds = self.dataset(class_name)
        if not ds.test_records:
            raise RunError(f"{cfg.dataset} class {class_name}: no test samples under {ds.path}")
        model, decoders = self.load_models(class_name)
        feats = self.tokens(ds, ds.test_records, "test", f"{class_name}/test")
        out_dir = self.class_dir(class_name)
        size = cfg.image_size
        acc_px = SegmentationAccumulator(connectivity=8)
        acc_pro = SegmentationAccumulator(connectivity=8) if self.norm == "cfm" else acc_px
        rows, map_times = [], []
        bar = progress_bar(len(ds.test_records), f"predict {class_name}", cfg.progress, "image")
        for i, rec in enumerate(ds.test_records):
            # The depth gives the foreground; the image is read again only for overlays (or when it is the
            # only modality, for the mask's shape). Tokens come from the cache.
            wanted = ["depth"] if "depth" in feats else ["image"]
            if cfg.viz and "image" in feats and "image" not in wanted:
                wanted.append("image")
            view = ds.load_view(rec, 0, modalities=tuple(wanted))
            geom = next(iter(feats.values())).geometries[i]
            inputs = SampleInputs(
                image=feats["image"].tensor(slice(i, i + 1), self.device) if "image" in feats else None,
                depth=feats["depth"].tensor(slice(i, i + 1), self.device) if "depth" in feats else None,
                depth_raw=view.depth, geometry=geom)
            t0 = time.perf_counter()
            with torch.no_grad():
                m = sample_map(inputs, model, decoders, self.grid, size, self.depth_norm, cfg, self.scoring)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            map_times.append(time.perf_counter() - t0)
            score_map, gt = eval_frame(m, geom, view.mask, cfg.eval_res)
            if self.norm == "cfm":
                from detect.cmdr import cfm_normalizations

                image_score, pixel_map, pro_map = cfm_normalizations(score_map)
                acc_px.add(pixel_map, gt)
                acc_pro.add(pro_map, gt)
            else:
                image_score = float(np.max(score_map))
                acc_px.add(score_map, gt)
            rows.append({"instance": rec.name, "gt_label": rec.label, "pred_score": image_score,
                         "defect_type": ds.load_meta(rec).get("defect_type") or ""})
            self._save_maps(out_dir, rec.name, view, m, score_map)
            bar.update(1)
        bar.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(out_dir / "scores.csv", rows, ["instance", "gt_label", "pred_score", "defect_type"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            px = acc_px.compute(cfg.pro_limits, prefix="pixel")
            pro = acc_pro.compute(cfg.pro_limits, prefix="pixel") if acc_pro is not acc_px else px
        info = {"pixel_auroc": px["pixel_auroc"], "pixel_aupro": {str(k): v for k, v in pro["pixel_aupro"].items()},
                "pro_variant": "exact", "connectivity": pro["connectivity"], "eval_domain": "all",
                "eval_res": "native" if cfg.eval_res <= 0 else cfg.eval_res, "score_norm": self.norm,
                "n_gt_regions": pro["n_regions"], "random_image_encoder": self.random_encoder,
                "depth_encoder_training_data": self.depth_training_data,
                "bg_notes": list(getattr(ds, "bg_notes", []))[:50]}
        atomic_write_json(out_dir / "predict_info.json", jsonable(info))
        atomic_write_json(out_dir / "timing.json", {
            "definition": "per image, map = scoring from cached tokens to the map at the input size (encoding "
                          "excluded; tokens are cached)", "device": str(self.device),
            "mean_map_s": float(np.mean(map_times)) if map_times else None})

    def _save_maps(self, out_dir: Path, name: str, view, m: torch.Tensor, eval_map: np.ndarray) -> None:
        cfg = self.cfg
        if cfg.save_maps == "none" and not cfg.viz:
            return
        arrays: dict = {}
        if cfg.save_maps in ("896", "input"):
            arrays = {"combined": m}
        elif cfg.save_maps == "orig":
            arrays = {"combined": eval_map}
        overlay = None
        if cfg.viz:
            if view.image is not None and cfg.eval_res <= 0:
                img = view.image if view.image.ndim == 2 else view.image.mean(axis=2).astype(np.uint8)
            else:
                img = np.zeros(eval_map.shape, np.uint8)
            overlay = (img, eval_map, "combined.png")
        save_maps(out_dir / "maps" / name, arrays, overlay)

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self, class_name: str) -> dict:
        from detect.metrics import instance_auroc

        cfg = self.cfg
        out_dir = self.class_dir(class_name)
        rows, labels, scores = read_scores(out_dir / "scores.csv")
        info_path = out_dir / "predict_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        metrics: dict = {"class": class_name, "dataset": cfg.dataset, "method": method_name(cfg),
                         "scoring": cfg.scoring, "modality": cfg.modality, "missing_depth": cfg.missing_depth,
                         "n_images": len(rows), "n_anomalous": int(labels.sum()), **info}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            metrics["image_auroc"] = instance_auroc(scores, labels)
        atomic_write_json(out_dir / "metrics.json", jsonable(metrics))
        return metrics



def run_single_view(cfg: DetectConfig) -> dict:
    """Execute a configured single-view run; returns ``{method: {class: metrics}}`` (empty unless evaluating)."""
    from detect.data.sim3d import SiM3DError
    from shared.formats import FormatError

    runner = SingleViewRunner(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    finished = FinishedClasses(cfg, lambda _, c: runner.class_dir(c))
    try:
        classes = runner.classes()
        if finished.all_finished([None], classes):  # a re-submitted task: every output stays as it is
            print(f"every class is finished in {out}: nothing to do", file=sys.stderr)
        else:
            save_config(cfg, out / "config.yaml")
        per_setup = run_classes(cfg.mode, [None], classes, lambda _, c: runner.fit(c),
                                lambda _, c: runner.predict(c), lambda _, c: runner.evaluate(c), finished=finished)
    except (SiM3DError, FormatError) as exc:  # bad or missing dataset files: the message names them
        raise RunError(str(exc)) from None
    results: dict[str, dict] = per_setup.get(None, {})
    if not results or not finished.ran:
        return {}
    random_encoder = runner.random_encoder or any(m.get("random_image_encoder") for m in results.values())
    write_single_view_results(out, cfg.dataset, method_name(cfg), cfg.pro_limits, results, random_encoder)
    return {method_name(cfg): results}
