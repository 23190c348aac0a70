"""The layers import one way: a back-edge or an import cycle fails here (an AST scan).

* ``persona_gym`` (the runtime library) never imports ``training`` or ``agents``; only its
  composition root, ``persona_gym/cli.py``, names them (as command modules).
* ``agents`` never imports ``training``.
* Inside ``persona_gym``, the first-level parts (``artifacts``, ``envs``, ``evaluation``, ...)
  import each other without cycles. Imports under ``if TYPE_CHECKING:`` are not counted: they
  never run.
* The user model's package, ``persona_gym.simulator``, spans ``artifacts``: the pieces an
  artifacts directory is made of (the collaborative model, the prompt settings, the adapter
  names) sit below ``persona_gym.artifacts``, the raters that load such a directory above it. So
  its modules (and ``simulator.engine``) are parts of their own, and its ``__init__.py`` imports
  nothing: importing one of its modules never runs another.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"persona_gym": {"training", "agents"}, "agents": {"training"}}
COMPOSITION_ROOT = "persona_gym/cli.py"
# packages whose modules are parts of their own (their ``__init__.py`` imports nothing)
SPLIT = ("persona_gym.simulator",)


def _module(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in a file, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:  # ``from pkg import module`` imports pkg.module
                sub = root.joinpath(*base.split("."), alias.name)
                is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                found.append((node.lineno, f"{base}.{alias.name}" if is_module else base))
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def back_edges() -> list[str]:
    """Every import that runs against the layers, as ``file:line imports module``."""
    out = []
    for package, forbidden in FORBIDDEN.items():
        for path in _files(package):
            rel = path.relative_to(ROOT).as_posix()
            if rel == COMPOSITION_ROOT:
                continue
            out += [
                f"{rel}:{line} imports {name}"
                for line, name in _imports(path)
                if name.split(".")[0] in forbidden
            ]
    return out


def _part(module: str) -> str:
    """The part a module belongs to: its first-level package, or in a package of
    :data:`SPLIT` the module (or subpackage) itself."""
    parts = module.split(".")
    return ".".join(parts[: 3 if ".".join(parts[:2]) in SPLIT else 2])


def part_graph() -> dict[str, set[str]]:
    """``persona_gym``'s first-level parts and the parts each imports (the package root and the
    composition root left out: they name everything)."""
    graph: dict[str, set[str]] = {}
    for path in _files("persona_gym"):
        module = _module(path)
        if module in ("persona_gym", "persona_gym.cli"):
            continue
        source = _part(module)
        graph.setdefault(source, set())
        for _, name in _imports(path):
            target = _part(name)
            if name.startswith("persona_gym.") and target not in (source, "persona_gym.cli"):
                graph[source].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_back_edges():
    edges = back_edges()
    assert not edges, "imports that run against the layers:\n" + "\n".join(edges)


def test_no_import_cycles_between_the_parts_of_persona_gym():
    found = cycles(part_graph())
    assert not found, f"import cycles between parts of persona_gym: {found}"


def test_split_packages_import_nothing_from_their_init():
    """A package whose modules are parts of their own must not tie them together on import."""
    for package in SPLIT:
        init = ROOT.joinpath(*package.split("."), "__init__.py")
        assert [name for _, name in _imports(init) if name.startswith("persona_gym")] == [], init


def test_the_scan_sees_a_back_edge_and_a_cycle(tmp_path):
    """The checks fail when they should (a planted back-edge, a planted cycle)."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from typing import TYPE_CHECKING\nimport training.train\n"
        "if TYPE_CHECKING:\n    import agents.train\n"
    )
    assert [name for _, name in _imports(planted, tmp_path)] == ["typing", "training.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert _part("persona_gym.envs.core") == "persona_gym.envs"
    assert _part("persona_gym.simulator.engine.layers") == "persona_gym.simulator.engine"
