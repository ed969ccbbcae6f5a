"""Built-in synthetic multiview benchmark in the SiM3D layout (issue 3; data_formats.md §7, §7.1, §11).

Generates a small, physically consistent, SiM3D-like benchmark: procedural objects (a lathe-turned
wicker vase, a stool with legs, a bin with a cavity, a ribbed container), N calibrated pinhole views on
a hemisphere (identical for every instance of a class), per view an 8-bit grayscale image and a
z-depth map ray-cast with open3d's ``RaycastingScene``, acquisition artefacts (missing depth patches,
specular highlights) on some views, geometric (bump, dent, missing chunk) and appearance (stain,
scratch) anomalies on half of the test instances, per-instance GT voxel volumes (anomalous surface
voxels + object occupancy) and per-view 2D GT masks, and the two training setups (``<class>_real``
for real-to-real, ``<class>_synth`` — a clean CAD-like render — for synthetic-to-real).

Usage::

    python data_prep/synthetic.py --out data/synthetic            # default benchmark (< 1 min)
    python data_prep/synthetic.py --out /tmp/s --classes vase stool --views 36 --size 448

Library: ``generate_benchmark(out_dir, SynthConfig(...)) -> summary dict``. The on-disk format is
documented in docs/synthetic_benchmark.md. The preview picture of a generated benchmark is drawn by the
detection side, which reads it back through the SiM3D reader (data flows one way)::

    python detect/data/preview.py --root data/synthetic --out docs/images/synthetic_views.png
"""

if __package__ in (None, ""):  # run as a script: make the repo root importable instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shared.cli import ArgumentParser, fail, run_main
from shared.exr import encode_exr
from shared.geometry import (
    VoxelGrid,
    backproject_depth,
    look_at_c2w,
    project_points,
    rays_to_pixels,
)

FORMAT = "synthetic-sim3d"
FORMAT_VERSION = 2  # 2: GT marks only observed surface, defect sizes in token units (issue 18)
GT_FORMAT_VERSION = 2  # gt/volume.npz; 1 = labels included removed material no view observes (refused)
GENERATOR_VERSION = "2.1.0"  # 2.1: hidden defects placed by footprint visibility
LABELS_DEFINITION = "observed"  # stored in gt/volume.npz: labels = measured anomalous surface voxels
CLASS_NAMES = ("vase", "stool", "bin", "ribbed_container")
ANOMALY_TYPES = ("bump", "dent", "missing", "stain", "scratch")
GEOMETRIC_TYPES = ("bump", "dent", "missing")
SETUPS = ("real2real", "synth2real")
SYNTH_BACKGROUND_DEPTH = 1.0e10  # what Blender writes for "no surface"; the map's maximum (data_formats §7)
GT_FILE = Path("gt") / "volume.npz"
MASK_DIR = Path("gt") / "masks"
CALIB_DIR = "calib"


class SynthError(RuntimeError):
    """Invalid configuration or output location for the generator."""


@dataclass
class SynthConfig:
    """Everything that determines the generated benchmark (the same config + seed ⇒ identical files)."""

    classes: tuple[str, ...] = CLASS_NAMES
    n_views: int = 12  # SiM3D uses 12 or 36
    width: int = 320
    height: int = 240  # landscape 4:3 like SiM3D's 4096×3000 frames
    n_test: int = 24  # test instances per class (half anomalous by default)
    anomalous_fraction: float = 0.5
    seed: int = 0
    setups: tuple[str, ...] = SETUPS  # which training instances to write
    voxel_size: float | None = None  # metres; None: class extent / voxels_across
    voxels_across: int = 128  # the object's largest extent in voxels when voxel_size is None
    synth_depth_format: str = "exr"  # "exr" (SiM3D's DEPTH/<view>_depth.exr) or "npy" (depth/<view>.npy)
    depth_noise_m: float = 1.5e-4  # std of the additive depth noise of "real" scans
    image_noise: float = 1.2  # std of the image noise, gray levels
    artefact_view_prob: float = 0.25  # per real view: missing-depth patches
    specular_view_prob: float = 0.25  # per real view: a strong specular highlight
    grazing_dropout_cos: float = 0.08  # real scans lose surfaces seen at grazing angles (|cos| below this)
    second_anomaly_prob: float = 0.2
    anomaly_scale: float = 1.0  # multiplies every anomaly's size (radius, scratch length); 1 = the default mix
    # Defect sizes are drawn in token units of a ViT at this input size and patch (the demo's
    # configs/detect/demo_cpu.yaml: 224 px, patch 14), so that they are resolvable by its token grid.
    token_input_size: int = 224
    token_patch: int = 14
    small_anomaly_prob: float = 0.2  # share of "small" defects (1.2–2 tokens across instead of 2.6–4)
    mesh_spacing_m: float = 0.0035  # target triangle edge of the procedural meshes (chord error < 0.03 mm)
    workers: int = 1

    def validate(self) -> None:
        unknown = [c for c in self.classes if c not in OBJECT_MODELS]
        if unknown:
            raise SynthError(f"unknown class(es) {unknown}; available: {sorted(OBJECT_MODELS)}")
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise SynthError(f"classes must be a non-empty list without duplicates, got {list(self.classes)}")
        if not 1 <= self.n_views <= 360:
            raise SynthError(f"n_views must be in [1, 360], got {self.n_views}")
        if self.width < 16 or self.height < 16 or self.width > 8192 or self.height > 8192:
            raise SynthError(f"image size must be within 16..8192 px, got {self.width}×{self.height}")
        if self.n_test < 0:
            raise SynthError("n_test must be >= 0")
        if not 0.0 <= self.anomalous_fraction <= 1.0:
            raise SynthError("anomalous_fraction must be in [0, 1]")
        bad_setups = [s for s in self.setups if s not in SETUPS]
        if bad_setups or not self.setups:
            raise SynthError(f"setups must be a non-empty subset of {SETUPS}, got {list(self.setups)}")
        if self.synth_depth_format not in ("exr", "npy"):
            raise SynthError("synth_depth_format must be 'exr' or 'npy'")
        if self.voxel_size is not None and not self.voxel_size > 0:
            raise SynthError("voxel_size must be > 0")
        if self.voxels_across < 8:
            raise SynthError("voxels_across must be >= 8")
        if self.workers < 1:
            raise SynthError("workers must be >= 1")
        for name in ("artefact_view_prob", "specular_view_prob", "second_anomaly_prob", "grazing_dropout_cos"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SynthError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.token_patch < 1 or self.token_input_size < self.token_patch:
            raise SynthError(f"token_patch must be >= 1 and token_input_size >= token_patch, got "
                             f"{self.token_patch}, {self.token_input_size}")
        if not 0.0 <= self.small_anomaly_prob <= 1.0:
            raise SynthError(f"small_anomaly_prob must be in [0, 1], got {self.small_anomaly_prob}")
        if not 0.1 <= self.anomaly_scale <= 10.0:
            raise SynthError(f"anomaly_scale must be in [0.1, 10], got {self.anomaly_scale}")
        if self.depth_noise_m < 0 or self.image_noise < 0 or not self.mesh_spacing_m > 0:
            raise SynthError("depth_noise_m and image_noise must be >= 0 and mesh_spacing_m > 0")


# ---------------------------------------------------------------------------------------------------
# Procedural noise and small helpers
# ---------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _hash_to_unit(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer lattice point (splitmix-style mixing)."""
    h = (ix.astype(np.uint64) * np.uint64(0x9E3779B185EBCA87)) ^ (iy.astype(np.uint64) * np.uint64(
        0xC2B2AE3D27D4EB4F)) ^ (iz.astype(np.uint64) * np.uint64(0x165667B19E3779F9)) ^ np.uint64(
        (seed * 0x27D4EB2F165667C5 + 0x94D049BB133111EB) & _MASK64)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(32)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def value_noise(points: np.ndarray, freq: float, seed: int) -> np.ndarray:
    """Smooth 3D value noise in [0, 1] at ``points`` (M, 3) with lattice spacing 1/freq (metres)."""
    x = np.asarray(points, dtype=np.float64) * freq
    i0 = np.floor(x).astype(np.int64)
    f = x - i0
    w = f * f * (3.0 - 2.0 * f)
    out = np.zeros(len(x))
    for dx in (0, 1):
        wx = w[:, 0] if dx else 1.0 - w[:, 0]
        for dy in (0, 1):
            wy = w[:, 1] if dy else 1.0 - w[:, 1]
            for dz in (0, 1):
                wz = w[:, 2] if dz else 1.0 - w[:, 2]
                out += _hash_to_unit(i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz, seed) * wx * wy * wz
    return out


def fbm(points: np.ndarray, freq: float, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value-noise octaves, normalised to [0, 1]."""
    total, norm = np.zeros(len(points)), 0.0
    for o in range(octaves):
        amp = 0.5 ** o
        total += amp * value_noise(points, freq * 2 ** o, seed + 7919 * o)
        norm += amp
    return total / norm


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _stable_seed(*parts: Any) -> list[int]:
    """Seed entropy from strings/ints that does not depend on Python's hash randomisation."""
    out = []
    for p in parts:
        out.append(zlib.crc32(p.encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF)
    return out


# ---------------------------------------------------------------------------------------------------
# Meshes: surfaces of revolution ("lathe") and assembly
# ---------------------------------------------------------------------------------------------------


@dataclass
class Mesh:
    """Triangle mesh with a part id per triangle (textures differ between parts)."""

    vertices: np.ndarray  # (V, 3) float64, metres
    triangles: np.ndarray  # (T, 3) int64, counter-clockwise seen from outside (normals point outwards)
    part: np.ndarray  # (T,) int8

    def copy(self) -> "Mesh":
        return Mesh(self.vertices.copy(), self.triangles.copy(), self.part.copy())

    def face_normals_areas(self) -> tuple[np.ndarray, np.ndarray]:
        v = self.vertices[self.triangles]
        cross = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
        area2 = np.linalg.norm(cross, axis=1)
        return cross / np.maximum(area2, 1e-20)[:, None], 0.5 * area2

    def vertex_normals(self) -> np.ndarray:
        """Area-weighted vertex normals (creases are kept sharp by duplicated vertices)."""
        v = self.vertices[self.triangles]
        cross = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])  # length = 2 × area: area weighting
        acc = np.zeros_like(self.vertices)
        for k in range(3):
            for c in range(3):
                acc[:, c] += np.bincount(self.triangles[:, k], weights=cross[:, c], minlength=len(acc))
        return _unit(acc)

    def welded_normals(self) -> np.ndarray:
        """Vertex normals averaged over coincident vertices: displacing along them opens no cracks at
        creases, where the lathe duplicates vertices."""
        normals = self.vertex_normals()
        key = np.round(self.vertices / 1e-7).astype(np.int64)
        _, inverse = np.unique(key, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        acc = np.zeros((inverse.max() + 1, 3))
        for c in range(3):
            acc[:, c] = np.bincount(inverse, weights=normals[:, c])
        return _unit(acc)[inverse]


def concat_meshes(meshes: Sequence[Mesh]) -> Mesh:
    verts, tris, parts, offset = [], [], [], 0
    for m in meshes:
        verts.append(m.vertices)
        tris.append(m.triangles + offset)
        parts.append(m.part)
        offset += len(m.vertices)
    return Mesh(np.concatenate(verts), np.concatenate(tris), np.concatenate(parts))


def resample_polyline(points: np.ndarray, spacing: float) -> np.ndarray:
    """Points at (nearly) uniform arc length along a 2D polyline, both ends kept exactly."""
    points = np.asarray(points, dtype=np.float64)
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, math.ceil(s[-1] / spacing) + 1)
    t = np.linspace(0.0, s[-1], n)
    out = np.stack([np.interp(t, s, points[:, 0]), np.interp(t, s, points[:, 1])], axis=1)
    out[0], out[-1] = points[0], points[-1]
    return out


RadialFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (theta, z, s in [0,1]) -> dr


def lathe(segments: Sequence[tuple[np.ndarray, RadialFn | None]], spacing: float, n_theta: int,
          part: int = 0) -> Mesh:
    """Surface of revolution around the z axis.

    ``segments`` is a list of (profile (P, 2) as (r, z), optional radial offset function). The profile
    must be traversed so that the material lies to the right (outward normal = ∂θ × ∂profile): bottom
    from the axis outwards, up the outside, inwards across the top, down the inside. Each segment gets
    its own vertex rows, so segment joints are sharp creases; a radial offset function must vanish at
    its segment's ends (s = 0 and 1) or the joint would open.
    """
    theta = 2.0 * np.pi * np.arange(n_theta) / n_theta
    verts, tris, offset = [], [], 0
    for profile, dr_fn in segments:
        rz = resample_polyline(profile, spacing)
        rows = len(rz)
        s = np.linspace(0.0, 1.0, rows)
        r = np.repeat(rz[:, :1], n_theta, axis=1)
        z = np.repeat(rz[:, 1:], n_theta, axis=1)
        on_axis = rz[:, 0] < 1e-9
        if dr_fn is not None:
            dr = dr_fn(np.broadcast_to(theta, r.shape), z, np.repeat(s[:, None], n_theta, axis=1))
            r = np.where(on_axis[:, None], 0.0, np.maximum(r + dr, 0.0))
        v = np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=-1).reshape(-1, 3)
        idx = offset + np.arange(rows * n_theta).reshape(rows, n_theta)
        a, b = idx[:-1], idx[1:]
        a1, b1 = np.roll(a, -1, axis=1), np.roll(b, -1, axis=1)
        t1 = np.stack([a, a1, b1], axis=-1)[~on_axis[:-1]]  # degenerate when row a is on the axis
        t2 = np.stack([a, b1, b], axis=-1)[~on_axis[1:]]  # degenerate when row b is on the axis
        verts.append(v)
        tris.extend([t1.reshape(-1, 3), t2.reshape(-1, 3)])
        offset += len(v)
    triangles = np.concatenate(tris).astype(np.int64)
    return Mesh(np.concatenate(verts), triangles, np.full(len(triangles), part, np.int8))


