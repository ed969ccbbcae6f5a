"""Multiview ModMap runs on the SiM3D layout (``../shared/spec/modmap.md`` §18): per class and setup,
fit the mapping networks on the nominal training instance (or one multi-class model per setup, §15),
predict per-view maps, anomaly volumes and instance scores of the test instances, evaluate.

:class:`MultiviewRunner` holds the encoders and the token cache shared by every class of a run;
:func:`run_multiview` drives it through the one class loop (:func:`detect.pipeline.base.run_classes`),
and the ablation study (:mod:`detect.experiments.ablation`) drives the same function with its own
model adoption.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from detect.config import setups
from detect.pipeline.artifacts import (
    MODEL_FORMAT_VERSION,
    check_encoders,
    load_model,
    read_scores,
    save_maps,
    save_model,
    write_volume_ply,
)
from detect.pipeline.base import (
    FinishedClasses,
    RunError,
    device,
    progress_bar,
    run_classes,
    train_with_progress,
)
from detect.pipeline.results import REPLICATES_DIR, jsonable, save_replicates, write_csv, write_results
from detect.pipeline.settings import (
    cache_dir,
    decoder_settings,
    depth_encoder,
    feature_settings,
    geometry_settings,
    image_encoder,
    inference_settings,
    patchcore_settings,
    scoring_settings,
    train_settings,
)
from shared.config import save_config
from shared.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from detect.config import DetectConfig
    from detect.features import FeatureExtractor
    from detect.model import ModMap

MULTICLASS_DIR = "_multiclass"  # <out>/<setup>/_multiclass/model.pt: the one model of a multi-class run
PATCHCORE_FILE = "patchcore.pt"  # <out>/<setup>/<class>/patchcore.pt: --method patchcore's memory banks
SURFACE_FILE = "surface_reference.npz"  # <out>/<setup>/<class>/: the training surface (--patchcore-geometry-tolerance-m)


# -- data ------------------------------------------------------------------------------------------
def class_dataset(cfg: DetectConfig, class_name: str):
    from detect.data.sim3d import SiM3DClass, SiM3DError

    try:
        return SiM3DClass(cfg.data_root, class_name, view_order=cfg.view_order,
                          calib_reader=None if cfg.calib_reader == "none" else cfg.calib_reader,
                          gt_reader=None if cfg.gt_reader == "none" else cfg.gt_reader)
    except (SiM3DError, KeyError) as exc:
        raise RunError(str(exc).strip("'\"")) from None


def list_run_classes(cfg: DetectConfig) -> list[str]:
    from detect.data.sim3d import SiM3DError, list_classes

    try:
        available = list_classes(cfg.data_root)
    except SiM3DError as exc:
        raise RunError(str(exc)) from None
    if not cfg.classes:
        if not available:
            raise RunError(f"no class folders with instances under {cfg.data_root}")
        return available
    missing = [c for c in cfg.classes if c not in available]
    if missing:
        raise RunError(f"classes {missing} not found under {cfg.data_root}; available: {available}")
    return list(cfg.classes)


def load_view(ds, record, view_id: int):
    from detect.data.sim3d import SiM3DError

    try:
        return ds.load_view(record, view_id)
    except SiM3DError as exc:
        msg = str(exc)
        if "calibration" in msg:
            msg += "\nhint: --calib-reader none runs 2D-only detection (per-view maps and I-AUROC, no volumes)"
        raise RunError(msg) from None


def view_sources(ds, record) -> list:
    from detect.features import ViewSource

    def loader(i: int):
        def load():
            v = load_view(ds, record, i)
            return v.image, v.depth
        return load

    return [ViewSource(vf.stem, loader(i), (str(vf.depth_path), str(vf.image_path)))
            for i, vf in enumerate(record.views)]


# RUNNER
class MultiviewRunner:
    """Holds the encoders and feature cache shared by every class of a run."""

    def __init__(self, cfg: DetectConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = device(cfg.device)
        self._extractor: FeatureExtractor | None = None
        self._cache = None
        self.random_encoder = cfg.image_encoder == "random"
        self.depth_norm: dict = {}

    # -- encoders and features (built lazily: evaluate needs none) --------------------------------
    def extractor(self) -> FeatureExtractor:
        from detect.features import FeatureCache, FeatureExtractor

        if self._extractor is not None:
            return self._extractor
        cfg = self.cfg
        image_enc = image_encoder(cfg, self.device)
        depth_enc = depth_encoder(cfg, self.device)
        self.depth_norm, settings = feature_settings(cfg, depth_enc.info.input_norm if depth_enc is not None else {})
        self._extractor = FeatureExtractor(image_enc, depth_enc, settings, cfg.encoder_batch_size)
        self._cache = FeatureCache(self._extractor, cache_dir(cfg), cfg.cache_dtype)
        return self._extractor

    def features(self, ds, record, desc: str):
        self.extractor()
        assert self._cache is not None
        sources = view_sources(ds, record)
        bar = progress_bar(len(sources), f"encode {desc}", self.cfg.progress, "view")
        self._cache.progress = bar.update
        t0 = time.perf_counter()
        try:
            feats = self._cache.get(str(record.path.resolve()), sources)
        finally:
            bar.close()
        return feats, time.perf_counter() - t0

    def encoder_record(self) -> dict:
        ex = self.extractor()
        return {
            "image_encoder": ex.image_encoder.info.to_dict(),
            "depth_encoder": ex.depth_encoder.info.to_dict() | {"kind": self.cfg.depth_encoder},
            "depth_norm": dict(self.depth_norm),
            "feature_settings": ex.settings.to_dict(),
            "grid": list(ex.grid),
        }

    def class_dir(self, setup: str, class_name: str) -> Path:
        return self.out / setup / class_name

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, setup: str, class_name: str) -> Path:
        """The mapping networks of one class on its nominal training instance (+ CMDR decoders)."""
        from detect.fit import fit_modmap, total_training_steps

        cfg = self.cfg
        ds = class_dataset(cfg, class_name)
        record = self.train_record(ds, setup)
        feats, encode_s = self.features(ds, record, f"{class_name}/{record.name}")
        image, depth, valid = feats.tensors(self.device)
        if cfg.method == "patchcore":
            return self._fit_patchcore(setup, class_name, ds, record, feats, image, depth, valid, encode_s)
        settings = train_settings(cfg)
        _, _, total = total_training_steps(feats.n_views, settings)
        out_dir = self.class_dir(setup, class_name)
        model, train_s = self._train(out_dir, total, f"fit {setup}/{class_name}",
                                     lambda log, progress: fit_modmap(image, depth, settings, valid, log=log,
                                                                      progress=progress))
        meta = {
            "format_version": MODEL_FORMAT_VERSION, "variant": cfg.variant, "n_views": feats.n_views,
            "view_stems": feats.stems, "view_order": ds.view_order, "classes": [class_name],
            "class_name": class_name, "setup": setup, "train_instance": record.name,
            "image_dim": int(image.shape[-1]), "depth_dim": int(depth.shape[-1]),
            "modulator_hidden": cfg.modulator_hidden, "seed": cfg.seed,
            "train_settings": {**dataclasses.asdict(settings), "betas": list(settings.betas)}, "total_steps": total,
            "random_image_encoder": self.random_encoder, "train_seconds": round(train_s, 3),
            "encode_seconds": round(encode_s, 3), **self.encoder_record(),
        }
        path = out_dir / "model.pt"
        save_model(model, meta, path)
        if cfg.scoring == "cmdr":  # CMDR-IAD reconstruction decoders on the same cached tokens (detect/cmdr.py)
            self._fit_decoders(out_dir, image, depth, valid, feats.grid, meta, f"{setup}/{class_name}")
        return path

    def _fit_patchcore(self, setup: str, class_name: str, ds, record, feats, image, depth, valid,
                       encode_s: float) -> Path:
        """PatchCore's memory banks of one class from its training instance's object tokens (``patchcore.pt``)."""
        from detect.patchcore import build_bank
        from shared.checkpoint import save_checkpoint

        t0 = time.perf_counter()
        settings = patchcore_settings(self.cfg)
        copies = []
        if self.cfg.patchcore_bank_shift:  # shifted copies of the training views (encoded here, not cached)
            s = self.cfg.patchcore_bank_shift
            sources = view_sources(ds, record)
            copies = [self.extractor().encode_shifted(sources, shift, with_depth=settings.features != "image")
                      for shift in ((s, 0), (0, s), (s, s))]
        bank = build_bank(image, depth, valid, settings, copies)
        geometry = {}
        if self.cfg.patchcore_geometry_tolerance_m > 0:  # nominal–actual comparison (detect/geometry.py)
            from detect.geometry import SurfaceReference
            from detect.patchcore import leave_one_view_out_scale

            views = [(v.depth, v.calib) for v in (load_view(ds, record, i) for i in range(ds.n_views))]
            reference = SurfaceReference.from_views(views, geometry_settings(self.cfg).voxel_m)
            reference.save(self.class_dir(setup, class_name) / SURFACE_FILE)
            geometry = {"score_scale": leave_one_view_out_scale(image, depth, valid, settings),
                        "reference_points": len(reference.points)}
        meta = {
            "format_version": MODEL_FORMAT_VERSION, "method": "patchcore", "n_views": feats.n_views,
            "view_stems": feats.stems, "view_order": ds.view_order, "class_name": class_name, "setup": setup,
            "train_instance": record.name, "bank_tokens": bank.size(), "random_image_encoder": self.random_encoder,
            "build_seconds": round(time.perf_counter() - t0, 3), "encode_seconds": round(encode_s, 3),
            **geometry, **self.encoder_record(),
        }
        path = self.class_dir(setup, class_name) / PATCHCORE_FILE
        save_checkpoint({"patchcore": bank.state(), "config": meta}, path)
        return path

    def load_patchcore(self, setup: str, class_name: str, n_views: int, stems: list[str]):
        """The class's PatchCore memory banks, checked against this run's views and encoders."""
        from detect.patchcore import PatchCoreBank
        from shared.checkpoint import CheckpointError, load_checkpoint

        path = self.class_dir(setup, class_name) / PATCHCORE_FILE
        if not path.is_file():
            raise RunError(f"no PatchCore memory banks {path}: run --mode fit (or all) with --method patchcore first")
        try:
            obj = load_checkpoint(path)
            meta = dict(obj["config"])
            bank = PatchCoreBank.from_state(obj["patchcore"])
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{path} is not a PatchCore memory-bank file: {exc}") from None
        if int(meta["n_views"]) != n_views or list(meta["view_stems"]) != list(stems):
            raise RunError(f"view mismatch for {setup}/{class_name}: the memory banks in {path} hold views "
                           f"{meta['view_stems']} but the test instances have {n_views} views {list(stems)}")
        check_encoders(path, meta, self.encoder_record())
        return bank, meta

    def load_surface(self, setup: str, class_name: str, meta: dict):
        """(reference surface, score scale, training views or None) of ``--patchcore-geometry-tolerance-m``
        (the views: the templates of ``--patchcore-template-tolerance``), or None when it is off."""
        from detect.geometry import SurfaceReference, TemplateView

        if self.cfg.patchcore_geometry_tolerance_m <= 0:
            return None
        path = self.class_dir(setup, class_name) / SURFACE_FILE
        if not path.is_file() or "score_scale" not in meta:
            raise RunError(f"no surface reference {path}: run --mode fit (or all) with --patchcore-geometry-tolerance-m > 0 first")
        try:
            reference = SurfaceReference.load(path)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        templates = None
        if self.cfg.patchcore_template_tolerance > 0 or self.cfg.patchcore_see_through_m > 0:
            ds = class_dataset(self.cfg, class_name)
            record = self.train_record(ds, setup)
            if record.name != meta.get("train_instance"):
                raise RunError(f"{path.parent}: fitted on {meta.get('train_instance')}, but the {setup} training "
                               f"instance is now {record.name}: run --mode fit again")
            templates = [TemplateView(v.image, v.depth, v.calib)
                         for v in (load_view(ds, record, i) for i in range(ds.n_views))]
        return reference, float(meta["score_scale"]), templates

    def _surface_refine(self, ds, record, surface, current: dict, loaded: dict):
        """The per-view map refinement of ``--patchcore-geometry-tolerance-m``: the instance registered to the
        reference once, then each view's map weighted by its template support (``--patchcore-template-tolerance``)
        and fused with its surface deviation, and the scores of pixels that look through a hole moved to its rim
        (``--patchcore-see-through-m``; detect/geometry.py). The views read here are left in ``loaded`` (view
        index → view) for the map loop; their 3D points, computed once for the registration, serve every
        comparison."""
        from detect.geometry import (
            InstanceSurface,
            deviation_map,
            fuse_scores,
            register,
            see_through,
            template_support,
            view_points,
        )
        from detect.infer import RefinedView

        reference, scale, templates = surface
        s = geometry_settings(self.cfg)
        loaded.update((i, load_view(ds, record, i)) for i in range(ds.n_views))
        view_pts = {i: view_points(v.depth, v.calib) for i, v in loaded.items()}  # once per view and instance
        measured = np.concatenate([p[0] for p in view_pts.values()])
        transform = register(measured, reference, s)
        see = self.cfg.patchcore_see_through_m
        instance_surface = InstanceSurface(measured, reference, transform, s) if see > 0 else None

        def refine(t: int, score_map: np.ndarray) -> RefinedView:
            view = current["view"]
            points = view_pts.pop(t, None) or view_points(view.depth, view.calib)
            support = None
            if self.cfg.patchcore_template_tolerance > 0:
                support = template_support(view.image, view.depth, view.calib, transform, templates[t],
                                           self.cfg.patchcore_template_tolerance, s, points=points)
            deviation = deviation_map(view.depth, view.calib, transform, reference, s, points=points)
            refined = RefinedView(fuse_scores(score_map, deviation, scale, s.tolerance_m, support))
            if instance_surface is not None:
                refined.moved, refined.moved_to = see_through(view.depth, view.calib, transform, templates[t],
                                                              instance_surface, see, points=points)
            return refined
        return refine

    def fit_multiclass(self, setup: str, classes: Sequence[str]) -> Path:
        """One model for ``classes`` (in that order) on their training instances (§15)."""
        from detect.fit import fit_multiclass, total_multiclass_steps

        cfg = self.cfg
        feats, stems, records, view_orders = [], {}, {}, {}
        encode_s = 0.0
        for class_name in classes:
            ds = class_dataset(cfg, class_name)
            record = self.train_record(ds, setup)
            f, secs = self.features(ds, record, f"{class_name}/{record.name}")
            encode_s += secs
            feats.append(f.tensors(self.device))
            stems[class_name] = list(f.stems)
            records[class_name] = record.name
            view_orders[class_name] = ds.view_order
        settings = train_settings(cfg)
        n_views = [int(f[0].shape[0]) for f in feats]
        _, _, total = total_multiclass_steps(n_views, settings, cfg.class_balanced)
        path = self.multiclass_model_path(setup)
        model, train_s = self._train(path.parent, total, f"fit {setup}/multi-class ({len(classes)} classes)",
                                     lambda log, progress: fit_multiclass(feats, settings, cfg.class_balanced,
                                                                          log=log, progress=progress))
        meta = {
            "format_version": MODEL_FORMAT_VERSION, "variant": cfg.variant, "multi_class": True,
            "class_balanced": cfg.class_balanced, "classes": list(classes), "n_classes": len(classes),
            "n_views": max(n_views), "n_views_per_class": dict(zip(classes, n_views)),
            "view_stems_per_class": stems, "view_order_per_class": view_orders, "setup": setup,
            "train_instances": records, "image_dim": int(feats[0][0].shape[-1]),
            "depth_dim": int(feats[0][1].shape[-1]), "modulator_hidden": cfg.modulator_hidden, "seed": cfg.seed,
            "train_settings": {**dataclasses.asdict(settings), "betas": list(settings.betas)}, "total_steps": total,
            "random_image_encoder": self.random_encoder, "train_seconds": round(train_s, 3),
            "encode_seconds": round(encode_s, 3), **self.encoder_record(),
        }
        save_model(model, meta, path)
        return path

    @staticmethod
    def train_record(ds, setup: str):
        from detect.data.sim3d import SiM3DError

        try:
            return ds.train_record(setup)
        except SiM3DError as exc:
            raise RunError(str(exc)) from None

    def _train(self, out_dir: Path, total: int, desc: str, train: Callable) -> tuple[ModMap, float]:
        """Run ``train(log, progress)`` (:func:`train_with_progress`); writes ``train_log.jsonl``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        model, log_lines, train_s = train_with_progress(total, desc, self.cfg.progress, train)
        atomic_write_text(out_dir / "train_log.jsonl", "\n".join(log_lines) + "\n")
        return model, train_s

    def _fit_decoders(self, out_dir: Path, image, depth, valid, grid, meta: dict, desc: str) -> None:
        """The two decoders on the training instance's N views: ``decoders.pt`` + ``decoders_log.jsonl``;
        the model's encoder record is stored with them."""
        from detect.cmdr import decoder_steps, fit_class_decoders

        settings = decoder_settings(self.cfg)
        mask = valid if self.cfg.loss_mask == "foreground" else None
        bar = progress_bar(decoder_steps(image.shape[0], settings, 2), f"fit decoders {desc}", self.cfg.progress,
                           "step")
        try:
            decs, log = fit_class_decoders(image, depth, grid, settings, mask, bar.update,
                                           meta={k: meta[k] for k in ("image_encoder", "depth_encoder",
                                                                      "feature_settings", "view_stems", "class_name")
                                                 if k in meta})
        finally:
            bar.close()
        decs.save(out_dir / "decoders.pt")
        atomic_write_text(out_dir / "decoders_log.jsonl", "\n".join(json.dumps(r) for r in log) + "\n")

    def multiclass_model_path(self, setup: str) -> Path:
        return self.out / setup / MULTICLASS_DIR / "model.pt"

    def load_model(self, setup: str, class_name: str, n_views: int, stems: list[str]) -> tuple[ModMap, dict]:
        """The class's model (multi-class: the setup's one model, ``meta["class_index"]`` = the class's slot)."""
        if self.cfg.multi_class:
            path = self.multiclass_model_path(setup)

            def check(meta: dict) -> None:
                classes = list(meta["classes"])
                if class_name not in classes:
                    raise RunError(f"class {class_name} is not one of the classes {classes} the multi-class model "
                                   f"{path} was trained on")
                trained_stems = list(meta["view_stems_per_class"][class_name])
                if trained_stems != list(stems) or len(stems) != n_views:
                    raise RunError(f"view mismatch for {setup}/{class_name}: the multi-class model in {path} was "
                                   f"trained on views {trained_stems} of this class but the test instances have "
                                   f"{n_views} views {list(stems)}")

            model, meta = load_model(path, "multi-class ModMap model", multi_class=True, check_meta=check,
                                     missing_hint="run --mode fit (or all) with multi_class=true first")
            meta["class_index"] = list(meta["classes"]).index(class_name)
        else:
            path = self.class_dir(setup, class_name) / "model.pt"

            def check(meta: dict) -> None:
                trained_views, trained_stems = int(meta["n_views"]), list(meta["view_stems"])
                if trained_views != n_views or trained_stems != list(stems):
                    raise RunError(f"view mismatch for {setup}/{class_name}: the model in {path} was trained on "
                                   f"{trained_views} views {trained_stems} but the test instances have {n_views} "
                                   f"views {stems}")

            model, meta = load_model(path, "ModMap model", check_meta=check)
        check_encoders(path, meta, self.encoder_record())
        return model.to(self.device).eval(), meta

    def scorer(self, out_dir: Path):
        """The per-view scorer of ``--scoring`` (None: ModMap's own maps)."""
        from detect.cmdr import CMDRScorer, Decoders

        scoring = scoring_settings(self.cfg)
        if scoring.scoring == "modmap":
            return None
        decoders = None
        if scoring.scoring == "cmdr":
            path = out_dir / "decoders.pt"
            if not path.is_file():
                raise RunError(f"no reconstruction decoders {path}: run --mode fit with --scoring cmdr first")
            decoders = Decoders.load(path, self.device)
            check_encoders(path, decoders.meta, self.encoder_record())
        return CMDRScorer(inference_settings(self.cfg), scoring, decoders)

    # -- predict --------------------------------------------------------------------------------
    def predict(self, setup: str, class_name: str) -> None:
        from detect.infer import predict_instance
        from detect.metrics import (
            InstanceElements,
            SegmentationAccumulator,
            class_seed,
            object_pixel_domain,
        )
        from detect.volume import bounding_grid

        cfg = self.cfg
        ds = class_dataset(cfg, class_name)
        if not ds.test_records:
            raise RunError(f"class {class_name}: no test instances under {ds.path}")
        out_dir = self.class_dir(setup, class_name)
        inf = inference_settings(cfg)
        if cfg.method == "patchcore":  # no mapping networks: the memory banks score (detect/patchcore.py)
            from detect.patchcore import PatchCoreScorer

            model, class_id = None, None
            bank, bank_meta = self.load_patchcore(setup, class_name, ds.n_views, ds.stems)
            scorer = PatchCoreScorer(inf, bank)
            surface = self.load_surface(setup, class_name, bank_meta)
        else:
            model, model_meta = self.load_model(setup, class_name, ds.n_views, ds.stems)
            class_id = model_meta.get("class_index")  # multi-class models only
            scorer = self.scorer(out_dir)  # cfm/cmdr scoring (detect/cmdr.py); None = ModMap's own maps
            surface = None
        rows, timings = [], []
        pixel_acc = SegmentationAccumulator()
        # a new prediction: replicates of an earlier one must not enter the class mean (saved again below)
        shutil.rmtree(out_dir / REPLICATES_DIR, ignore_errors=True)
        # object-foreground pixels (valid depth ∪ GT) per instance: metrics with bootstrap intervals
        object_px = InstanceElements()
        has_pixel_gt = True
        no_volume_reason = None
        bar = progress_bar(len(ds.test_records), f"predict {setup}/{class_name}", cfg.progress, "instance")
        for record in ds.test_records:
            feats, encode_s = self.features(ds, record, f"{class_name}/{record.name}")
            image, depth, _ = feats.tensors(self.device)
            gt = ds.load_gt(record)
            grid = None
            if ds.has_calibration:
                if gt is not None:
                    grid = gt.grid
                else:
                    views = [(v.depth, v.calib) for v in (load_view(ds, record, i) for i in range(ds.n_views))]
                    grid = bounding_grid(views, cfg.voxel_size, cfg.project_stride)
                    del views
            else:
                no_volume_reason = "no calibration reader (--calib-reader none): 2D-only detection"
            current: dict = {}
            loaded: dict = {}  # views the surface registration read already (read once per instance)

            def load(t: int, _rec=record, _cur=current, _loaded=loaded):
                v = _loaded.pop(t, None)
                if v is None:
                    v = load_view(ds, _rec, t)
                _cur["view"] = v
                return v.depth, v.calib

            def on_view(maps, combined_orig, _rec=record, _cur=current, _geoms=feats.geometries):
                nonlocal has_pixel_gt
                view = _cur["view"]
                if view.mask is not None and has_pixel_gt:
                    pixel_acc.add(combined_orig, view.mask)
                    object_px.add(_rec.name, combined_orig, view.mask, object_pixel_domain(view.depth, view.mask),
                                  label=_rec.label)
                else:
                    has_pixel_gt = False
                self._save_maps(out_dir, _rec.name, view, maps, combined_orig, _geoms[maps.view])

            refine, register_s = None, 0.0
            if cfg.method == "patchcore" and surface is not None:
                t0 = time.perf_counter()
                refine = self._surface_refine(ds, record, surface, current, loaded)
                register_s = time.perf_counter() - t0
            pred = predict_instance(model, image, depth, feats.grid, load, feats.geometries, cfg.image_size,
                                    self.depth_norm, inf, grid, on_view, class_id, scorer, refine)
            pred.timing.encode_s = encode_s
            pred.timing.volume_s += register_s
            if pred.volume is not None:
                vol_dir = out_dir / "volumes"
                vol_dir.mkdir(parents=True, exist_ok=True)
                pred.volume.save_npz(vol_dir / f"{record.name}.npz", label=np.int64(record.label),
                                     random_image_encoder=np.bool_(self.random_encoder))
                if cfg.save_ply:
                    write_volume_ply(pred.volume, vol_dir / f"{record.name}.ply")
            rows.append({"instance": record.name, "gt_label": record.label, "pred_score": pred.pred_score,
                         "pred_score_2d": pred.pred_score_2d,
                         "dropped_points": pred.volume.dropped if pred.volume is not None else 0})
            timings.append({"instance": record.name, **pred.timing.to_dict()})
            bar.update(1)
        bar.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(out_dir / "scores.csv", rows, ["instance", "gt_label", "pred_score", "pred_score_2d",
                                                  "dropped_points"])
        mean = {k: float(np.mean([t[k] for t in timings])) for k in ("encode_s", "map_s", "volume_s")}
        atomic_write_json(out_dir / "timing.json", {
            "definition": "per instance; encode = preprocessing + both encoders (0 when cached), map = "
                          "min-ensembled per-view maps incl. upsampling/foreground/combination, volume = "
                          "undo geometry + back-projection + voxel aggregation (modmap.md §13), plus the surface "
                          "registration, deviation maps, template support and see-through check with "
                          "patchcore_geometry_tolerance_m",
            "device": str(self.device), "mean": mean, "instances": timings})
        extra = {"random_image_encoder": self.random_encoder, "volumes": no_volume_reason is None}
        if no_volume_reason:
            extra["no_volume_reason"] = no_volume_reason
            print(f"[{setup}/{class_name}] {no_volume_reason}", file=sys.stderr)
        if has_pixel_gt and pixel_acc.n_samples:
            px = pixel_acc.compute(cfg.pro_limits, prefix="pixel")
            extra["pixel"] = {"pixel_auroc": px["pixel_auroc"],
                              "pixel_aupro": {str(k): v for k, v in px["pixel_aupro"].items()},
                              "pixel_connectivity": px["connectivity"], "pixel_eval_domain": "all",
                              "pixel_eval_res": "original (GT native resolution)"}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                # each class under its own seed: the replicates also give the class mean's interval (results.md)
                op = object_px.metrics(cfg.pro_limits, "pixel", seed=class_seed(cfg.seed, class_name),
                                       replicates=True)
            save_replicates(out_dir, "object_pixel_auroc", *op["replicates"]["pixel_auroc"])
            extra["pixel"].update({
                "object_pixel_auroc": op["pixel_auroc"].value, "object_pixel_auroc_ci": op["pixel_auroc"].to_dict(),
                "object_pixel_aupro": {str(k): v.value for k, v in op["pixel_aupro"].items()},
                "object_pixel_aupro_ci": {str(k): v.to_dict() for k, v in op["pixel_aupro"].items()},
                "object_pixel_eval_domain": "object foreground: valid depth ∪ GT-anomalous pixels"})
        atomic_write_json(out_dir / "predict_info.json", extra)

    def _save_maps(self, out_dir: Path, instance: str, view, maps, combined_orig: np.ndarray, geom) -> None:
        cfg = self.cfg
        if cfg.save_maps == "none" and not cfg.viz:
            return
        from detect.preprocess import undo_geometry

        arrays: dict = {}
        if cfg.save_maps in ("896", "input"):
            arrays = {f"{view.stem}_img2depth": maps.img2depth, f"{view.stem}_depth2img": maps.depth2img,
                      f"{view.stem}_combined": maps.combined}
        elif cfg.save_maps == "orig":
            arrays = {f"{view.stem}_img2depth": undo_geometry(maps.img2depth, geom),
                      f"{view.stem}_depth2img": undo_geometry(maps.depth2img, geom),
                      f"{view.stem}_combined": combined_orig}
        save_maps(out_dir / "maps" / instance, arrays,
                  (view.image, combined_orig, f"{view.stem}_combined.png") if cfg.viz else None)

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self, setup: str, class_name: str) -> dict:
        from detect.metrics import class_seed, instance_auroc, instance_score_elements

        cfg = self.cfg
        out_dir = self.class_dir(setup, class_name)
        scores_path = out_dir / "scores.csv"
        rows, labels, scores = read_scores(scores_path, "ModMap scores file")
        info_path = out_dir / "predict_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        metrics: dict = {"class": class_name, "setup": setup, "n_instances": len(rows),
                         "n_anomalous": int(labels.sum()),
                         "random_image_encoder": bool(info.get("random_image_encoder", False))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            metrics["image_auroc"] = instance_auroc(scores, labels)
            if len(set(labels.tolist())) == 2:  # 95 % stratified bootstrap interval over instances
                # each class under its own seed: the replicates also give the class mean's interval (results.md)
                inst = instance_score_elements(scores, labels, [r["instance"] for r in rows])
                res = inst.metrics((), "image", seed=class_seed(cfg.seed, class_name), replicates=True)
                metrics["image_auroc_ci"] = res["image_auroc"].to_dict()
                save_replicates(out_dir, "image_auroc", *res["replicates"]["image_auroc"])
        if info.get("pixel"):
            metrics.update(info["pixel"])
        ds = class_dataset(cfg, class_name) if cfg.gt_reader != "none" else None
        if ds is not None and info.get("volumes", True):
            vox_el = voxel_elements(cfg, ds, out_dir, rows, progress_desc=f"evaluate {setup}/{class_name}")
            if vox_el.n_instances:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    vox = vox_el.exact(cfg.pro_limits, prefix="voxel")
                    ci = vox_el.metrics(cfg.pro_limits, "voxel", seed=class_seed(cfg.seed, class_name), replicates=True)
                if "voxel_aupro@0.01" in ci["replicates"]:
                    save_replicates(out_dir, "voxel_aupro@0.01", *ci["replicates"]["voxel_aupro@0.01"])
                metrics["voxel_auroc"] = vox["voxel_auroc"]
                metrics["voxel_aupro"] = {str(k): v for k, v in vox["voxel_aupro"].items()}
                metrics["voxel_auroc_ci"] = ci["voxel_auroc"].to_dict()
                metrics["voxel_aupro_ci"] = {str(k): v.to_dict() for k, v in ci["voxel_aupro"].items()}
                metrics["bootstrap"] = ci["bootstrap"]
                metrics.update(pro_variant="exact", connectivity=vox["connectivity"], eval_domain=cfg.eval_domain,
                               n_voxels=vox["n_elements"], n_gt_regions=vox["n_regions"])
        atomic_write_json(out_dir / "metrics.json", jsonable(metrics))
        return metrics


