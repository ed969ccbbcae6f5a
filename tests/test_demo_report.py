"""The demo's pictures (detect/demo_figures.py, code in detect/pipeline/figures.py) and static report
(detect/report.py, code in detect/pipeline/report_html.py) on a tiny real run:
valid (well-formed) HTML whose every picture and link exists and decodes; rendered headless in Chromium
when it is installed (`apt-get install -y chromium`)."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch

from detect.demo_figures import main as figures_main
from detect.pipeline.figures import make_figures
from detect.pipeline.report_html import ReportError, build_report, png_size, read_timings
from detect.report import main as report_main
from detect.run import main as detect_main

XHTML = "{http://www.w3.org/1999/xhtml}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny benchmark, tiny encoder exports in our own formats, and a full detect/run.py run on them."""
    from data_prep.synthetic import SynthConfig, generate_benchmark
    from detect.preprocess import GRAY_MEAN, GRAY_STD
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    root = tmp_path_factory.mktemp("demo")
    data = root / "data"
    generate_benchmark(data, SynthConfig(classes=("vase",), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    torch.manual_seed(0)
    depth_vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1, img_size=56)
    ckpt = write_export(root / "dinodepth.pth", depth_vit.state_dict(), depth_vit.cfg.to_dict(),
                        default_depth_input_norm(), {}, safetensors=False)
    image_vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1, img_size=56)
    image_norm = {"modality": "image", "in_chans": 1, "scale": 255.0, "max_normalize": True,
                  "mean": [GRAY_MEAN], "std": [GRAY_STD]}
    image_enc = write_export(root / "image_encoder.pth", image_vit.state_dict(), image_vit.cfg.to_dict(),
                             image_norm, {}, safetensors=False)
    out = root / "detect"
    assert detect_main(["--data", str(data), "--ckpt", str(ckpt), "--image-encoder", "auto",
                        "--image-encoder-weights", str(image_enc), "--image-size", "56", "--epochs", "2",
                        "--no-progress", "--save-maps", "orig", "--save-ply", "--out", str(out)]) == 0
    # a pretraining log in the trainer's record format (the slow demo test uses real ones)
    log = root / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"iteration": i, "total": 9.0 - i, "dino_local": 4.0, "dino_global": 1.0,
                                         "ibot": 3.0 - i, "koleo": 0.5, "teacher_entropy": 5.5 - i,
                                         "ibot_teacher_entropy": 4.0, "lr": 1e-3 * (i + 1)})
                             for i in range(3)) + "\n")
    return {"root": root, "data": data, "ckpt": ckpt, "image_enc": image_enc, "detect": out, "log": log}


def _local_targets(html_path: Path, attr: str, tag: str) -> list[Path]:
    text = html_path.read_text()
    tree = ET.fromstring(text[text.index("<html"):])  # polyglot markup: a plain XML parser must accept it
    return [html_path.parent / unquote(el.get(attr)) for el in tree.iter(XHTML + tag)
            if el.get(attr) and not el.get(attr).startswith(("#", "http:", "https:"))]


def test_figures_and_dense_volumes(demo_run, tmp_path):
    figs, vols = tmp_path / "figures", tmp_path / "volumes"
    manifest = json.loads(make_figures(demo_run["data"], demo_run["detect"], figs, demo_run["ckpt"],
                                       {"DINO-Depth": demo_run["log"]}, vols, pca_size=56).read_text())
    names = {Path(f["path"]).name for f in manifest["figures"]}
    assert names == {"maps_vase.png", "volume_vase.png", "instance_scores.png", "pca_depth_features.png",
                     "pretrain_curves.png", "mapping_curves.png"}
    for f in manifest["figures"]:
        w, h = png_size(figs / f["path"])
        assert w > 100 and h > 100 and f["title"] and f["caption"]
    assert len(manifest["volumes"]) == 2 and {v["label"] for v in manifest["volumes"]} == {0, 1}
    for v in manifest["volumes"]:
        sparse = np.load(demo_run["detect"] / "real2real" / "vase" / "volumes" / f"{v['instance']}.npz")
        with np.load(v["dense_npz"]) as dense:
            assert dense["anomaly"].shape == tuple(sparse["shape"]) and dense["anomaly"].dtype == np.float32
            assert np.isclose(dense["anomaly"].max(), v["score"])
            assert dense["occupancy"].sum() == len(sparse["occupancy"])
        head = Path(v["ply"]).read_bytes()[:400]
        assert head.startswith(b"ply\n") and b"property float anomaly" in head