def _n_theta(radius: float, spacing: float, lo: int = 48, hi: int = 320) -> int:
    return int(np.clip(round(2 * np.pi * radius / spacing), lo, hi))


def monotone_cubic(xk: np.ndarray, yk: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Shape-preserving piecewise cubic Hermite interpolation (Fritsch–Carlson slopes, as PCHIP):
    no overshoot between knots, so profiles stay within their control radii. Avoids importing
    scipy.interpolate (slow) in every worker."""
    h = np.diff(xk)
    delta = np.diff(yk) / h
    m = np.zeros_like(yk)
    for i in range(1, len(xk) - 1):
        if delta[i - 1] * delta[i] > 0:  # weighted harmonic mean keeps monotone pieces monotone
            w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
            m[i] = (w1 + w2) / (w1 / delta[i - 1] + w2 / delta[i])
    m[0], m[-1] = delta[0], delta[-1]
    i = np.clip(np.searchsorted(xk, x, side="right") - 1, 0, len(xk) - 2)
    t = (x - xk[i]) / h[i]
    h00, h10 = 2 * t ** 3 - 3 * t ** 2 + 1, t ** 3 - 2 * t ** 2 + t
    h01, h11 = -2 * t ** 3 + 3 * t ** 2, t ** 3 - t ** 2
    return h00 * yk[i] + h10 * h[i] * m[i] + h01 * yk[i + 1] + h11 * h[i] * m[i + 1]


def _arc(center: tuple[float, float], radius: float, a0: float, a1: float, n: int = 24) -> np.ndarray:
    a = np.linspace(a0, a1, n)
    return np.stack([center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)], axis=1)


def _rotation_from_z(axis: np.ndarray) -> np.ndarray:
    """Rotation mapping +z onto the unit vector ``axis`` (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(z, axis)
    c = float(z @ axis)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)


def _envelope(s: np.ndarray, edge: float = 0.06) -> np.ndarray:
    """1 inside a segment, fading smoothly to 0 at its two ends (keeps creases closed)."""
    return _smoothstep(0.0, edge, s) * _smoothstep(0.0, edge, 1.0 - s)


# ---------------------------------------------------------------------------------------------------
# Object models
# ---------------------------------------------------------------------------------------------------


@dataclass
class TextureParams:
    """Per-instance appearance variation ("texture jitter") and the CAD switch."""

    seed: int = 0
    contrast: float = 1.0
    brightness: float = 1.0
    shift: float = 0.0  # small misregistration of printed/woven patterns (radians)
    cad: bool = False  # clean CAD-like render: no texture noise


class ObjectModel:
    """A procedural object class: nominal parameters, mesh builder, albedo function."""

    name: str = ""
    nominal: ClassVar[dict[str, float]] = {}
    integer_params: ClassVar[tuple[str, ...]] = ()

    def jittered(self, rng: np.random.Generator, rel_std: float = 0.006) -> dict[str, float]:
        """Nominal parameters with small production variation (relative std ``rel_std``)."""
        out = {}
        for k, v in self.nominal.items():
            out[k] = v if k in self.integer_params else v * (1.0 + rel_std * float(rng.standard_normal()))
        return out

    def build(self, p: dict[str, float], spacing: float) -> Mesh:
        raise NotImplementedError

    noise_amp: ClassVar[float] = 0.03  # amplitude of the per-instance albedo noise (not in CAD renders)
    noise_freq: ClassVar[float] = 30.0  # its base frequency, 1/m

    def albedo(self, q: np.ndarray, part: np.ndarray, p: dict[str, float], tex: TextureParams,
               noise: np.ndarray) -> np.ndarray:
        """Albedo in [0, 1] at object-frame points ``q`` of parts ``part``; ``noise`` is the instance's
        low-frequency albedo noise at those points (``albedo_noise``)."""
        raise NotImplementedError

    def albedo_noise(self, q: np.ndarray, tex: TextureParams) -> np.ndarray:
        """Per-instance albedo noise in [-noise_amp, noise_amp]. Low-frequency, so it is evaluated at the
        mesh vertices once per instance and interpolated at the hits (12× cheaper than per pixel)."""
        if tex.cad or self.noise_amp == 0:
            return np.zeros(len(q))
        return self.noise_amp * (fbm(q, self.noise_freq, tex.seed) - 0.5) * 2.0


class WickerVase(ObjectModel):
    """Lathe-turned vase with an opening, woven (wicker) texture and matching surface relief."""

    name = "vase"
    nominal: ClassVar[dict[str, float]] = {
        "height": 0.30, "r_base": 0.065, "r_belly": 0.115, "z_belly": 0.12, "r_shoulder": 0.088,
        "z_shoulder": 0.2, "r_neck": 0.055, "z_neck": 0.245, "r_lip": 0.072, "wall": 0.006, "floor": 0.015,
        "stakes": 24, "strand": 0.011, "relief": 0.0006
    }
    integer_params: ClassVar[tuple[str, ...]] = ("stakes",)

    def _outer_r(self, p: dict[str, float], z: np.ndarray) -> np.ndarray:
        zs = [0.0, 0.03, p["z_belly"], p["z_shoulder"], p["z_neck"], p["height"]]
        rs = [p["r_base"], p["r_base"] + 0.022, p["r_belly"], p["r_shoulder"], p["r_neck"], p["r_lip"]]
        return monotone_cubic(np.asarray(zs), np.asarray(rs), z)

    def _weave(self, theta: np.ndarray, z: np.ndarray, p: dict[str, float], shift: float = 0.0) -> np.ndarray:
        return np.tanh(3.0 * np.sin(2 * np.pi * z / p["strand"]) * np.sin(p["stakes"] * (theta + shift)))

    def build(self, p: dict[str, float], spacing: float) -> Mesh:
        h, t, fl = p["height"], p["wall"], p["floor"]
        z_out = np.linspace(0.0, h, 240)
        r_out = self._outer_r(p, z_out)
        z_in = np.linspace(h, fl, 240)
        r_in = self._outer_r(p, z_in) - t

        def relief(theta, z, s):
            return p["relief"] * self._weave(theta, z, p) * _envelope(s)

        segments = [
            (np.array([[0.0, 0.0], [p["r_base"], 0.0]]), None),
            (np.stack([r_out, z_out], axis=1), relief),
            (np.array([[r_out[-1], h], [r_out[-1] - t, h]]), None),
            (np.stack([r_in, z_in], axis=1), None),
            (np.array([[r_in[-1], fl], [0.0, fl]]), None),
        ]
        return lathe(segments, spacing, _n_theta(p["r_belly"], spacing))

    noise_amp, noise_freq = 0.05, 45.0

    def albedo(self, q, part, p, tex, noise):
        theta = np.arctan2(q[:, 1], q[:, 0])
        z = q[:, 2]
        weave = self._weave(theta, z, p, tex.shift)
        fibres = np.sin(2 * np.pi * (z + 0.0015 * np.sin(60 * theta)) / 0.0023)
        a = 0.56 + 0.13 * tex.contrast * weave + 0.035 * fibres + noise
        return np.clip(a * tex.brightness, 0.02, 1.0)


class Stool(ObjectModel):
    """Plastic stool: round seat with a handle hole and rounded edge, four splayed legs, a ring."""

    name = "stool"
    nominal: ClassVar[dict[str, float]] = {
        "seat_r": 0.15, "seat_z": 0.27, "seat_th": 0.025, "hole_r": 0.018, "edge_r": 0.009, "leg_top":
        0.105, "leg_bot": 0.14, "leg_rt": 0.013, "leg_rb": 0.0105, "ring_z": 0.10, "ring_rad": 0.0065
    }

    def build(self, p: dict[str, float], spacing: float) -> Mesh:
        r, z0, th, hr, er = p["seat_r"], p["seat_z"], p["seat_th"], p["hole_r"], p["edge_r"]
        top = z0 + th
        r_top = np.linspace(r - er, hr + 0.004, 60)
        z_top = top + 0.004 * (1.0 - (r_top / r) ** 2) - 0.004 * (1.0 - ((r - er) / r) ** 2)
        seat = lathe([
            (np.array([[hr, z0], [r - er, z0]]), None),
            (np.concatenate([_arc((r - er, z0 + er), er, -np.pi / 2, 0.0),
                             _arc((r - er, top - er), er, 0.0, np.pi / 2)[1:]]), None),
            (np.stack([r_top, z_top], axis=1), None),
            (np.array([[hr + 0.004, z_top[-1]], [hr, z_top[-1] - 0.004], [hr, z0]]), None),
        ], spacing, _n_theta(r, spacing), part=0)
        parts = [seat]
        for k in range(4):
            phi = np.pi / 4 + k * np.pi / 2
            d = np.array([np.cos(phi), np.sin(phi), 0.0])
            top_pt = d * p["leg_top"] + np.array([0.0, 0.0, z0 + 0.004])  # 4 mm into the seat: no gap
            bot_pt = d * p["leg_bot"]
            axis = top_pt - bot_pt
            length = float(np.linalg.norm(axis))
            leg = lathe([
                (np.array([[0.0, 0.0], [p["leg_rb"], 0.0]]), None),
                (np.array([[p["leg_rb"], 0.0], [p["leg_rt"], length]]), None),
                (np.array([[p["leg_rt"], length], [0.0, length]]), None),
            ], spacing, _n_theta(p["leg_rt"], spacing, lo=32), part=1)
            leg.vertices = leg.vertices @ _rotation_from_z(axis).T + bot_pt
            parts.append(leg)
        ring_R = p["leg_bot"] + (p["leg_top"] - p["leg_bot"]) * p["ring_z"] / (z0 + 0.004)
        circle = _arc((ring_R, p["ring_z"]), p["ring_rad"], -np.pi / 2, 1.5 * np.pi, 40)
        parts.append(lathe([(circle, None)], spacing, _n_theta(ring_R, spacing), part=2))
        return concat_meshes(parts)

    def albedo(self, q, part, p, tex, noise):
        rho = np.hypot(q[:, 0], q[:, 1])
        seat_top = (part == 0) & (q[:, 2] > p["seat_z"] + p["seat_th"] - 0.002)
        a = np.where(part == 0, 0.64, 0.5)
        a = a + np.where(seat_top, 0.035 * tex.contrast * np.sin(2 * np.pi * rho / 0.01), 0.0)
        return np.clip((a + noise) * tex.brightness, 0.02, 1.0)


class Bin(ObjectModel):
    """Rubbish bin: tapered wall with a cavity, rolled rim, horizontal ribs, speckled plastic."""

    name = "bin"
    nominal: ClassVar[dict[str, float]] = {
        "height": 0.30, "r_bot": 0.10, "r_top": 0.125, "wall": 0.007, "floor": 0.012, "rim_h": 0.014,
        "rim_out": 0.006, "rib_amp": 0.0022
    }

    def build(self, p: dict[str, float], spacing: float) -> Mesh:
        h, rb, rt, t, fl = p["height"], p["r_bot"], p["r_top"], p["wall"], p["floor"]
        zr = h - p["rim_h"]
        ro = rt + p["rim_out"]
        ribs_z = np.array([0.08, 0.16, 0.23]) * h / 0.30

        def ribs(theta, z, s):
            bumps = sum(np.exp(-(((z - zk) / 0.005) ** 2)) for zk in ribs_z)
            return p["rib_amp"] * bumps * _envelope(s)

        rim = _arc((rt + p["rim_out"] / 2, zr + p["rim_out"] / 2), p["rim_out"] / 2 * 1.02, -np.pi / 2, 0.0, 12)
        rim = np.concatenate([[[rt, zr]], rim[1:], [[ro, h]]])
        segments = [
            (np.array([[0.0, 0.0], [rb, 0.0]]), None),
            (np.array([[rb, 0.0], [rt, zr]]), ribs),
            (rim, None),
            (np.array([[ro, h], [rt - t, h]]), None),
            (np.array([[rt - t, h], [rb - t + (rt - rb) * fl / zr, fl]]), None),
            (np.array([[rb - t + (rt - rb) * fl / zr, fl], [0.0, fl]]), None),
        ]
        return lathe(segments, spacing, _n_theta(rt, spacing))

    noise_freq = 35.0

    def albedo(self, q, part, p, tex, noise):
        z = q[:, 2]
        rho = np.hypot(q[:, 0], q[:, 1])
        speck = _smoothstep(0.74, 0.8, value_noise(q, 420.0, 1234))  # moulded speckles: part of the design
        outer = rho > (p["r_bot"] + (p["r_top"] - p["r_bot"]) * z / p["height"]) - 0.5 * p["wall"]
        band = outer & (z > p["height"] - 0.05) & (z < p["height"] - 0.032)
        a = 0.34 + 0.22 * tex.contrast * speck + np.where(band, 0.22, 0.0) + noise
        return np.clip(a * tex.brightness, 0.02, 1.0)


class RibbedContainer(ObjectModel):
    """Closed ribbed container with a lid and a knob; a printed label band."""

    name = "ribbed_container"
    nominal: ClassVar[dict[str, float]] = {
        "r_body0": 0.10, "r_body1": 0.108, "z_body": 0.20, "ribs": 14, "rib_amp": 0.005, "lid_r": 0.114,
        "lid_z": 0.222, "knob_r": 0.028, "knob_z": 0.248, "label_z0": 0.07, "label_z1": 0.15
    }
    integer_params: ClassVar[tuple[str, ...]] = ("ribs",)

    def build(self, p: dict[str, float], spacing: float) -> Mesh:
        r0, r1, zb = p["r_body0"], p["r_body1"], p["z_body"]

        def ribs(theta, z, s):
            return p["rib_amp"] * np.maximum(np.cos(p["ribs"] * theta), 0.0) ** 2 * _envelope(s, 0.05)

        segments = [
            (np.array([[0.0, 0.0], [r0 - 0.006, 0.0]]), None),
            (_arc((r0 - 0.006, 0.006), 0.006, -np.pi / 2, 0.0, 10), None),
            (np.array([[r0, 0.006], [r1, zb]]), ribs),
            (np.array([[r1, zb], [p["lid_r"], zb], [p["lid_r"], p["lid_z"]]]), None),
            (np.array([[p["lid_r"], p["lid_z"]], [p["knob_r"], p["lid_z"] + 0.005]]), None),
            (np.array([[p["knob_r"], p["lid_z"] + 0.005], [p["knob_r"], p["knob_z"] - 0.006]]), None),
            (np.concatenate([_arc((p["knob_r"] - 0.006, p["knob_z"] - 0.006), 0.006, 0.0, np.pi / 2, 8),
                             [[0.0, p["knob_z"]]]]), None),
        ]
        return lathe(segments, spacing, _n_theta(p["lid_r"], spacing))

    noise_amp = 0.02

    def albedo(self, q, part, p, tex, noise):
        theta = np.arctan2(q[:, 1], q[:, 0]) + tex.shift
        z = q[:, 2]
        rho = np.hypot(q[:, 0], q[:, 1])
        label = (z > p["label_z0"]) & (z < p["label_z1"]) & (rho > p["r_body0"] - 0.002)
        col = np.floor((theta + np.pi) * 0.104 / 0.006).astype(np.int64)
        row = np.floor((z - p["label_z0"]) / 0.009).astype(np.int64)
        glyph = (_hash_to_unit(col, row, np.zeros_like(col), 77) > 0.55) & (row % 3 != 2)
        a = np.where(label, np.where(glyph, 0.85, 0.26), 0.74) + noise
        return np.clip(a * np.where(label, tex.contrast, 1.0) * tex.brightness, 0.02, 1.0)


OBJECT_MODELS: dict[str, ObjectModel] = {m.name: m for m in (WickerVase(), Stool(), Bin(), RibbedContainer())}


# ---------------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------------


_DIRECTION_CACHE: dict[tuple, np.ndarray] = {}


@dataclass(frozen=True)
class Camera:
    stem: str
    K: np.ndarray  # (3, 3) float64
    T_c2w: np.ndarray  # (4, 4) float64, OpenCV axes
    width: int
    height: int
    key_light: np.ndarray  # (3,) world position of the light mounted beside the camera

    @property
    def center(self) -> np.ndarray:
        return self.T_c2w[:3, 3]

    def ray_directions(self) -> np.ndarray:
        """World-frame direction of the ray through the centre of every pixel (row-major), scaled so
        that its camera-frame z component is 1: the ray parameter at a hit is then the z-depth.
        Cached per process (the same rig renders every instance of a class)."""
        key = (self.width, self.height, self.K.tobytes(), self.T_c2w.tobytes())
        cached = _DIRECTION_CACHE.get(key)
        if cached is None:
            v, u = np.mgrid[0:self.height, 0:self.width].astype(np.float64)
            pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)  # pixel_center = 0 (OpenCV)
            cam = pix @ np.linalg.inv(self.K).T
            cam /= cam[:, 2:3]
            cached = cam @ self.T_c2w[:3, :3].T
            if len(_DIRECTION_CACHE) > 512:
                _DIRECTION_CACHE.clear()
            _DIRECTION_CACHE[key] = cached
        return cached

    def to_json(self) -> dict[str, Any]:
        return {"stem": self.stem, "width": self.width, "height": self.height, "K": self.K.tolist(),
                "T_c2w": self.T_c2w.tolist()}