def voxel_elements(cfg: DetectConfig, ds, out_dir: Path, rows: Sequence[dict], progress_desc: str = ""):
    """The predicted volumes ``<out_dir>/volumes/<instance>.npz`` of the instances in ``rows`` (a
    ``scores.csv``) against the GT volumes of ``ds``, as :class:`detect.metrics.InstanceElements` on the
    run's evaluation domain: what ``evaluate`` scores, and what a paired comparison of two runs on the
    same instances resamples (:mod:`detect.pipeline.compare`)."""
    from detect.metrics import InstanceElements
    from detect.volume import SparseVolume, resample_to_grid

    vox_el = InstanceElements()  # voxels grouped by instance: exact metrics + bootstrap intervals
    by_name = {r.name: r for r in ds.test_records}
    scores_path = out_dir / "scores.csv"
    bar = progress_bar(len(rows), progress_desc or "volumes", cfg.progress and bool(progress_desc), "instance")
    for r in rows:
        record = by_name.get(r["instance"])
        if record is None:
            raise RunError(f"{scores_path}: instance {r['instance']} is not in the dataset {ds.path}")
        bar.update(1)
        gt = ds.load_gt(record)
        vol_path = out_dir / "volumes" / f"{r['instance']}.npz"
        try:
            vol = SparseVolume.load(vol_path)
        except (FileNotFoundError, ValueError) as exc:
            raise RunError(str(exc)) from None
        if gt is None:
            if record.label:
                warnings.warn(f"{ds.path.name}/{record.name}: anomalous instance without a GT volume is "
                              "left out of the voxel metrics", stacklevel=2)
                continue
            # A nominal instance without GT: every voxel of its own grid is nominal.
            pred, labels, occ_gt, grid = vol.dense(), np.zeros(vol.grid.shape, bool), None, vol.grid
        else:
            pred = resample_to_grid(vol.dense(), vol.grid, gt.grid)
            labels, occ_gt, grid = gt.labels, gt.occupancy, gt.grid
        if cfg.eval_domain == "occupied":
            if occ_gt is None:  # the voxels hit by valid depth (metrics.md §7), on the GT grid
                occ_gt = resample_to_grid(vol.occupancy().astype(np.float32), vol.grid, grid) > 0
            domain = occ_gt | labels
        else:
            domain = None
        vox_el.add(r["instance"], pred, labels, domain, label=record.label)
    bar.close()
    return vox_el


