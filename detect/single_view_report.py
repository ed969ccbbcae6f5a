"""Single-view comparison with one command: ModMap/CFM vs CMDR-style fusion vs each single-modality mode.

    python detect/single_view_report.py --data data/synthetic --dataset sim3d_single \\
        --config configs/detect/tiny_cpu.yaml --depth-encoder dinov2_on_depth --out runs/single_view \\
        --report docs/results/single_view.md
    python detect/single_view_report.py --methods modmap,cmdr --dataset mvtec3d --data MVTEC3D_ROOT \\
        --ckpt dinodepth.pth --image-encoder-weights dinov2_vitb14_reg4_pretrain.pth --image-norm imagenet ...

Every option other than ``--methods``/``--report``/``--no-reuse`` is a ``detect/run.py`` option and applies
to every method; each method adds its scoring overrides (:data:`METHODS`) and runs through the normal
single-view code path (:func:`detect.pipeline.single_view.run_single_view`) into ``<out>/<method>/``, all of them
sharing one token cache (``<out>/features``). A method whose ``results.json`` sits next to an
identical ``config.yaml`` is reused. Writes ``<out>/report.md`` (and ``--report PATH``): the command,
the data, the encoders, one table (I-AUROC, P-AUROC, AUPRO@30 %, AUPRO@1 % per class + mean for every
method) and the run times — every number comes from the runs.
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import shlex
import sys

from detect.config import parse_config
from detect.experiments.single_view_comparison import METHODS
from shared.cli import fail, run_main
from shared.config import ConfigError

OWN_FLAGS = ("--methods", "--report", "--no-reuse")


def _split_args(argv: list[str]) -> tuple[dict, list[str]]:
    own: dict = {"methods": list(METHODS), "report": None, "reuse": True}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, _, val = a.partition("=")
        if key in ("--methods", "--report"):
            if not val:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{key} needs a value")
                val = argv[i + 1]
                i += 1
            if key == "--methods":
                own["methods"] = [m.strip() for m in val.split(",") if m.strip()]
            else:
                own["report"] = val
        elif a == "--no-reuse":
            own["reuse"] = False
        elif a in ("-h", "--help"):
            print(__doc__)
            print("methods:", ", ".join(f"{k} ({' '.join(v)})" for k, v in METHODS.items()))
            print("\nother options: see python detect/run.py --help")
            raise SystemExit(0)
        else:
            rest.append(a)
        i += 1
    unknown = [m for m in own["methods"] if m not in METHODS]
    if unknown or not own["methods"]:
        raise ConfigError(f"unknown methods {unknown}; available: {list(METHODS)}")
    return own, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        own, rest = _split_args(argv)
        base = parse_config(rest)
    except ConfigError as exc:
        return fail(exc)
    from detect.experiments.single_view_comparison import compare_methods  # torch: after --help
    from detect.pipeline.base import RunError

    command = "python detect/single_view_report.py " + " ".join(shlex.quote(a) for a in argv)
    try:
        text = compare_methods(base, own["methods"], command, own["reuse"], own["report"])
    except (RunError, ConfigError) as exc:
        return fail(exc)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