def hemisphere_rings(n_views: int) -> list[tuple[float, int]]:
    """(elevation in degrees, number of views) per ring: 1 ring up to 8 views, 2 up to 24, else 3."""
    elevations = [35.0] if n_views <= 8 else [25.0, 55.0] if n_views <= 24 else [15.0, 40.0, 65.0]
    base, extra = divmod(n_views, len(elevations))
    return [(el, base + (1 if i < extra else 0)) for i, el in enumerate(elevations)]


def make_cameras(n_views: int, width: int, height: int, target: np.ndarray, bound_radius: float,
                 rng: np.random.Generator) -> list[Camera]:
    """Calibrated pinhole cameras on rings of a hemisphere around ``target`` (one class's rig).

    The bounding sphere of the object fills ~92 % of the shorter image side. Intrinsics differ
    slightly per view (as after a real calibration) so readers must really use each view's K.
    """
    distance = 2.7 * bound_radius
    focal = 0.46 * min(width, height) / math.tan(math.asin(bound_radius / distance))
    cams, k = [], 0
    for ring, (elev_deg, count) in enumerate(hemisphere_rings(n_views)):
        for j in range(count):
            az = 2 * np.pi * j / count + ring * np.pi / max(count, 1) + np.deg2rad(rng.normal(0.0, 1.0))
            el = np.deg2rad(elev_deg + rng.normal(0.0, 1.0))
            eye = target + distance * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
            aim = target + rng.normal(0.0, 0.003, 3)
            T = look_at_c2w(eye, aim)
            roll = np.deg2rad(rng.normal(0.0, 1.5))  # cameras are not perfectly level
            c, s = math.cos(roll), math.sin(roll)
            T[:3, :3] = T[:3, :3] @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            fx = focal * (1.0 + rng.normal(0.0, 0.004))
            fy = fx * (1.0 + rng.normal(0.0, 0.001))
            cx = (width - 1) / 2.0 + rng.normal(0.0, 0.006 * width)
            cy = (height - 1) / 2.0 + rng.normal(0.0, 0.006 * height)
            K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
            k += 1
            light = eye + T[:3, :3] @ np.array([-0.3, -0.35, 0.0]) * distance  # up-left of the lens
            cams.append(Camera(stem=str(k), K=K, T_c2w=T, width=width, height=height, key_light=light))
    return cams


