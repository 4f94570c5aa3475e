"""The package layers, computed from the source: the library under ``nextgpt/`` imports nothing
from ``datamodules/`` or ``callbacks/`` (imports inside functions count), only the entry points
(``nextgpt/cli/``, and a package's ``__main__`` that hands over to it) wire the layers together,
and no modules import each other in a cycle. A new import that breaks either rule fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nextgpt", "datamodules", "callbacks")
UPPER = ("datamodules", "callbacks")  # what the library must never import


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported_names(name: str, path: Path, files: dict[str, Path]) -> set[str]:
    """Every module name an ``import`` anywhere in the file refers to (relative imports resolved).
    ``from pkg import a, b`` where both are modules names the modules only: the package's
    ``__init__`` runs before any of its modules anyway, so it is no edge of its own (else every
    package that imports its own modules would be a "cycle")."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            members = {f"{base}.{a.name}" for a in node.names}
            found.update(members)
            if not members <= set(files):
                found.add(base)
    return found


def resolve(target: str, files: dict[str, Path]) -> str:
    """The longest module prefix of an imported name (``pkg.mod.func`` -> ``pkg.mod``)."""
    while target and target not in files:
        target = target.rpartition(".")[0]
    return target


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to its longest module prefix)."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        graph[name] = {resolve(t, files) for t in imported_names(name, path, files)} - {"", name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_entry_point(name: str) -> bool:
    return name == "nextgpt.cli" or name.startswith("nextgpt.cli.") or name.endswith(".__main__")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in graph.items():
        if not name.startswith("nextgpt") or is_entry_point(name):
            continue
        for t in sorted(targets):
            if t.split(".")[0] in UPPER:
                bad.append(f"{name} imports {t}")
            elif is_entry_point(t):
                bad.append(f"{name} imports the entry point {t}")
    return bad


def test_library_never_imports_the_data_side_or_callbacks():
    graph = import_graph(module_files())
    assert any(t.startswith("datamodules.") for t in graph["nextgpt.cli.train"])  # the graph sees the wiring
    assert layer_violations(graph) == []


def test_a_main_module_only_hands_over_to_the_cli():
    """``python -m nextgpt.cache`` and friends: their ``__main__`` imports the cli and nothing upper."""
    graph = import_graph(module_files())
    for name, targets in graph.items():
        if name.endswith(".__main__") and name.startswith("nextgpt"):
            assert not {t for t in targets if t.split(".")[0] in UPPER}, name


def test_no_import_cycles():
    assert cycles(import_graph(module_files())) == []


@pytest.mark.parametrize(
    "source,expected",
    [
        (
            {"nextgpt/a.py": "def f():\n    from datamodules import b\n", "datamodules/b.py": ""},
            ["nextgpt.a imports datamodules.b"],
        ),
        ({"nextgpt/a.py": "import callbacks.c\n", "callbacks/c.py": ""}, ["nextgpt.a imports callbacks.c"]),
        (
            {
                "nextgpt/a.py": "from nextgpt.cli import t\n",
                "nextgpt/cli/t.py": "import datamodules.d\n",
                "datamodules/d.py": "",
            },
            ["nextgpt.a imports the entry point nextgpt.cli.t"],
        ),
        ({"nextgpt/cli/t.py": "import datamodules.d\n", "datamodules/d.py": ""}, []),
    ],
)
def test_the_layer_check_catches_a_lazy_upward_import(tmp_path, source, expected):
    files = {}
    for rel, text in source.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = Path(rel).with_suffix("").parts
        files[".".join(parts)] = path
    assert layer_violations(import_graph(files)) == expected


def test_the_cycle_check_catches_a_cycle_through_a_lazy_import(tmp_path):
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.c import x\n")
    (tmp_path / "c.py").write_text("import pkg.a\n")
    (tmp_path / "d.py").write_text("import pkg.a\n")
    files = {f"pkg.{n}": tmp_path / f"{n}.py" for n in "abcd"}
    files["pkg"] = tmp_path / "__init__.py"
    files["pkg"].write_text("")
    assert cycles(import_graph(files)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_package_importing_its_own_modules_is_no_cycle(tmp_path):
    """``pkg/__init__`` re-exports ``pkg.a``, and ``pkg.a`` does ``from pkg import b``: the package
    runs first either way, so this is no cycle; ``from pkg import name_in_init`` is one."""
    (tmp_path / "__init__.py").write_text("from pkg.a import f\n")
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("")
    files = {"pkg": tmp_path / "__init__.py", "pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    assert cycles(import_graph(files)) == []
    (tmp_path / "b.py").write_text("from pkg import f\n")
    assert cycles(import_graph(files)) == [["pkg", "pkg.a", "pkg.b"]]
