"""Static HTML report of a detection run: results table, pictures, 3D outputs (``make demo``, issue 11).

One self-contained ``index.html`` (no server, no external resources; pictures and files are linked by
relative paths, so the output folder can be moved or zipped as a whole). Its inputs:

* ``--run``: the ``--out`` folder of ``detect/run.py`` (``results.csv``, ``results.json``, ``config.yaml``);
* ``--figures``: the folder written by ``detect/demo_figures.py`` (its ``figures.json`` manifest lists the
  pictures and the dense volume exports); optional;
* ``--timings``: a tab-separated log ``stage<TAB>wall_s<TAB>user_s<TAB>sys_s`` (one line per stage run;
  the last line of each stage counts), as ``make demo`` writes it; optional;
* ``--link LABEL=PATH``: more files to list (encoders, shards manifest, ...);
* ``--reference LABEL=RUN``: another run on the same data (e.g. ``--method patchcore``) whose table is shown
  next to the main one, so that a reader sees what the same 3D pipeline gives with a plain scorer.

The page is polyglot markup (well-formed XML as well as HTML5), so a plain XML parser can check it; a
small inline script marks ``<body data-images-loaded="ok/total">`` after loading and shows a banner if
a picture is missing.

Usage::

    python detect/report.py --run runs/demo/detect --figures runs/demo/figures --out runs/demo/index.html
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from detect.pipeline.report_html import ReportError, build_report
from shared.cli import ArgumentParser, fail, label_path, run_main


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python detect/report.py",
                        description="Static index.html report of a detect/run.py run (table, pictures, "
                                    "3D outputs); open it in any browser, no server needed.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", required=True, help="the --out folder of detect/run.py")
    ap.add_argument("--out", required=True, help="the HTML file to write (links are relative to its folder)")
    ap.add_argument("--figures", default=None, help="folder of detect/demo_figures.py (with figures.json)")
    ap.add_argument("--timings", default=None, help="stage timings log (stage, wall, user, sys; tab-separated)")
    ap.add_argument("--link", action="append", type=label_path, default=[], metavar="LABEL=PATH",
                    help="another file to list under Files (repeatable)")
    ap.add_argument("--title", default="DINO-Depth + ModMap: demo report", help="page title")
    ap.add_argument("--reference", action="append", type=label_path, default=[], metavar="LABEL=RUN",
                    help="another detect/run.py output folder on the same data shown as a reference table "
                         "(e.g. PatchCore=runs/demo/patchcore; repeatable)")
    ap.add_argument("--reference-figures", action="append", type=label_path, default=[], metavar="LABEL=DIR",
                    help="the detect/demo_figures.py folder of the reference LABEL: its pictures go under its "
                         "table (repeatable)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = build_report(args.run, args.out, args.figures, args.timings, args.link, args.title, args.reference,
                            args.reference_figures)
    except (ReportError, OSError, ValueError) as exc:
        return fail(exc)
    print(f"wrote {path} (open it in a browser: file://{Path(path).resolve()})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
