"""The core and framework=torch never import mmengine, mmdet, fastNLP, nnU-Net, Lightning, Accelerate or transformers.

Tripwire packages with those names are put first on the path, so an accidental import would succeed
and be recorded (in an environment without the frameworks, a plain sys.modules check could never fail).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ENV, TRAIN

HEAVY = ("mmengine", "mmdet", "mmcv", "fastNLP", "nnunetv2", "lightning", "accelerate", "transformers")


@pytest.fixture
def tripwires(tmp_path):
    log = tmp_path / "imported.txt"
    log.write_text("")
    for name in HEAVY:
        (tmp_path / "wires" / name).mkdir(parents=True)
        (tmp_path / "wires" / name / "__init__.py").write_text(f"open({str(log)!r}, 'a').write('{name}\\n')\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'wires'}:{ENV['PYTHONPATH']}"}
    return env, log


def _run(args, env, cwd):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)


def test_the_tripwires_work(tripwires, tmp_path):
    env, log = tripwires
    _run([sys.executable, "-c", "import mmengine, fastNLP"], env, tmp_path)
    assert log.read_text().split() == ["mmengine", "fastNLP"]


def test_package_compose_and_explain_import_no_framework(tripwires, tmp_path):
    env, log = tripwires
    code = (
        "import adapters, adapters.cli, adapters.launch, adapters.worker; "
        "from adapters.config import compose, validate; "
        "validate(compose(['framework=torch', 'ddp=safe'])); "
        "print(adapters.cli.explain(['framework=torch', 'ddp=safe']))"
    )
    proc = _run([sys.executable, "-c", code], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run([sys.executable, "-m", "adapters", "explain", "framework=torch", "ddp=safe"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == ""


@pytest.mark.slow
def test_a_torch_training_run_imports_no_framework(tripwires, tmp_path):
    env, log = tripwires
    proc = _run([sys.executable, str(TRAIN), "framework.steps=2", "framework.log_every=1"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == ""


def _import_graph() -> dict[str, set[str]]:
    """Which of the package's modules each module imports, at the top or inside a function."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for path in (root / "adapters").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                named = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t for t in named if t in files] or [base]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])

    for start in sorted(graph):
        visit(start, [])
    return found


def test_the_package_has_no_import_cycles():
    """Counting imports inside functions too: a cycle hidden there is still a cycle."""
    graph = _import_graph()
    assert "adapters.presets" in graph["adapters.config"]  # the walk sees function-level and relative imports
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
