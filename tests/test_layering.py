"""Data flows one way (raw files → shards → pretrain → checkpoint → detect): a stage imports only
`shared` and the stages upstream of it, so each hand-over is a file format, not a code dependency."""

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
# inspect_shards shows what the pretraining loader will see, through the loader's own reader
EXCEPTIONS = {("data_prep/inspect_shards.py", "pretrain")}


def _imported_stages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(STAGES)


@pytest.mark.parametrize("package", STAGES)
def test_stages_import_only_upstream(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for stage in _imported_stages(path) - {package} - ALLOWED[package]:
            if (rel, stage) not in EXCEPTIONS:
                bad.append(f"{rel} imports {stage}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from pretrain.export import load_dinodepth\n")
    assert _imported_stages(f) == {"pretrain"}