def fit_units(cfg: DetectConfig, classes: Sequence[str]) -> list[str]:
    """The model folders a run fits per setup: each class's, or the one multi-class model's."""
    return [MULTICLASS_DIR] if cfg.multi_class else list(classes)


def run_multiview(cfg: DetectConfig, adopt: Callable[[str, str], bool] | None = None) -> dict:
    """Execute a configured multiview run; returns ``{setup: {class: metrics}}`` (empty unless evaluating).

    ``adopt(setup, unit)`` (the ablation study) may supply the trained model of a class — or of the
    multi-class model, unit ``_multiclass`` — instead of fitting it; it returns False to have it fitted.
    """
    runner = MultiviewRunner(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list_run_classes(cfg)
    finished = FinishedClasses(cfg, runner.class_dir)
    if finished.all_finished(setups(cfg), classes):  # a re-submitted task: every output stays as it is
        print(f"every class is finished in {out}: nothing to do", file=sys.stderr)
    else:
        save_config(cfg, out / "config.yaml")

    def fit(setup: str, class_name: str) -> None:
        if adopt is None or not adopt(setup, class_name):
            runner.fit(setup, class_name)

    def fit_all(setup: str) -> None:
        if adopt is None or not adopt(setup, MULTICLASS_DIR):
            runner.fit_multiclass(setup, classes)

    results = run_classes(cfg.mode, setups(cfg), classes, None if cfg.multi_class else fit, runner.predict,
                          runner.evaluate, fit_all if cfg.multi_class else None, finished)
    if results and finished.ran:
        random_encoder = cfg.image_encoder == "random" or any(
            m.get("random_image_encoder") for per in results.values() for m in per.values())
        title = {"modmap": "ModMap results", "cfm": "ModMap with CFM scoring: results",
                 "cmdr": "ModMap with CMDR-IAD scoring: results"}[cfg.scoring]
        if cfg.method == "patchcore":
            title = f"PatchCore results ({cfg.patchcore_features} tokens, per-{cfg.patchcore_bank} memory banks)"
        write_results(out, results, random_encoder, title)
    return results
