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
* No module of ``persona_gym``, ``agents``, ``training`` or ``benchmarks`` imports a private
  name (``_name``, or a ``_module``) of the project's packages, ``TYPE_CHECKING`` imports
  included: a helper another module needs is public (documented) or lives where it is used.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"persona_gym": {"training", "agents"}, "agents": {"training"}}
COMPOSITION_ROOT = "persona_gym/cli.py"
# packages whose modules are parts of their own (their ``__init__.py`` imports nothing)
SPLIT = ("persona_gym.simulator",)
# the project's packages: whose private names no other module imports, and whose modules are scanned
PROJECT = ("persona_gym", "agents", "training", "benchmarks", "envs_config")
SCANNED = ("persona_gym", "agents", "training", "benchmarks")


def _module(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: Path, root: Path) -> str:
    """The package relative imports of a file start from."""
    module = _module(path, root)
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of a ``from ... import``."""
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    return base


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in a file, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package(path, root)
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
            base = _from_base(node, package)
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


def private_imports(root: Path = ROOT) -> list[str]:
    """Every import of a private name of the project (a ``_name`` or a ``_module`` anywhere in
    the imported path; dunders are not private), ``TYPE_CHECKING`` imports included, as
    ``file:line imports module.name``. Aliases do not matter: the imported name does."""
    out = []
    for package in SCANNED:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [(node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = _from_base(node, _package(path, root))
                    names = [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
                else:
                    continue
                out += [
                    f"{rel}:{line} imports {name}"
                    for line, name in names
                    if name.split(".")[0] in PROJECT
                    and any(p.startswith("_") and not p.startswith("__") for p in name.split("."))
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


def test_no_module_imports_a_private_name_of_another():
    found = private_imports()
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_scan_sees_a_private_import(tmp_path):
    """A private name is caught however it is imported; a public one under a private alias,
    a dunder and a library's private module are not the project's business."""
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "planted.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from training.examples import frozen_pass as _frozen_pass, _chunks\n"
        "from persona_gym import _hidden\n"
        "import training._internal.tools\n"
        "from ._helpers import helper\n"
        "from torch._C import Tensor\n"
        "if TYPE_CHECKING:\n"
        "    from training.evaluate import _Models\n"
    )
    assert private_imports(tmp_path) == [
        "agents/planted.py:3 imports training.examples._chunks",
        "agents/planted.py:4 imports persona_gym._hidden",
        "agents/planted.py:5 imports training._internal.tools",
        "agents/planted.py:6 imports agents._helpers.helper",
        "agents/planted.py:9 imports training.evaluate._Models",
    ]


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