# ---------------------------------------------------------------------------------------------------
# Anomalies
# ---------------------------------------------------------------------------------------------------


@dataclass
class Anomaly:
    """One injected defect. Position in world coordinates (metres)."""

    kind: str
    center: np.ndarray
    normal: np.ndarray
    radius: float
    amplitude: float = 0.0  # bump (+) / dent (−) height; stain darkening factor
    tangent: np.ndarray | None = None  # scratch direction
    length: float = 0.0  # scratch length
    noise_seed: int = 0
    part: int = -1  # the mesh part it lies on (a defect never leaks onto another part, e.g. seat → leg); -1: any

    def to_json(self) -> dict[str, Any]:
        out = {"type": self.kind, "center": self.center.tolist(), "normal": self.normal.tolist(),
               "radius": self.radius, "part": self.part}
        if self.kind in ("bump", "dent"):
            out["amplitude"] = self.amplitude
        if self.kind == "stain":
            out["darkening"] = self.amplitude
        if self.kind == "scratch":
            out["tangent"] = self.tangent.tolist()
            out["length"] = self.length
        return out

    def weight(self, points: np.ndarray, normals: np.ndarray, parts: np.ndarray | None = None) -> np.ndarray:
        """Appearance weight in [0, 1] (stain, scratch) at surface points of mesh ``parts``; 0 for
        geometric types."""
        if self.kind not in ("stain", "scratch"):
            return np.zeros(len(points))
        same_sheet = (normals @ self.normal) > 0.2  # not the other side of a thin wall
        if parts is not None and self.part >= 0:
            same_sheet &= parts == self.part
        q = points - self.center
        if self.kind == "stain":
            wobble = 1.0 + 0.3 * (value_noise(points, 1.0 / (0.6 * self.radius), self.noise_seed) - 0.5)
            dist = np.linalg.norm(q, axis=1) / (self.radius * wobble)
            return np.where(same_sheet, 1.0 - _smoothstep(0.75, 1.0, dist), 0.0)
        along = np.clip(q @ self.tangent, -self.length / 2, self.length / 2)
        perp = q - along[:, None] * self.tangent
        off_plane = perp @ self.normal
        in_plane = perp - off_plane[:, None] * self.normal
        # distance to the segment measured along the surface; a curved surface may leave the straight
        # segment by a few mm, hence the tolerant off-plane term
        dist = np.sqrt(np.sum(in_plane ** 2, axis=1) + (off_plane / 6.0) ** 2) / self.radius
        return np.where(same_sheet, 1.0 - _smoothstep(0.6, 1.0, dist), 0.0)


APPEARANCE_THRESHOLD = 0.5  # appearance weight above which a surface point counts as anomalous


def _vertex_parts(mesh: Mesh) -> np.ndarray:
    """Part id of every vertex (from its triangles; parts never share vertices)."""
    out = np.zeros(len(mesh.vertices), np.int8)
    for k in range(3):
        out[mesh.triangles[:, k]] = mesh.part
    return out


def apply_geometric_anomaly(mesh: Mesh, anomaly: Anomaly, normals: np.ndarray, flags: np.ndarray,
                            rim_extra: float = 0.0) -> tuple[Mesh, np.ndarray, np.ndarray]:
    """Deform or cut ``mesh`` (``normals``: its welded vertex normals).

    Returns the new mesh, its per-triangle "anomalous surface" flags (``flags`` of the input mesh carried
    over, plus this anomaly's triangles) and the removed triangles as an (R, 3, 3) array of vertex
    positions — the missing material of a ``missing`` anomaly (empty otherwise; never labelled, since no
    view can observe absent material). The anomalous surface of a cut is its rim: the remaining surface
    within ``(1 + MISSING_RIM) · radius + rim_extra`` of the centre, on both skins of a wall.
    """
    q = mesh.vertices - anomaly.center
    dist = np.linalg.norm(q, axis=1)
    same_sheet = (normals @ anomaly.normal) > 0.2  # never push the far side of a thin wall
    on_part = _vertex_parts(mesh) == anomaly.part if anomaly.part >= 0 else np.ones(len(mesh.vertices), bool)
    same_sheet &= on_part
    if anomaly.kind in ("bump", "dent"):
        s = dist / anomaly.radius
        disp = anomaly.amplitude * np.clip(1.0 - s * s, 0.0, None) ** 2 * same_sheet
        new = mesh.copy()
        new.vertices = mesh.vertices + disp[:, None] * normals
        moved = np.abs(disp) > 0.15 * abs(anomaly.amplitude)
        return new, flags | moved[mesh.triangles].any(axis=1), np.zeros((0, 3, 3))
    if anomaly.kind == "missing":
        # a chunk cut out of the shell: every triangle whose centroid lies in the ball is removed, so
        # thin walls get a through-hole and hollow parts show their inside
        centroid = mesh.vertices[mesh.triangles].mean(axis=1)
        tri_on_part = mesh.part == anomaly.part if anomaly.part >= 0 else np.ones(len(mesh.triangles), bool)
        cut = (np.linalg.norm(centroid - anomaly.center, axis=1) < anomaly.radius) & tri_on_part
        rim_vertices = np.zeros(len(mesh.vertices), bool)
        rim_vertices[mesh.triangles[cut].ravel()] = True
        keep = ~cut
        new = Mesh(mesh.vertices.copy(), mesh.triangles[keep], mesh.part[keep])
        rim = rim_vertices[new.triangles].any(axis=1)  # the hole's edge is anomalous surface
        band = (np.linalg.norm(centroid[keep] - anomaly.center, axis=1) < (
            (1.0 + MISSING_RIM) * anomaly.radius + rim_extra)) & tri_on_part[keep]  # ... the damaged band
        return new, flags[keep] | rim | band, mesh.vertices[mesh.triangles[cut]]
    raise ValueError(f"not a geometric anomaly: {anomaly.kind}")


# ---------------------------------------------------------------------------------------------------
# Ray casting and shading
# ---------------------------------------------------------------------------------------------------


def _scene(vertices: np.ndarray, triangles: np.ndarray):
    import open3d as o3d  # lazy: only the generator needs open3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.ascontiguousarray(vertices, np.float32)),
                        o3d.core.Tensor(np.ascontiguousarray(triangles, np.uint32)))
    return scene


