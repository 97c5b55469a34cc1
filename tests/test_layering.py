"""The library's layering: dependencies point down, no import circles, modules a reader can hold in mind."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ssm_tread"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the ssm_tread modules it imports (anywhere in it, function bodies too), with the packages
    whose __init__ that runs, except its own ancestors (Python runs those first)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    found.add(".".join(parts[:i]))
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        graph[name] = {m for m in found if m.startswith("ssm_tread") and m not in ancestors}
    return {name: {m for m in targets if m in graph} for name, targets in graph.items()}


def test_models_import_neither_diffusion_nor_training():
    graph = imports()
    for name, targets in graph.items():
        if name.startswith("ssm_tread.models"):
            assert not {t for t in targets if t.startswith(("ssm_tread.diffusion", "ssm_tread.train"))}, name
    assert not {t for t in graph["ssm_tread.sampling"] if t.startswith("ssm_tread.train")}


def test_no_import_circles():
    graph = imports()
    state = {}

    def visit(name, path):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_circle_finder_finds_a_circle(tmp_path, monkeypatch):
    package = tmp_path / "ssm_tread"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ssm_tread.b import f\n")
    (package / "b.py").write_text("def f():\n    from ssm_tread import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", package)
    assert imports()["ssm_tread.b"] == {"ssm_tread.a"}
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circles()


def test_no_library_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long
