"""Data flows one way (raw files → shards → pretrain → checkpoint → detect): a stage imports only
`shared` and the stages upstream of it, so each hand-over is a file format, not a code dependency.

Inside detect/ the imports point down a fixed stack of layers: entry scripts → `experiments/` → `pipeline/`
→ `config.py` → the library. (../shared/design/layout.md sketches config above experiments; but the studies
and the orchestration read `DetectConfig`, so it sits under them, and above the library, which never sees
it.) Nothing imports an entry script, the library never sees the command-line config, no module imports another's underscore-private name, and no import circle
exists anywhere (imports inside functions count: they only postpone a circle to run time)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("shared", "data_prep", "pretrain", "detect")
# what each package may import besides itself
ALLOWED = {
    "shared": set(),
    "data_prep": {"shared"},
    "pretrain": {"shared", "data_prep"},  # reads the shard format data_prep defines
    "detect": {"shared"},  # the encoder export is read by shared.encoder_export, not pretrain
}

# detect/'s layers, top to bottom: a module imports detect modules of its own layer or below only.
DETECT_LAYERS = ("entry", "experiments", "pipeline", "config", "library")
DETECT_ENTRY = {"detect.run", "detect.ablate", "detect.single_view_report", "detect.demo_figures", "detect.report",
                "detect.gt_projection_check", "detect.data.preview", "detect.maxima_check"}
# `python detect/run.py ablate ...` is `python detect/ablate.py ...`: the one entry that hands over to another
ENTRY_HANDOVER = {("detect.run", "detect.ablate")}


# -- the import graph ------------------------------------------------------------------------------
def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every absolute import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, alias.name) for alias in node.names]
    return out


def import_graph(root: Path = REPO, packages: tuple[str, ...] = STAGES) -> dict[str, set[str]]:
    """Module → the project modules it imports (``from pkg import mod`` points at ``pkg.mod``)."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for module, imported in imported_names(path):
            if imported is not None and f"{module}.{imported}" in files:
                targets.add(f"{module}.{imported}")
            elif module in files:
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def detect_layer(module: str) -> str:
    if module in DETECT_ENTRY:
        return "entry"
    if module == "detect.config":
        return "config"
    if module.startswith("detect.experiments"):
        return "experiments"
    if module.startswith("detect.pipeline"):
        return "pipeline"
    return "library"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(DETECT_LAYERS)}
    bad = []
    for src, targets in sorted(graph.items()):
        if not src.startswith("detect"):
            continue
        for dst in sorted(t for t in targets if t.startswith("detect")):
            if dst == "detect" or (src, dst) in ENTRY_HANDOVER:
                continue
            ls, ld = detect_layer(src), detect_layer(dst)
            if ld == "entry" or rank[ld] < rank[ls]:
                bad.append(f"{src} ({ls}) imports {dst} ({ld})")
    return bad


# -- the tests -------------------------------------------------------------------------------------
def _imported_stages(path: Path) -> set[str]:
    return {module.split(".")[0] for module, _ in imported_names(path)} & set(STAGES)


@pytest.mark.parametrize("package", STAGES)
def test_stages_import_only_upstream(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for stage in _imported_stages(path) - {package} - ALLOWED[package]:
            bad.append(f"{rel} imports {stage}")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_detect_layers_point_down():
    bad = layer_violations(import_graph())
    assert not bad, "\n".join(bad)


def test_entry_scripts_exist():  # a renamed entry script must not silently become "library"
    for module in DETECT_ENTRY:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module


def test_no_private_name_crosses_modules():
    bad = []
    for pkg in STAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            me = module_name(path)
            for module, imported in imported_names(path):
                if module.split(".")[0] in STAGES and module != me and imported and imported.startswith("_") \
                        and not imported.startswith("__"):
                    bad.append(f"{me} imports {module}.{imported}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from pretrain.export import load_dinodepth\n")
    assert _imported_stages(f) == {"pretrain"}


def test_the_checker_sees_a_circle(tmp_path):
    """A circle closed by an import inside a function (the kind that survives unnoticed at import time)."""
    pkg = tmp_path / "detect"
    (pkg / "pipeline").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline" / "__init__.py").write_text("")
    (pkg / "run.py").write_text("from detect.pipeline import multiview\n")
    (pkg / "pipeline" / "multiview.py").write_text("def f():\n    from detect.run import main\n")
    (pkg / "fit.py").write_text("import detect.infer\n")
    (pkg / "infer.py").write_text("X = 1\n")
    graph = import_graph(tmp_path, ("detect",))
    assert graph["detect.run"] == {"detect.pipeline.multiview"}
    assert find_cycles(graph) == [["detect.pipeline.multiview", "detect.run"]]
    assert layer_violations(graph) == ["detect.pipeline.multiview (pipeline) imports detect.run (entry)"]
    (pkg / "pipeline" / "multiview.py").write_text("from detect import fit\n")
    graph = import_graph(tmp_path, ("detect",))
    assert find_cycles(graph) == [] and layer_violations(graph) == []
    (pkg / "infer.py").write_text("from detect.pipeline.multiview import f\n")  # library → pipeline: up
    graph = import_graph(tmp_path, ("detect",))
    assert layer_violations(graph) == ["detect.infer (library) imports detect.pipeline.multiview (pipeline)"]
    assert find_cycles(graph) == [["detect.fit", "detect.infer", "detect.pipeline.multiview"]]