def _cast(scene, origin: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import open3d as o3d

    rays = np.empty((len(directions), 6), np.float32)
    rays[:, :3] = origin
    rays[:, 3:] = directions
    out = scene.cast_rays(o3d.core.Tensor(rays))
    return out["t_hit"].numpy(), out["primitive_ids"].numpy(), out["primitive_uvs"].numpy()


@dataclass
class ViewRender:
    """One rendered view (before writing)."""

    image: np.ndarray  # uint8 (H, W)
    depth: np.ndarray  # float32 (H, W), +inf = no measurement
    depth_clean: np.ndarray  # float32 (H, W), +inf = no surface (no noise, no artefacts)
    mask: np.ndarray  # bool (H, W), GT anomaly mask: pixels showing anomalous surface
    hits: np.ndarray  # (M, 3) world points of all surface pixels
    artefacts: list[str]


@dataclass
class RenderSpec:
    """How an instance is rendered ("real" scan or clean "synth" CAD render)."""

    realistic: bool
    depth_noise_m: float
    image_noise: float
    artefact_prob: float
    specular_prob: float
    grazing_cos: float


def roi_pixels(cam: Camera, grid: VoxelGrid, margin: int = 2) -> np.ndarray:
    """Flat indices of the pixels inside the image rectangle bounding the projected GT grid: rays
    outside it cannot hit the object (every surface point lies in the grid), so they are not cast."""
    corners = grid.origin + np.array(np.meshgrid([0, 1], [0, 1], [0, 1])).reshape(3, -1).T * (
        np.asarray(grid.shape) * grid.voxel_size)
    uv, z = project_points(corners, cam.K, cam.T_c2w)
    if (z <= 0).any():  # a corner behind the camera: no useful bound
        return np.arange(cam.width * cam.height)
    u0, v0 = np.clip(np.floor(uv.min(axis=0)).astype(int) - margin, 0, [cam.width, cam.height])
    u1, v1 = np.clip(np.ceil(uv.max(axis=0)).astype(int) + margin + 1, 0, [cam.width, cam.height])
    rows, cols = np.meshgrid(np.arange(v0, v1), np.arange(u0, u1), indexing="ij")
    return (rows * cam.width + cols).ravel()


def render_view(scene, mesh: Mesh, vnormals: np.ndarray, vnoise: np.ndarray, flags: np.ndarray,
                anomalies: Sequence[Anomaly], cam: Camera, directions: np.ndarray, roi: np.ndarray, albedo_fn: Callable,
                spec: RenderSpec, rng: np.random.Generator) -> ViewRender:
    """Ray-cast one view (the pixels ``roi``) and shade it (Lambertian + Blinn-Phong, gamma 2.2)."""
    H, W = cam.height, cam.width
    eye = cam.center
    t = np.full(H * W, np.inf, np.float32)
    prim = np.zeros(H * W, np.uint32)
    uvb = np.zeros((H * W, 2), np.float32)
    t[roi], prim[roi], uvb[roi] = _cast(scene, eye, directions[roi])
    hit = np.isfinite(t)
    idx = np.nonzero(hit)[0]
    prim_h = prim[idx].astype(np.int64)
    tri = mesh.triangles[prim_h]
    bu, bv = uvb[idx, 0:1].astype(np.float64), uvb[idx, 1:2].astype(np.float64)
    normal = _unit((1.0 - bu - bv) * vnormals[tri[:, 0]] + bu * vnormals[tri[:, 1]] + bv * vnormals[tri[:, 2]])
    points = eye + t[idx, None].astype(np.float64) * directions[idx]
    to_cam = _unit(eye - points)
    facing = np.sum(normal * to_cam, axis=1)
    normal = np.where(facing[:, None] < 0, -normal, normal)  # two-sided: inner walls, hole back faces
    cos_view = np.abs(facing)

    noise = ((1.0 - bu - bv) * vnoise[tri[:, 0], None] + bu * vnoise[tri[:, 1], None]
             + bv * vnoise[tri[:, 2], None])[:, 0]
    albedo = albedo_fn(points, mesh.part[prim_h], noise)
    appearance = np.zeros(len(idx))
    for an in anomalies:
        w = an.weight(points, normal, mesh.part[prim_h])
        if an.kind == "stain":
            albedo = albedo * (1.0 - an.amplitude * w)
        elif an.kind == "scratch":
            albedo = albedo * (1.0 - w) + 0.93 * w
        appearance = np.maximum(appearance, w)

    l_key = _unit(cam.key_light - points)
    l_fill = _unit(np.array([0.3, -0.2, 1.0]))
    diffuse = albedo * (0.13 + 0.72 * np.clip(np.sum(normal * l_key, 1), 0, None)
                        + 0.28 * np.clip(normal @ l_fill, 0, None))
    n_dot_h = np.clip(np.sum(normal * _unit(l_key + to_cam), 1), 0, None)
    radiance = diffuse + 0.06 * n_dot_h ** 20  # plastic sheen, the same on every view
    artefacts: list[str] = []
    highlight = np.zeros(len(idx), bool)
    if spec.realistic and rng.random() < spec.specular_prob:
        strong = 1.3 * n_dot_h ** 90
        radiance = radiance + strong
        highlight = strong > 0.5
        artefacts.append("specular")

    image = np.full(H * W, 0.0)
    image[idx] = 255.0 * np.clip(radiance, 0.0, 1.0) ** (1.0 / 2.2)
    if spec.realistic:  # dark, unevenly lit background and sensor noise
        rows = np.repeat(np.arange(H), W)
        image[~hit] = (14.0 + 8.0 * rows / H)[~hit]
        image += rng.normal(0.0, spec.image_noise, H * W)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8).reshape(H, W)

    depth_clean = np.full(H * W, np.inf, np.float32)
    depth_clean[idx] = t[idx]
    depth = depth_clean.copy()
    if spec.realistic:
        if spec.depth_noise_m > 0:
            depth[idx] = (t[idx].astype(np.float64) + rng.normal(0.0, spec.depth_noise_m, len(idx))).astype(np.float32)
        if spec.grazing_cos > 0:
            depth[idx[cos_view < spec.grazing_cos]] = np.inf
        if highlight.any() and rng.random() < 0.5:  # structured light fails on the saturated spot
            depth[idx[highlight]] = np.inf
            artefacts.append("specular_depth_hole")
        if len(idx) and rng.random() < spec.artefact_prob:
            import cv2  # lazy

            depth = depth.reshape(H, W)
            vv, uu = np.mgrid[0:H, 0:W]
            coarse = rng.random((H // 10 + 2, W // 10 + 2)).astype(np.float32)
            wob = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_CUBIC)  # irregular patch outlines
            for _ in range(int(rng.integers(1, 4))):
                c = idx[rng.integers(len(idx))]
                radius = rng.uniform(0.025, 0.06) * min(H, W)
                d = np.hypot(uu - c % W, vv - c // W) / radius + 0.5 * (wob - 0.5)
                depth[d < 1.0] = np.inf
            depth = depth.reshape(-1)
            artefacts.append("missing_depth")

    mask_flat = np.zeros(H * W, bool)
    surface_anomalous = flags[prim_h] | (appearance > APPEARANCE_THRESHOLD)
    mask_flat[idx[surface_anomalous]] = True
    # A pixel looking through a hole shows what lies behind it (nominal surface or nothing): not masked.
    return ViewRender(image=image, depth=depth.reshape(H, W), depth_clean=depth_clean.reshape(H, W),
                      mask=mask_flat.reshape(H, W), hits=points,
                      artefacts=artefacts)


# ---------------------------------------------------------------------------------------------------
# Ground truth volumes
# ---------------------------------------------------------------------------------------------------


def sample_triangles(tris: np.ndarray, density: float, rng: np.random.Generator,
                     min_per_triangle: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform random points on triangles given as (T, 3, 3) vertex positions, ``density`` points per
    square metre (at least ``min_per_triangle`` per triangle). Returns points, face normals, triangle
    index of each point."""
    if len(tris) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, np.int64)
    cross = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    area = 0.5 * np.linalg.norm(cross, axis=1)
    normals = _unit(cross)
    expected = area * density
    counts = np.floor(expected + rng.random(len(tris))).astype(np.int64)
    counts = np.maximum(counts, min_per_triangle)
    which = np.repeat(np.arange(len(tris)), counts)
    r1, r2 = rng.random(len(which)), rng.random(len(which))
    s = np.sqrt(r1)
    a, b, c = 1.0 - s, s * (1.0 - r2), s * r2
    t = tris[which]
    pts = a[:, None] * t[:, 0] + b[:, None] * t[:, 1] + c[:, None] * t[:, 2]
    return pts, normals[which], which


def visible_mask(points: np.ndarray, normals: np.ndarray, cams: Sequence[Camera],
                 depths_clean: Sequence[np.ndarray], tol: float) -> np.ndarray:
    """Points visible in at least one view: facing the camera, inside the frame, and not behind the
    rendered surface by more than ``tol`` (a point in front of it — missing material — is visible)."""
    vis = np.zeros(len(points), bool)
    for cam, depth in zip(cams, depths_clean):
        todo = np.nonzero(~vis)[0]
        if len(todo) == 0:
            break
        facing = np.einsum("ij,ij->i", normals[todo], cam.center - points[todo]) > 0  # cheap test first
        todo = todo[facing]
        uv, z = project_points(points[todo], cam.K, cam.T_c2w)
        pix, inside = rays_to_pixels(uv, cam.height, cam.width)
        d = depth[pix[:, 0], pix[:, 1]]
        vis[todo[inside & (z > 0) & (z <= d + tol)]] = True
    return vis


def class_grid(template: Mesh, voxel_size: float) -> VoxelGrid:
    """The class's GT grid: the template's bounds plus a margin for shape jitter and bumps."""
    extent = np.ptp(template.vertices, axis=0).max()
    margin = math.ceil(0.06 * extent / voxel_size) + 2
    return VoxelGrid.bounding(template.vertices, voxel_size, margin_voxels=margin)


# ---------------------------------------------------------------------------------------------------
# Instance generation
# ---------------------------------------------------------------------------------------------------


@dataclass
class ClassSetup:
    """Everything shared by the instances of one class."""

    name: str
    cameras: list[Camera]
    grid: VoxelGrid
    template_params: dict[str, float]
    extent_m: float
    token_m: float  # side of one token (token_patch px at token_input_size) on a surface at the rig's distance
    token_px: float  # the same token in pixels of the generated views


@dataclass
class InstanceJob:
    class_setup: ClassSetup
    name: str
    role: str  # "train_real", "train_synth", "test"
    anomalous: bool
    anomaly_types: tuple[str, ...]
    seed_entropy: list[int]
    instance_dir: Path
    config: SynthConfig


def build_class_setup(class_name: str, cfg: SynthConfig) -> ClassSetup:
    model = OBJECT_MODELS[class_name]
    rng = np.random.default_rng(np.random.SeedSequence(_stable_seed(cfg.seed, class_name, 0xCA4E)))
    template = model.build(dict(model.nominal), cfg.mesh_spacing_m)
    lo, hi = template.vertices.min(axis=0), template.vertices.max(axis=0)
    center = (lo + hi) / 2
    bound = float(np.linalg.norm(template.vertices - center, axis=1).max()) * 1.04
    extent = float((hi - lo).max())
    voxel = cfg.voxel_size if cfg.voxel_size is not None else round(extent / cfg.voxels_across, 5)
    cams = make_cameras(cfg.n_views, cfg.width, cfg.height, center, bound, rng)
    token_px, token_m = token_footprint(cams, center, cfg)
    return ClassSetup(class_name, cams, class_grid(template, voxel), dict(model.nominal), extent, token_m, token_px)


def token_footprint(cams: Sequence[Camera], target: np.ndarray, cfg: SynthConfig) -> tuple[float, float]:
    """One ViT token (``token_patch`` px of a ``token_input_size`` input) in view pixels and in metres.

    A view is padded to a square of its longer side and resized to the input size (detect/preprocess.py),
    so a token covers ``patch · max(W, H) / input_size`` view pixels; at the rig's distance from the
    object centre that is ``token_px · distance / focal`` metres (mean over the views)."""
    token_px = cfg.token_patch * max(cfg.width, cfg.height) / cfg.token_input_size
    metres = [token_px * float(np.linalg.norm(c.center - target)) / float(c.K[0, 0]) for c in cams]
    return token_px, float(np.mean(metres))


def _instance_geometry(model: ObjectModel, job: InstanceJob, rng_shape: np.random.Generator) -> tuple[
        Mesh, dict[str, float], np.ndarray]:
    """Mesh of a (jittered) instance in world coordinates, its parameters and its 4×4 placement."""
    cfg = job.config
    if job.role == "train_synth":
        params = dict(model.nominal)
        mesh = model.build(params, cfg.mesh_spacing_m)
        return mesh, params, np.eye(4)
    params = model.jittered(rng_shape)
    mesh = model.build(params, cfg.mesh_spacing_m)
    v = mesh.vertices
    # smooth global warp (ovality, slight lean): continuous, so no cracks at the lathe's creases
    ov, phase = rng_shape.normal(0.0, 0.004), rng_shape.uniform(0, np.pi)
    theta = np.arctan2(v[:, 1], v[:, 0])
    scale = 1.0 + ov * np.cos(2 * (theta - phase))
    lean = rng_shape.normal(0.0, 0.004, 2)
    v = np.stack([v[:, 0] * scale + lean[0] * v[:, 2], v[:, 1] * scale + lean[1] * v[:, 2], v[:, 2]], 1)
    # placement on the fixture: ~1 mm / ~0.5° repeatability
    yaw = np.deg2rad(rng_shape.normal(0.0, 0.5))
    pose = np.eye(4)
    pose[:3, :3] = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    pose[:2, 3] = rng_shape.normal(0.0, 0.0008, 2)
    mesh.vertices = v @ pose[:3, :3].T + pose[:3, 3]
    return mesh, params, pose


# How many tokens across a defect's labelled surface spans, per size class (before --anomaly-scale).
REGULAR_ANOMALY_TOKENS = (2.6, 4.0)
SMALL_ANOMALY_TOKENS = (1.2, 2.0)
SCRATCH_WIDTH_TOKENS = (0.8, 1.1)  # an abraded band (a scuff): a token-level detector sees it
# labelled span / radius of each kind: bump/dent surface displaced > 15 % of the height lies within
# 0.78 r; a stain's weight exceeds ½ within 0.875 r; a cut's labelled rim reaches 1.3 r (MISSING_RIM)
SPAN_PER_RADIUS = {"bump": 1.56, "dent": 1.56, "stain": 1.75, "missing": 2.6, "scratch": 1.6}
# Share of "hidden" draws: placed where at most HIDDEN_MAX_VIEWS views see the defect's footprint, if the
# class offers such a site for its size (the vase's and bin's insides do; the stool and the ribbed container
# barely, so hidden draws there mostly fall back to ordinary sites: 0.75 gives about a third overall).
FEW_VIEWS_PROB = 0.75
HIDDEN_MAX_VIEWS = 3
HIDDEN_SITES_TESTED = 400  # candidate centres whose footprint is tested per hidden defect (bounds the cost)
N_PLACEMENT_CANDIDATES = 12000  # surface points sampled for placement and footprint visibility
MISSING_RIM = 0.3  # the rim band of a cut, as a fraction of its radius (plus one mesh spacing)


def _fits(center: np.ndarray, normal: np.ndarray, part: int, reach: float, centroids: np.ndarray,
          tri_normals: np.ndarray, tri_areas: np.ndarray, tri_parts: np.ndarray, min_fill: float = 0.6) -> bool:
    """Whether a defect of radius ``reach`` around ``center`` lies on one sheet of one part: the surface
    of that part facing the same way (normal · n > 0.5) within ``reach`` covers at least ``min_fill`` of a
    flat disc of that radius (a thin leg or a rim offers far less)."""
    near = (np.linalg.norm(centroids - center, axis=1) < reach) & (tri_parts == part) & (tri_normals @ normal > 0.5)
    return float(tri_areas[near].sum()) >= min_fill * np.pi * reach ** 2


def min_view_pixels(cam: Camera) -> int:
    """Mask pixels near a defect from which a view counts as seeing it (``visible_in_views``)."""
    return max(4, int(0.0001 * cam.width * cam.height))


def footprint_views(sites: np.ndarray, reach: float, pts: np.ndarray, nrm: np.ndarray, part: np.ndarray,
                    view_px: np.ndarray, min_px: np.ndarray, both_skins: bool = False) -> np.ndarray:
    """How many views see the footprint of a defect of radius ``reach`` centred at each candidate point
    ``sites`` (indices into ``pts``), by the measure of ``visible_in_views``: a view counts when the
    footprint's candidate points (within ``reach``, same part and sheet — normal · n > 0.2, the sheet test
    of the defects themselves) cover at least ``min_px`` (per view) of its pixels; ``view_px`` (points,
    views) is the pixel area each point's share of the surface covers in each view (0: not visible).
    ``both_skins``: the footprint includes the other side of a thin wall (a cut goes through it, and its
    labelled rim lies on both skins).

    The centre alone undercounts: a defect several tokens across reaches round an edge or out of a
    cavity into views that never see its centre (generator 2.0 placed 35 % of the centres where ≤ 3
    views see them, yet only 6 % of the defects were seen by ≤ 3 views)."""
    from scipy.spatial import cKDTree

    out = np.zeros(len(sites), np.int64)
    if len(sites) == 0:
        return out
    near = cKDTree(pts).query_ball_point(pts[sites], reach)
    for k, (i, nb) in enumerate(zip(sites, near)):
        nb = np.asarray(nb, np.int64)
        nb = nb[(part[nb] == part[i]) & (both_skins | (nrm[nb] @ nrm[i] > 0.2))]
        out[k] = int((view_px[nb].sum(axis=0) >= min_px).sum())
    return out


def _choose_anomalies(kinds: Sequence[str], mesh: Mesh, normals: np.ndarray, scene, cams: Sequence[Camera],
                      extent: float, token_m: float, rng: np.random.Generator, size_scale: float = 1.0,
                      small_prob: float = 0.2) -> list[Anomaly]:
    """Anomaly centres on surface points seen well by at least one camera; about a third of the
    defects ("hidden" draws) are placed where at most three views see any of their footprint.

    Sizes are drawn in token units (``token_m`` metres per token): the labelled surface of a regular
    defect spans 2.6–4 tokens, of a small one (probability ``small_prob``) 1.2–2 tokens; a scratch is
    that long and 0.8–1.1 tokens wide. ``size_scale`` multiplies radii and scratch lengths (the random
    draws stay the same, so scale 1 is the default benchmark); heights and depths keep the class scale.
    A hidden defect's site depends on its size (a larger footprint needs a more hidden place), so under
    another ``size_scale`` it may move (as may any defect whose first candidate sites fail the fit test
    at one size but not at the other).
    """
    n_cand = min(N_PLACEMENT_CANDIDATES, len(mesh.vertices))
    cand = rng.choice(len(mesh.vertices), n_cand, replace=False)
    pts, nrm, part = mesh.vertices[cand], normals[cand], _vertex_parts(mesh)[cand]
    seen = np.zeros(n_cand, np.int64)  # views that see the point well (cos > 0.4)
    # pixels each point's share of the surface covers in each view (foreshortened; 0 where occluded)
    view_px = np.zeros((n_cand, len(cams)))
    sample_area = float(mesh.face_normals_areas()[1].sum()) / n_cand
    for v, cam in enumerate(cams):
        d = pts - cam.center
        cos = -np.sum(d * nrm, axis=1) / np.linalg.norm(d, axis=1)
        uv, z = project_points(pts, cam.K, cam.T_c2w)
        _, inside = rays_to_pixels(uv, cam.height, cam.width)
        t, _, _ = _cast(scene, cam.center, d)
        visible = inside & (z > 0) & (t > 1.0 - 1e-3)
        seen += (cos > 0.4) & visible
        view_px[:, v] = np.where(visible & (cos > 0), cos * sample_area * (cam.K[0, 0] / np.maximum(z, 1e-6)) ** 2, 0.0)
    ok = seen >= 1
    min_px = np.array([min_view_pixels(cam) for cam in cams])
    # prefilter: centres that at most three views see (inside a cavity, under a seat...); a hidden
    # defect's footprint is tested exactly below (a quarter of the pixels here: one point stands for a
    # few pixels only)
    few = np.nonzero(ok & ((view_px >= min_px / 4).sum(axis=1) <= HIDDEN_MAX_VIEWS))[0]
    centroids = mesh.vertices[mesh.triangles].mean(axis=1)
    tri_normals, tri_areas = mesh.face_normals_areas()
    out: list[Anomaly] = []
    scale = extent / 0.3  # heights and depths follow the class size
    for kind in kinds:
        hidden = rng.random() < FEW_VIEWS_PROB
        lo, hi = SMALL_ANOMALY_TOKENS if rng.random() < small_prob else REGULAR_ANOMALY_TOKENS
        span = rng.uniform(lo, hi) * token_m * size_scale  # metres across the labelled surface
        if kind == "scratch":
            width = rng.uniform(*SCRATCH_WIDTH_TOKENS) * token_m * size_scale
            radius = width / SPAN_PER_RADIUS["scratch"]
        else:
            radius = span / SPAN_PER_RADIUS[kind]
        reach = span / 2  # the defect must fit on one sheet of one part (not wrap a thin leg or rim)
        pool = np.nonzero(ok)[0]
        if hidden and len(few):
            # the whole footprint (a disc of the labelled span; a scratch's band lies inside it) seen by
            # at most three views
            sites = few if len(few) <= HIDDEN_SITES_TESTED else rng.choice(few, HIDDEN_SITES_TESTED, replace=False)
            # a view counts from half the pixels of visible_in_views already: the sampled footprint is an
            # estimate, and a bump or dent turns part of its surface towards other views
            n_views = footprint_views(sites, reach, pts, nrm, part, view_px, min_px / 2, both_skins=kind == "missing")
            hid = sites[n_views <= HIDDEN_MAX_VIEWS]
            if len(hid):  # else the geometry offers no such site for a defect this size: placed as any other
                pool = hid
        if len(pool) == 0:
            raise SynthError("no visible surface point to place an anomaly on; check the camera rig")
        for _ in range(50):  # keep two anomalies of one instance apart
            i = int(rng.choice(pool))
            apart = all(np.linalg.norm(pts[i] - a.center) > 1.2 * (a.radius + a.length / 2 + radius + span / 2 * (
                kind == "scratch")) for a in out)
            if apart and _fits(pts[i], nrm[i], int(part[i]), reach, centroids, tri_normals, tri_areas, mesh.part):
                break
        c, n, on = pts[i].copy(), nrm[i].copy(), int(part[i])
        seed = int(rng.integers(1 << 30))
        if kind in ("bump", "dent"):
            amp = rng.uniform(0.003, 0.007) * scale * (1 if kind == "bump" else -1)
            out.append(Anomaly(kind, c, n, radius, amp, noise_seed=seed, part=on))
        elif kind == "missing":
            out.append(Anomaly(kind, c, n, radius, noise_seed=seed, part=on))
        elif kind == "stain":
            out.append(Anomaly(kind, c, n, radius, rng.uniform(0.35, 0.6), noise_seed=seed, part=on))
        else:  # scratch: a bright line along a random tangent
            tangent = _unit(np.cross(n, rng.normal(size=3)))
            out.append(Anomaly(kind, c, n, radius, tangent=tangent, length=span, noise_seed=seed, part=on))
    return out


def _encode_png(image: np.ndarray) -> bytes:
    import cv2  # lazy

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise SynthError("PNG encoding failed")
    return buf.tobytes()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(compressed: bool = False, **arrays: Any) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


_UMASK: list[int] = []


def _umask() -> int:
    if not _UMASK:
        current = os.umask(0)  # reading the umask requires setting it; restore at once
        os.umask(current)
        _UMASK.append(current)
    return _UMASK[0]


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + ``os.replace`` (readers never see partial files).

    No fsync: the benchmark is regenerated from its seed, so durability is not worth the time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a dataset should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def calib_npz_bytes(cam: Camera) -> bytes:
    """Our per-view calibration file (the ``npz`` calibration reader's format)."""
    return _npz_bytes(K=cam.K, T_c2w=cam.T_c2w, width=np.int64(cam.width), height=np.int64(cam.height),
                      depth_scale=np.float64(1.0), depth_type=np.str_("z"), pixel_center=np.float64(0.0),
                      stem=np.str_(cam.stem), format_version=np.int64(FORMAT_VERSION))


def generate_instance(job: InstanceJob) -> dict[str, Any]:
    """Render, annotate and write one instance; returns its metadata (also written as meta.json)."""
    cfg, setup = job.config, job.class_setup
    model = OBJECT_MODELS[setup.name]
    ss = np.random.SeedSequence(job.seed_entropy)
    rng_shape, rng_tex, rng_anom, rng_views, rng_gt = (np.random.default_rng(s) for s in ss.spawn(5))
    synth = job.role == "train_synth"

    mesh, params, pose = _instance_geometry(model, job, rng_shape)
    tex = TextureParams(seed=int(rng_tex.integers(1 << 30)), cad=synth)
    if not synth:
        tex.contrast = 1.0 + rng_tex.normal(0.0, 0.03)
        tex.brightness = 1.0 + rng_tex.normal(0.0, 0.02)
        tex.shift = rng_tex.normal(0.0, 0.004)
    pose_inv_R, pose_t = pose[:3, :3].T, pose[:3, 3]

    def albedo_fn(points: np.ndarray, part: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return model.albedo((points - pose_t) @ pose_inv_R.T, part, params, tex, noise)

    anomalies: list[Anomaly] = []
    flags = np.zeros(len(mesh.triangles), bool)
    if job.anomalous:
        scene0 = _scene(mesh.vertices, mesh.triangles)
        anomalies = _choose_anomalies(job.anomaly_types, mesh, mesh.welded_normals(), scene0, setup.cameras,
                                      setup.extent_m, setup.token_m, rng_anom, size_scale=cfg.anomaly_scale,
                                      small_prob=cfg.small_anomaly_prob)
        for an in anomalies:  # geometric anomalies change the mesh; flags follow the triangles
            if an.kind in GEOMETRIC_TYPES:
                mesh, flags, _ = apply_geometric_anomaly(mesh, an, mesh.welded_normals(), flags,
                                                          rim_extra=cfg.mesh_spacing_m)
    scene = _scene(mesh.vertices, mesh.triangles)
    vnormals = mesh.vertex_normals()
    vnoise = model.albedo_noise((mesh.vertices - pose_t) @ pose_inv_R.T, tex)

    spec = RenderSpec(realistic=not synth, depth_noise_m=cfg.depth_noise_m, image_noise=cfg.image_noise,
                      artefact_prob=cfg.artefact_view_prob, specular_prob=cfg.specular_view_prob,
                      grazing_cos=cfg.grazing_dropout_cos)
    renders = []
    for cam in setup.cameras:
        renders.append(render_view(scene, mesh, vnormals, vnoise, flags, anomalies, cam,
                                   cam.ray_directions(), roi_pixels(cam, setup.grid), albedo_fn, spec,
                                   rng_views))

    # ---- write the views (SiM3D layout) ----
    d = job.instance_dir
    for cam, rv in zip(setup.cameras, renders):
        if synth and cfg.synth_depth_format == "exr":
            depth = np.where(np.isfinite(rv.depth), rv.depth, np.float32(SYNTH_BACKGROUND_DEPTH))
            write_atomic(d / "DEPTH" / f"{cam.stem}_depth.exr", encode_exr(depth.astype(np.float32)))
            write_atomic(d / "RGB" / f"{cam.stem}_2.png", _encode_png(rv.image))
        else:
            write_atomic(d / "depth" / f"{cam.stem}.npy", _npy_bytes(rv.depth.astype(np.float32)))
            write_atomic(d / "rgb" / f"{cam.stem}_2.png", _encode_png(rv.image))
        write_atomic(d / CALIB_DIR / f"{cam.stem}.npz", calib_npz_bytes(cam))

    meta: dict[str, Any] = {
        "name": job.name, "class": setup.name, "role": job.role,
        "label": ("anomalous" if job.anomalous else "normal") if job.role == "test" else "normal",
        "anomalies": [],
        "artefacts": {cam.stem: rv.artefacts for cam, rv in zip(setup.cameras, renders) if rv.artefacts},
        "placement_T": pose.tolist(), "shape_params": params,
    }
    if job.role == "test":
        gt_stats = _write_ground_truth(job, mesh, anomalies, renders, rng_gt)
        for an, (views, size) in zip(anomalies, gt_stats.pop("views_per_anomaly")):
            meta["anomalies"].append({**an.to_json(), "visible_in_views": views, "largest_view": size})
        meta["gt"] = gt_stats
    write_atomic(d / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    return {"name": job.name, "role": job.role, "label": meta["label"],
            "anomalies": [a["type"] for a in meta["anomalies"]],
            "artefact_views": len(meta["artefacts"])}


SPECKLE_MAX_VOXELS = 60  # a piece of a defect's labels this small, apart from its largest piece, is a speckle


def _speckles(labels: np.ndarray, grid: VoxelGrid, anomalies: Sequence[Anomaly]) -> np.ndarray:
    """Label voxels forming speckles: pieces of a defect's observed surface (26-connected) other than its
    largest piece and smaller than ``SPECKLE_MAX_VOXELS`` — a few pixels at a silhouette, or the sparse
    measured points of a surface seen obliquely, whose gaps split one defect into many tiny pieces. PRO
    counts every region equally, so such pieces would weigh as much as the defect itself."""
    from scipy import ndimage

    comp, n = ndimage.label(labels, structure=np.ones((3, 3, 3), bool))
    if n <= 1 or not anomalies:
        return np.zeros_like(labels)
    sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(labels, comp, np.arange(1, n + 1)))
    world = grid.origin + (centroids + 0.5) * grid.voxel_size
    owner = np.argmin([np.linalg.norm(world - a.center, axis=1) for a in anomalies], axis=0)  # nearest defect
    speck = np.zeros(n + 1, bool)
    for k in range(len(anomalies)):
        mine = np.flatnonzero(owner == k)
        if mine.size <= 1:
            continue
        small = sizes[mine] < SPECKLE_MAX_VOXELS
        small[np.argmax(sizes[mine])] = False  # the largest piece always stays
        speck[mine[small] + 1] = True
    return speck[comp]


def _write_ground_truth(job: InstanceJob, mesh: Mesh, anomalies: Sequence[Anomaly],
                        renders: Sequence[ViewRender], rng: np.random.Generator) -> dict[str, Any]:
    """GT volume (anomalous observed surface voxels + occupancy) and per-view 2D masks (GT format 2).

    ``labels`` are the voxels of the *measured* points of the masked pixels: the depth as written,
    back-projected exactly as every reader does — so every masked pixel with depth lands in a label
    voxel, and every label voxel is reached by one. Never removed material, never surface that no view
    measured. Speckles (``_speckles``) are dropped from both."""
    setup = job.class_setup
    grid, cams = setup.grid, setup.cameras
    vs = grid.voxel_size
    depths = [rv.depth_clean for rv in renders]
    tris = mesh.vertices[mesh.triangles]
    # occupancy: every rendered surface pixel + a dense sampling of the visible surface
    pts, nrm, _ = sample_triangles(tris, 1.0 / vs ** 2, rng)
    occ_pts = [np.concatenate([rv.hits for rv in renders]), pts[visible_mask(pts, nrm, cams, depths, vs)]]
    labels = np.zeros(grid.shape, bool)
    measured = [(rv, backproject_depth(rv.depth, cam.K, cam.T_c2w, mask=rv.mask))
                for cam, rv in zip(cams, renders) if rv.mask.any()]
    if measured:
        lab_pts = np.concatenate([pts for _, (pts, _) in measured])
        _, inside = grid.index(lab_pts)
        if not inside.all():
            raise SynthError(f"{job.name}: {int((~inside).sum())} anomalous points fall outside the class GT grid")
        labels = grid.occupancy(lab_pts)
        specks = _speckles(labels, grid, anomalies)
        if specks.any():  # drop them in 3D and in 2D, so that masks and labels still agree
            labels &= ~specks
            for rv, (pts, pix) in measured:
                idx, _ = grid.index(pts)
                drop = specks[idx[:, 0], idx[:, 1], idx[:, 2]]
                rv.mask[pix[drop, 0], pix[drop, 1]] = False
    occupancy = grid.occupancy(np.concatenate(occ_pts)) | labels
    _, inside = grid.index(np.concatenate(occ_pts))
    if not inside.all():
        raise SynthError(f"{job.name}: {int((~inside).sum())} surface points fall outside the class GT grid")
    d = job.instance_dir
    write_atomic(d / GT_FILE, _npz_bytes(
        compressed=True, labels=labels, occupancy=occupancy, origin=grid.origin, voxel_size=np.float64(vs),
        format_version=np.int64(GT_FORMAT_VERSION), labels_definition=np.str_(LABELS_DEFINITION)))
    views_per_anomaly = []
    for cam, rv in zip(cams, renders):
        write_atomic(d / MASK_DIR / f"{cam.stem}.png", _encode_png(rv.mask.astype(np.uint8) * 255))
    min_px = min_view_pixels(cams[0])
    token_area = setup.token_px ** 2
    for an in anomalies:  # in which views is this anomaly visible (≥ min_px pixels near its centre)?
        views, best = [], {"area_tokens": 0.0, "span_tokens": [0.0, 0.0], "view": None}
        for cam, rv in zip(cams, renders):
            uv, z = project_points(an.center[None], cam.K, cam.T_c2w)
            pix, inside_ = rays_to_pixels(uv, cam.height, cam.width)
            if not inside_[0] or not rv.mask.any():
                continue
            r_px = ((1.0 + MISSING_RIM) * an.radius + an.length / 2) * cam.K[0, 0] / max(z[0], 1e-6) + 3
            vv, uu = np.nonzero(rv.mask)
            near = np.hypot(vv - pix[0, 0], uu - pix[0, 1]) <= r_px
            if near.sum() >= min_px:
                views.append(cam.stem)
                area = float(near.sum()) / token_area
                if area > best["area_tokens"]:  # the view that shows most of it: its size in tokens
                    extent = sorted([np.ptp(vv[near]) + 1.0, np.ptp(uu[near]) + 1.0], reverse=True)
                    best = {"area_tokens": round(area, 3), "view": cam.stem,
                            "span_tokens": [round(e / setup.token_px, 3) for e in extent]}
        views_per_anomaly.append((views, best))
    return {"anomalous_voxels": int(labels.sum()), "occupied_voxels": int(occupancy.sum()),
            "views_per_anomaly": views_per_anomaly}


# ---------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------


def _test_plan(class_name: str, cfg: SynthConfig) -> list[tuple[str, bool, tuple[str, ...]]]:
    """(folder name, anomalous, anomaly types) of the test instances of a class."""
    rng = np.random.default_rng(np.random.SeedSequence(_stable_seed(cfg.seed, class_name, 0x7E57)))
    n_anom = round(cfg.n_test * cfg.anomalous_fraction)
    anomalous = np.zeros(cfg.n_test, bool)
    anomalous[rng.permutation(cfg.n_test)[:n_anom]] = True
    kinds = list(rng.permutation(ANOMALY_TYPES))
    width = max(2, len(str(cfg.n_test)))
    plan, k = [], 0
    for i in range(cfg.n_test):
        name = f"{class_name}_{i + 1:0{width}d}"
        if anomalous[i]:
            first = kinds[k % len(kinds)]
            types = [first]
            if rng.random() < cfg.second_anomaly_prob:
                types.append(str(rng.choice([t for t in ANOMALY_TYPES if t != first])))
            k += 1
            plan.append((name + "_bad", True, tuple(str(t) for t in types)))
        else:
            plan.append((name, False, ()))
    return plan


def _prepare_output(out_dir: Path, cfg: SynthConfig, overwrite: bool) -> None:
    """Refuse to clobber folders we did not write; with ``overwrite`` remove our previous output."""
    marker = out_dir / "benchmark.json"
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not marker.is_file():
        raise SynthError(f"{out_dir} exists, is not empty and holds no benchmark.json: refusing to write into a "
                         "folder this generator did not create (choose an empty or new --out)")
    if not overwrite:
        raise SynthError(f"{out_dir} already holds a generated benchmark; pass --overwrite to regenerate it")
    try:
        old = json.loads(marker.read_text())
        old_classes = list(old.get("classes", {}))
    except (OSError, ValueError) as exc:
        raise SynthError(f"cannot read {marker}: {exc}") from exc
    if old.get("format") != FORMAT:
        raise SynthError(f"{marker} was not written by this generator (format {old.get('format')!r})")
    for name in set(old_classes) | set(cfg.classes):
        target = out_dir / name
        if target.exists() and name not in old_classes:
            raise SynthError(f"{target} exists but is not part of the previous benchmark: refusing to delete it")
        if target.exists():
            shutil.rmtree(target)
    marker.unlink()


def generate_benchmark(out_dir: str | os.PathLike, cfg: SynthConfig | None = None, overwrite: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Generate the benchmark under ``out_dir``; returns a summary (also stored as benchmark.json)."""
    cfg = cfg or SynthConfig()
    cfg.validate()
    out_dir = Path(out_dir)
    _prepare_output(out_dir, cfg, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs: list[InstanceJob] = []
    classes: dict[str, Any] = {}
    for class_name in cfg.classes:
        setup = build_class_setup(class_name, cfg)
        cls_dir = out_dir / class_name
        train = []
        if "real2real" in cfg.setups:
            train.append((f"{class_name}_real", "train_real"))
        if "synth2real" in cfg.setups:
            train.append((f"{class_name}_synth", "train_synth"))
        for name, role in train:
            jobs.append(InstanceJob(setup, name, role, False, (), _stable_seed(cfg.seed, class_name, name),
                                    cls_dir / name, cfg))
        plan = _test_plan(class_name, cfg)
        for name, anomalous, types in plan:
            jobs.append(InstanceJob(setup, name, "test", anomalous, types, _stable_seed(cfg.seed, class_name, name),
                                    cls_dir / name, cfg))
        cameras_doc = {"format": "synthetic-sim3d-cameras", "format_version": FORMAT_VERSION,
                       "convention": "OpenCV pinhole; T_c2w camera-to-world; pixel (u, v) centre at integer "
                                     "coordinates (pixel_center 0.0); depth = z along the optical axis, metres",
                       "depth_type": "z", "depth_scale": 1.0, "pixel_center": 0.0,
                       "views": [c.to_json() for c in setup.cameras]}
        write_atomic(cls_dir / "cameras.json", (json.dumps(cameras_doc, indent=1) + "\n").encode())
        classes[class_name] = {
            "n_views": cfg.n_views, "stems": [c.stem for c in setup.cameras], "width": cfg.width,
            "height": cfg.height, "extent_m": setup.extent_m,
            "token": {"input_size": cfg.token_input_size, "patch": cfg.token_patch,
                      "px": round(setup.token_px, 4), "m": round(setup.token_m, 6)},
            "gt_grid": {"origin": setup.grid.origin.tolist(), "voxel_size": setup.grid.voxel_size,
                        "shape": list(setup.grid.shape)},
            "train": {role.split("_")[1]: name for name, role in train},
            "test": [{"name": n, "label": "anomalous" if a else "normal", "anomalies": list(t)} for n, a, t in plan],
        }
    summary = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator_version": GENERATOR_VERSION,
               "status": "incomplete", "config": _config_json(cfg), "classes": classes}
    write_atomic(out_dir / "benchmark.json", (json.dumps(summary, indent=1) + "\n").encode())

    results = _run_jobs(jobs, cfg.workers, progress)
    for job, res in zip(jobs, results):
        if job.role == "test":
            entry = next(e for e in classes[job.class_setup.name]["test"] if e["name"] == job.name)
            entry["artefact_views"] = res["artefact_views"]
    summary["status"] = "complete"
    summary["n_instances"] = len(jobs)
    summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
    write_atomic(out_dir / "benchmark.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def _config_json(cfg: SynthConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out.pop("workers")  # does not change the output
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _run_jobs(jobs: list[InstanceJob], workers: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="synthetic benchmark", unit="instance", disable=not progress)
    try:
        if workers <= 1:
            out = []
            for job in jobs:
                out.append(generate_instance(job))
                bar.update(1)
            return out
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn, not fork: open3d's thread pool does not survive a fork
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(generate_instance, job) for job in jobs]
            for _ in cf.as_completed(futures):
                bar.update(1)
            return [f.result() for f in futures]
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for item in values for v in item.split(",") if v]


def build_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python data_prep/synthetic.py",
        description="Generate the built-in synthetic SiM3D-like multiview benchmark (depth/*.npy, "
                    "rgb/*_2.png, calib/*.npz, gt/volume.npz, gt/masks/*.png; see docs/synthetic_benchmark.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = SynthConfig()
    parser.add_argument("--out", required=True, help="output folder (new or empty; or a previous benchmark "
                                                     "with --overwrite)")
    parser.add_argument("--classes", nargs="+", default=list(d.classes),
                        help=f"classes to generate (space or comma separated) among {list(OBJECT_MODELS)}")
    parser.add_argument("--views", type=int, default=d.n_views, help="views per instance (SiM3D: 12 or 36)")
    parser.add_argument("--size", type=int, default=d.width, help="image width in pixels")
    parser.add_argument("--aspect", type=float, default=d.height / d.width, help="image height / width")
    parser.add_argument("--n-test", type=int, default=d.n_test, help="test instances per class")
    parser.add_argument("--anomalous-fraction", type=float, default=d.anomalous_fraction,
                        help="fraction of anomalous test instances")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (output is a function of it)")
    parser.add_argument("--setup", choices=["both", *SETUPS], default="both",
                        help="training instance(s) to write: <class>_real (real2real), <class>_synth (synth2real)")
    parser.add_argument("--voxel-size", type=float, default=None,
                        help="GT voxel size in metres (default: class extent / --voxels-across)")
    parser.add_argument("--voxels-across", type=int, default=d.voxels_across,
                        help="object extent in GT voxels when --voxel-size is not given")
    parser.add_argument("--synth-depth-format", choices=["exr", "npy"], default=d.synth_depth_format,
                        help="depth files of <class>_synth: SiM3D's DEPTH/<view>_depth.exr or depth/<view>.npy")
    parser.add_argument("--depth-noise", type=float, default=d.depth_noise_m,
                        help="std of the depth noise of real scans, metres (0 = exact depth)")
    parser.add_argument("--artefact-prob", type=float, default=d.artefact_view_prob,
                        help="probability of missing-depth patches per real view")
    parser.add_argument("--specular-prob", type=float, default=d.specular_view_prob,
                        help="probability of a strong specular highlight per real view")
    parser.add_argument("--anomaly-scale", type=float, default=d.anomaly_scale,
                        help="multiply the size of every anomaly (2-3: defects of a few tokens at 224 px, as in the demo)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes (the output does not depend on it)")
    parser.add_argument("--overwrite", action="store_true", help="replace a benchmark previously written to --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> SynthConfig:
    if args.size < 16 or not 0.1 <= args.aspect <= 10:
        raise SynthError(f"--size must be >= 16 and --aspect within [0.1, 10], got {args.size}, {args.aspect}")
    return SynthConfig(
        classes=tuple(_split_list(args.classes)), n_views=args.views, width=args.size,
        height=max(16, round(args.size * args.aspect)), n_test=args.n_test,
        anomalous_fraction=args.anomalous_fraction, seed=args.seed,
        setups=SETUPS if args.setup == "both" else (args.setup,), voxel_size=args.voxel_size,
        voxels_across=args.voxels_across, synth_depth_format=args.synth_depth_format,
        depth_noise_m=args.depth_noise, artefact_view_prob=args.artefact_prob,
        specular_view_prob=args.specular_prob, anomaly_scale=args.anomaly_scale, workers=max(1, args.workers))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = generate_benchmark(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
        n_test = sum(len(c["test"]) for c in summary["classes"].values())
        print(f"wrote {summary['n_instances']} instances ({n_test} test) of {len(summary['classes'])} "
              f"classes × {cfg.n_views} views ({cfg.width}×{cfg.height}) to {args.out} in "
              f"{summary['elapsed_s']:.1f} s")
    except SynthError as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