def test_report_is_valid_html_with_every_file_present(demo_run, tmp_path):
    figs = tmp_path / "figures"
    assert figures_main(["--data", str(demo_run["data"]), "--detect", str(demo_run["detect"]), "--out", str(figs),
                         "--ckpt", str(demo_run["ckpt"]), "--pretrain-log", f"DINO-Depth={demo_run['log']}",
                         "--volumes-out", str(tmp_path / "volumes"), "--pca-size", "56"]) == 0
    timings = tmp_path / "timings.tsv"
    timings.write_text("1 benchmark\t10.0\t5.0\t1.0\n3 pretraining\t20.0\t30.0\t2.0\n1 benchmark\t12.5\t6.0\t1.0\n")
    assert read_timings(timings) == [("3 pretraining", 20.0, 32.0), ("1 benchmark", 12.5, 7.0)]
    html_path = tmp_path / "site" / "index.html"  # another folder: every link must be relative to it
    assert report_main(["--run", str(demo_run["detect"]), "--figures", str(figs), "--out", str(html_path),
                        "--timings", str(timings), "--link", f"DINO-Depth encoder={demo_run['ckpt']}"]) == 0
    text = html_path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<table>" in text and "I-AUROC" in text
    assert "V-AUPRO@1%" in text and "vase" in text and "3 pretraining" in text
    images = _local_targets(html_path, "src", "img")
    assert len(images) == 6
    for img in images:
        assert img.is_file() and png_size(img)[0] > 0
    links = _local_targets(html_path, "href", "a")
    assert any(p.suffix == ".ply" for p in links) and any(p.name == "results.csv" for p in links)
    for p in links:
        assert p.exists(), p
    assert not any(Path(s).is_absolute() for s in re.findall(r'(?:src|href)="([^"#]+)"', text))


