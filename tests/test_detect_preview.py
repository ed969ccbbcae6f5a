"""The benchmark preview figure (detect/data/preview.py): PNG from a generated synthetic benchmark read
through the SiM3D reader, refusal to write inside the dataset root, CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open3d")  # the generator ray-casts with open3d (needs libusb-1.0, see shared/sysdeps)
pytest.importorskip("matplotlib")

from data_prep import synthetic as syn
from detect.data import preview

REPO = Path(__file__).resolve().parents[1]
TINY = {"classes": ("bin",), "n_views": 4, "width": 160, "height": 120, "n_test": 2, "seed": 3,
        "depth_noise_m": 0.0, "voxels_across": 64}  # one anomalous test instance is enough
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "bench"
    syn.generate_benchmark(root, syn.SynthConfig(**TINY), progress=False)
    return root


def test_preview_png(bench, tmp_path):
    png = preview.render_preview(bench, tmp_path / "preview.png", class_name="bin")
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file
    with pytest.raises(preview.PreviewError, match="inside the dataset root"):
        preview.render_preview(bench, bench / "preview.png")
    with pytest.raises(preview.PreviewError, match="inside the dataset root"):
        preview.render_preview(bench, bench / "bin" / "sub" / "preview.png")
    assert not (bench / "preview.png").exists()


def test_preview_errors(bench, tmp_path):
    with pytest.raises(preview.PreviewError, match="no instance 'nope'"):
        preview.render_preview(bench, tmp_path / "p.png", class_name="bin", instance="nope")
    with pytest.raises(preview.SiM3DError, match="not found"):
        preview.render_preview(bench, tmp_path / "p.png", class_name="nope")
    assert not (tmp_path / "p.png").exists()


def test_preview_cli(bench, tmp_path, capsys):
    out = tmp_path / "cli.png"
    bad = next(p.name for p in (bench / "bin").iterdir() if p.name.endswith("_bad"))
    assert preview.main(["--root", str(bench), "--out", str(out), "--class", "bin", "--instance", bad]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and str(out) in capsys.readouterr().out
    assert preview.main(["--root", str(bench), "--out", str(bench / "x.png")]) == 2
    assert "inside the dataset root" in capsys.readouterr().err
    assert preview.main(["--root", str(tmp_path / "missing"), "--out", str(tmp_path / "y.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # script form: --help answers without project imports failing (repo root put on sys.path)
    for cmd in ([sys.executable, "detect/data/preview.py", "--help"],
                [sys.executable, "-m", "detect.data.preview", "--help"]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--instance" in proc.stdout and not proc.stderr, proc.stderr


def test_lazy_export():
    import detect.data

    assert detect.data.render_preview is preview.render_preview
    assert detect.data.PreviewError is preview.PreviewError
