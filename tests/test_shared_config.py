"""Typed configs: dataclass defaults ← YAML ← key=value overrides."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from shared.config import ConfigError, load_config, parse_overrides, save_config, to_dict


@dataclass
class OptimCfg:
    base_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    epochs: int = 100


@dataclass
class DataCfg:
    shards: list[str] = field(default_factory=list)
    preset: str | None = None
    mode: Literal["indexed", "streaming"] = "indexed"


@dataclass
class RunCfg:
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    output_dir: str = "runs/x"
    bf16: bool = True


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  base_lr: 5e-4\n  epochs: 3\ndata:\n  shards: [a, b]\n")
    cfg = load_config(RunCfg, cfg_file, ["optim.epochs=7", "data.mode=streaming", "bf16=false"])
    assert cfg.optim.base_lr == 5e-4  # YAML (PyYAML reads "5e-4" as a string: coerced to float)
    assert cfg.optim.epochs == 7  # override beats YAML
    assert cfg.optim.betas == (0.9, 0.999)  # default kept
    assert cfg.data.shards == ["a", "b"] and cfg.data.mode == "streaming" and cfg.bf16 is False


def test_unknown_key_names_the_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"optim\.base_lrr"):
        load_config(RunCfg, overrides=["optim.base_lrr=1"])
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("dataa: {}\n")
    with pytest.raises(ConfigError, match="dataa"):
        load_config(RunCfg, cfg_file)


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.epochs=abc", "optim.epochs"),
        ("optim.epochs=1.5", "optim.epochs"),
        ("data.mode=random", "data.mode"),
        ("optim.betas=[1]", "optim.betas"),
        ("bf16=maybe", "bf16"),
        ("novalue", "key=value"),
        ("optim=3", "optim"),
    ],
)
def test_bad_values_are_errors_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RunCfg, overrides=[override])


def test_optional_and_list_values():
    cfg = load_config(RunCfg, overrides=["data.preset=C", "optim.betas=[0.8, 0.9]"])
    assert cfg.data.preset == "C" and cfg.optim.betas == (0.8, 0.9)
    cfg = load_config(RunCfg, overrides=["data.preset=null"])
    assert cfg.data.preset is None


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


def test_resolved_config_saved_and_reloaded(tmp_path: Path):
    cfg = load_config(RunCfg, overrides=["optim.epochs=2", "data.shards=[s1]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(path.read_text())["optim"]["epochs"] == 2
    assert load_config(RunCfg, path) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp file left behind


def test_missing_config_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunCfg, tmp_path / "nope.yaml")