def test_report_refuses_missing_pictures(demo_run, tmp_path):
    figs = tmp_path / "figures"
    make_figures(demo_run["data"], demo_run["detect"], figs, None, None, None)
    (figs / "mapping_curves.png").unlink()
    with pytest.raises(ReportError, match="mapping_curves.png"):
        build_report(demo_run["detect"], tmp_path / "index.html", figs)
    (figs / "instance_scores.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ReportError, match="cannot be decoded"):
        png_size(figs / "instance_scores.png")
    with pytest.raises(ReportError, match="results.csv"):
        build_report(tmp_path, tmp_path / "index.html")


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    figs = tmp_path / "figures"
    make_figures(demo_run["data"], demo_run["detect"], figs, demo_run["ckpt"], {"DINO-Depth": demo_run["log"]},
                 tmp_path / "volumes", pca_size=56)
    html_path = build_report(demo_run["detect"], tmp_path / "index.html", figs)
    n_images = len(_local_targets(html_path, "src", "img"))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    # the page's own script counts the pictures whose naturalWidth > 0 once the load event fired
    assert f'data-images-loaded="{n_images}/{n_images}"' in dom, dom[:2000]
    assert "<div class=\"missing\">" not in dom  # the banner the script adds for broken pictures
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", url], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape == (2000, 1280) and pixels.std() > 10  # something was drawn, not a blank page
    # and the check can fail: a picture removed after the report was written is reported missing
    (figs / "mapping_curves.png").unlink()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f'data-images-loaded="{n_images - 1}/{n_images}"' in dom and "<div class=\"missing\">" in dom


def test_report_shows_paired_differences_with_the_reference_run(demo_run, tmp_path):
    """``--reference PatchCore=RUN``: ModMap − PatchCore on the same instances, with paired intervals, for
    I-AUROC, V-AUPRO@1 % and the object-pixel AUROC (both runs saved their maps at the view's pixels)."""
    ref = tmp_path / "patchcore"
    assert detect_main(["--data", str(demo_run["data"]), "--ckpt", str(demo_run["ckpt"]), "--image-encoder", "auto",
                        "--image-encoder-weights", str(demo_run["image_enc"]), "--image-size", "56",
                        "--method", "patchcore", "--no-progress", "--save-maps", "orig", "--out", str(ref)]) == 0
    html_path = tmp_path / "index.html"
    assert report_main(["--run", str(demo_run["detect"]), "--out", str(html_path),
                        "--reference", f"PatchCore={ref}"]) == 0
    text = html_path.read_text()
    ET.fromstring(text.split("\n", 1)[1])  # still well-formed
    for metric in ("I-AUROC", "V-AUPRO@1%", "O-P-AUROC"):
        row = re.search(rf"<td class=\"text\">Δ {re.escape(metric)}</td><td>([^<]*)</td>", text)
        assert row, metric
        value, low, high = (float(x) for x in re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]",
                                                        row.group(1)).groups())
        assert low <= value <= high
    a = json.loads((demo_run["detect"] / "results.json").read_text())["results"]["real2real"]["vase"]
    b = json.loads((ref / "results.json").read_text())["results"]["real2real"]["vase"]
    row = re.search(r"Δ I-AUROC</td><td>([+-][\d.]+)", text)
    assert float(row.group(1)) == pytest.approx(a["image_auroc"] - b["image_auroc"], abs=1e-3)
    row = re.search(r"Δ O-P-AUROC</td><td>([+-][\d.]+)", text)
    assert float(row.group(1)) == pytest.approx(a["object_pixel_auroc"] - b["object_pixel_auroc"], abs=1e-3)

    # results.md/json: the mean over classes carries the interval of the classes' replicates — the same
    # one compare_runs computes from the run's files (each class resampled under its own seed)
    from detect.config import DetectConfig
    from detect.pipeline.compare import compare_runs, run_evidence
    from shared.config import load_config

    cfg = load_config(DetectConfig, ref / "config.yaml")
    expected = compare_runs(run_evidence(cfg, ref, "real2real", ["vase"]), None, seed=cfg.seed)
    class_mean = json.loads((ref / "results.json").read_text())["class_mean"]["real2real"]
    for metric, key in (("I-AUROC", "image_auroc"), ("V-AUPRO@1%", "voxel_aupro@0.01"),
                        ("O-P-AUROC", "object_pixel_auroc")):
        want = expected[metric]["mean"]
        assert class_mean[key]["value"] == pytest.approx(want.value)
        assert (class_mean[key]["low"], class_mean[key]["high"]) == pytest.approx((want.low, want.high), nan_ok=True)
    per_class = json.loads((ref / "results.json").read_text())["results"]["real2real"]["vase"]
    for metric, ci in (("I-AUROC", per_class["image_auroc_ci"]), ("V-AUPRO@1%", per_class["voxel_aupro_ci"]["0.01"])):
        # the class's own interval comes from the same replicates (one bootstrap per class and metric)
        want = expected[metric]["vase"]
        assert (ci["low"], ci["high"]) == pytest.approx((want.low, want.high), nan_ok=True), metric
    mean_cells = [line.rsplit("|", 2)[1] for line in (ref / "results.md").read_text().splitlines()
                  if line.startswith("| real2real |")]
    assert len(mean_cells) == 3 and all("[" in cell for cell in mean_cells), mean_cells

    # the reference's own pictures under its table (--reference-figures)
    figs = tmp_path / "figures_patchcore"
    assert figures_main(["--data", str(demo_run["data"]), "--detect", str(ref), "--out", str(figs)]) == 0
    assert report_main(["--run", str(demo_run["detect"]), "--out", str(html_path), "--reference", f"PatchCore={ref}",
                        "--reference-figures", f"PatchCore={figs}"]) == 0
    text = html_path.read_text()
    ET.fromstring(text.split("\n", 1)[1])
    pictures = text.split("PatchCore: pictures", 1)
    assert len(pictures) == 2 and "figures_patchcore/maps_vase.png" in pictures[1]
    assert report_main(["--run", str(demo_run["detect"]), "--out", str(html_path), "--reference", f"PatchCore={ref}",
                        "--reference-figures", f"CFM={figs}"]) != 0  # no such reference
