"""Training-data compositions A / B / C of the paper (Table 5; ``dino_depth.md`` §13).

A preset names the sources; the split selection is separate (``splits``, default
``train,validation``; the paper's counts for A need ``all``, i.e. test sets included) and is
recorded with the preset in the exported encoder. SiM3D is never a pretraining source.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Preset:
    name: str
    sources: tuple[str, ...]
    paper_samples: int
    description: str


PRESETS: dict[str, Preset] = {
    "A": Preset("A", ("mvtec3d", "eyecandies"), 19_647, "MVTec 3D-AD + Eyecandies (real + synthetic metric depth)"),
    "B": Preset("B", ("mvtec3d", "eyecandies", "realiad_d3"), 23_896, "A + Real-IAD D3"),
    "C": Preset("C", ("mvtec3d", "eyecandies", "realiad_d3", "mvtec_ad", "mvtec_loco", "mvtec_ad2", "visa"),
                46_528, "B + Depth-Anything-V2 pseudo-depth of MVTec AD, MVTec LOCO AD, MVTec AD 2, VisA"),
}


def get_preset(name: str) -> Preset:
    key = str(name).upper()
    if key not in PRESETS:
        raise ValueError(f"unknown data preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[key]


def preset_sources(name: str) -> list[str]:
    """Source ids of preset ``name`` (``A``, ``B`` or ``C``)."""
    return list(get_preset(name).sources)


def preset_shard_patterns(name: str, shard_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Glob patterns ``<dir>/<source>-*.tar`` of the preset's sources in every shard folder."""
    return [str(Path(d) / f"{src}-*.tar") for src in preset_sources(name) for d in shard_dirs]


def expand_patterns(patterns: Sequence[str]) -> list[str]:
    """Sorted shard paths matching ``patterns`` (a pattern matching nothing is an error)."""
    out: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat))
        if not hits:
            raise FileNotFoundError(f"no shard matches {pat!r}")
        out.extend(hits)
    return sorted(dict.fromkeys(out))
