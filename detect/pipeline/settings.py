"""The library's settings dataclasses and encoders, built from a :class:`detect.config.DetectConfig`:
the one place where the command-line config meets the library (which never sees it)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from detect.pipeline.base import RunError

if TYPE_CHECKING:
    import torch

    from detect.cmdr import DecoderSettings, ScoringSettings
    from detect.config import DetectConfig
    from detect.encoders import FrozenEncoder
    from detect.features import FeatureSettings
    from detect.fit import TrainSettings
    from detect.infer import InferenceSettings
    from detect.patchcore import PatchCoreSettings


def train_settings(cfg: DetectConfig, match_steps: bool | None = None) -> TrainSettings:
    """Mapping-network optimisation (``match_steps``: the config's unless given; single view has none)."""
    from detect.fit import TrainSettings

    return TrainSettings(variant=cfg.variant, epochs=cfg.epochs, batch_size=cfg.batch_size, lr_max=cfg.lr_max,
                         loss_mask=cfg.loss_mask,
                         match_steps=cfg.match_steps if match_steps is None else match_steps,
                         modulator_hidden=cfg.modulator_hidden, seed=cfg.seed)


def inference_settings(cfg: DetectConfig) -> InferenceSettings:
    from detect.infer import InferenceSettings

    return InferenceSettings(aggregation=cfg.aggregation, blur_sigma=cfg.blur_sigma,
                             fg_connectivity=cfg.fg_connectivity, num_source_views=cfg.num_source_views,
                             num_target_views=cfg.num_target_views, source_chunk=cfg.source_chunk,
                             project_stride=cfg.project_stride, seed=cfg.seed, fg_erosion=cfg.fg_erosion,
                             view_aggregation=cfg.view_aggregation, occlusion_gate_m=cfg.occlusion_gate_m,
                             occlusion_gate_tokens=cfg.occlusion_gate_tokens)


def geometry_settings(cfg: DetectConfig):
    """``--patchcore-geometry-tolerance-m``'s nominal–actual comparison (detect/geometry.py; other fields its defaults)."""
    from detect.geometry import GeometrySettings

    tolerance = cfg.patchcore_geometry_tolerance_m
    return GeometrySettings(tolerance_m=tolerance if tolerance > 0 else GeometrySettings.tolerance_m,
                            warp_slab_m=cfg.patchcore_warp_slab_m, warp_smoothness=cfg.patchcore_warp_smoothness)


def scoring_settings(cfg: DetectConfig) -> ScoringSettings:
    """``--scoring``/``--modality``/``--missing-depth`` and the CMDR smoothing widths (validated)."""
    from detect.cmdr import POST_SIGMA_FRAC, PRE_SIGMA_FRAC, ScoringSettings

    s = ScoringSettings(scoring=cfg.scoring, modality=cfg.modality, missing_depth=cfg.missing_depth,
                        window=cfg.cmdr_window,
                        pre_sigma_frac=PRE_SIGMA_FRAC if cfg.cmdr_pre_sigma < 0 else cfg.cmdr_pre_sigma,
                        post_sigma_frac=POST_SIGMA_FRAC if cfg.cmdr_post_sigma < 0 else cfg.cmdr_post_sigma)
    try:
        s.validate()
    except ValueError as exc:
        raise RunError(str(exc)) from None
    return s


def decoder_settings(cfg: DetectConfig) -> DecoderSettings:
    """CMDR-IAD reconstruction decoders (``--cmdr-*``; ``cmdr_epochs`` 0 = ``epochs``)."""
    from detect.cmdr import DecoderSettings

    return DecoderSettings(epochs=cfg.cmdr_epochs or cfg.epochs, batch_size=cfg.cmdr_batch_size, lr=cfg.cmdr_lr,
                           hidden_ratio=cfg.cmdr_hidden_ratio, bottleneck_ratio=cfg.cmdr_bottleneck_ratio,
                           kernel=cfg.cmdr_kernel, seed=cfg.seed)


# -- encoders and preprocessing --------------------------------------------------------------------
def image_encoder(cfg: DetectConfig, dev: torch.device) -> FrozenEncoder:
    """The image encoder (``--image-encoder random`` warns: its outputs are not real results; ``cnn``:
    a frozen timm CNN, :func:`detect.cnn_encoder.load_cnn_image_encoder`)."""
    from detect.encoders import EncoderError, load_image_encoder

    if cfg.image_encoder == "cnn":
        from detect.cnn_encoder import load_cnn_image_encoder

        try:
            return load_cnn_image_encoder(cfg.cnn_arch, cfg.image_encoder_weights or None, tuple(cfg.cnn_features),
                                          token_patch=cfg.cnn_token_patch,
                                          pipeline_norm=cfg.image_norm, dtype=cfg.encoder_dtype, device=dev,
                                          seed=cfg.seed, smooth=cfg.cnn_smooth)  # type: ignore[return-value]
        except EncoderError as exc:
            raise RunError(str(exc)) from None
    enc = load_image_encoder(cfg.image_encoder, cfg.image_encoder_weights or None, cfg.encoder_dtype, dev,
                             random_arch=cfg.random_encoder_arch,
                             random_overrides={"depth": cfg.random_encoder_depth}, seed=cfg.seed)
    if enc.info.random:
        warnings.warn("--image-encoder random: randomly initialised image encoder, outputs are NOT real "
                      "results (tests/demos only)", stacklevel=3)
    return enc


def depth_encoder(cfg: DetectConfig, dev: torch.device) -> FrozenEncoder | None:
    """DINO-Depth (``dino_depth``), its architecture randomly initialised (``random``), or None
    (``dinov2_on_depth``/``cnn_on_depth``: the image encoder encodes the depth)."""
    from detect.encoders import load_depth_encoder, load_random_depth_encoder

    if cfg.depth_encoder == "dino_depth":
        return load_depth_encoder(cfg.ckpt or None, cfg.encoder_dtype, dev)
    if cfg.depth_encoder == "random":
        return load_random_depth_encoder(cfg.ckpt or None, cfg.encoder_dtype, dev, seed=cfg.seed)
    return None


def feature_settings(cfg: DetectConfig, stored_norm: dict) -> tuple[dict, FeatureSettings]:
    """(depth normalisation record, :class:`FeatureSettings`): ``--depth-norm auto`` and unset
    eps/percentiles take what the DINO-Depth export stored (``stored_norm``, empty: the defaults)."""
    from detect.features import FeatureSettings
    from shared.depth import DepthNormConfig

    base = DepthNormConfig.from_dict(stored_norm) if stored_norm else DepthNormConfig()
    mode = base.mode if cfg.depth_norm == "auto" else cfg.depth_norm
    eps = base.eps if cfg.depth_norm_eps is None else cfg.depth_norm_eps
    pct = tuple(base.pct if cfg.depth_norm_pct is None else cfg.depth_norm_pct)
    if len(pct) != 2:
        raise RunError(f"depth_norm_pct needs two percentiles, got {list(pct)}")
    if stored_norm and mode != stored_norm.get("mode", "nearness"):
        warnings.warn(f"depth normalisation {mode!r} differs from the one DINO-Depth was trained with "
                      f"({stored_norm.get('mode')!r})", stacklevel=3)
    depth_norm = {"mode": mode, "eps": float(eps), "pct": [float(p) for p in pct], "pad_mode": cfg.pad_mode}
    settings = FeatureSettings(
        image_size=cfg.image_size, depth_input_size=cfg.depth_input_size, image_norm=cfg.image_norm,
        depth_norm=mode, depth_eps=float(eps), depth_pct=(float(pct[0]), float(pct[1])), pad_mode=cfg.pad_mode,
        depth_encoder=cfg.depth_encoder, depth_token_resample=cfg.depth_token_resample,
        encoder_dtype=cfg.encoder_dtype)
    return depth_norm, settings


def patchcore_settings(cfg: DetectConfig) -> PatchCoreSettings:
    """``--patchcore-*`` (validated by the settings dataclass)."""
    from detect.patchcore import PatchCoreSettings

    try:
        return PatchCoreSettings(features=cfg.patchcore_features, bank=cfg.patchcore_bank,
                                 bank_tokens=cfg.patchcore_bank_tokens,
                                 metric=cfg.patchcore_metric, coreset_ratio=cfg.patchcore_coreset, seed=cfg.seed)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def cache_dir(cfg: DetectConfig):
    """The token cache folder (None: ``--no-feature-cache``)."""
    from pathlib import Path

    if not cfg.feature_cache:
        return None
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out) / "features"
