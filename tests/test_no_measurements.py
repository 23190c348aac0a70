"""No date-stamped measurement in the project's code, docstrings, help texts, Makefile or
pyproject.toml: measurements live in benchmarks/README.md, with their date and machine.

A line is flagged when it holds a date (``YYYY-MM-DD``) and, on it or on the line before or
after, a number with a unit of time, size, share or speed (``433 s``, ``3 min``, ``2.5x``,
``91%``, ``24 tokens/s``). The failure names every ``file:line``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATE = re.compile(r"(?<!\d)20\d\d-[01]\d-[0-3]\d(?!\d)")
# a number and its unit; the lookbehind keeps digits inside names (``bf16``, ``x86_64``) out
MEASURE = re.compile(
    r"(?<![\w.])\d[\d,]*(?:\.\d+)?\s*"
    r"(?:%|×|x(?![\w])|(?:tokens|ratings|steps|samples|env steps|GFLOP|it)/s"
    r"|(?:ms|s|sec|secs|seconds?|min|mins|minutes?|h|hr|hours?|KB|MB|GB|KiB|MiB|GiB)(?![\w/]))"
)
SKIP_DIRS = {"mutants", "build", "dist", "runs", "artifacts", "node_modules", "__pycache__"}


def project_files(root: Path = REPO) -> list[Path]:
    """The project's .py files (tracked or new, not ignored), its Makefile and pyproject.toml."""
    try:
        listed = subprocess.run(
            [
                "git",
                "ls-files",
                "-co",
                "--exclude-standard",
                "--",
                "*.py",
                "Makefile",
                "pyproject.toml",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        files = [root / name for name in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it
        files = [
            p
            for p in root.rglob("*.py")
            if not any(
                part.startswith(".") or part in SKIP_DIRS for part in p.relative_to(root).parts
            )
        ] + [root / "Makefile", root / "pyproject.toml"]
    return sorted(p for p in files if p.is_file())


def _measure_without_dates(line: str) -> bool:
    return MEASURE.search(DATE.sub(" ", line)) is not None


def dated_measurements(files: list[Path], root: Path = REPO) -> list[str]:
    """``file:line: text`` for each line with a date next to a measurement."""
    found = []
    for path in files:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        for i, line in enumerate(lines):
            if not DATE.search(line):
                continue
            near = lines[max(i - 1, 0) : i + 2]
            if any(_measure_without_dates(text) for text in near):
                name = path.relative_to(root) if path.is_relative_to(root) else path
                found.append(f"{name}:{i + 1}: {line.strip()}")
    return found


def test_no_dated_measurement_in_code_help_makefile_or_pyproject():
    found = dated_measurements(project_files())
    assert not found, (
        "date-stamped measurements belong in benchmarks/README.md, not in code, docstrings, help "
        "texts, the Makefile or pyproject.toml:\n" + "\n".join(found)
    )


def test_the_check_finds_a_planted_measurement_and_names_file_and_line(tmp_path):
    day = "20" + "26-12-01"  # built here so that this file holds no dated measurement itself
    (tmp_path / "mod.py").write_text(
        f'"""A module."""\n\nHELP = "cuts 433 of the 1,019 s of the {day} evaluation"\n'
    )
    (tmp_path / "Makefile").write_text(f"# measured {day} on 2 cores:\n# ~40 min\nall:\n\techo\n")
    (tmp_path / "pyproject.toml").write_text(f'# {day}: 24.2 tokens/s\n[project]\nname = "x"\n')
    (tmp_path / "clean.py").write_text(
        f'RELEASED = "{day}"\n\n\nTIMEOUT_S = 300  # seconds\nDTYPE = "bf16"  # x86_64\n'
    )
    found = dated_measurements(
        [tmp_path / n for n in ("mod.py", "Makefile", "pyproject.toml", "clean.py")], tmp_path
    )
    assert [f.split(": ")[0] for f in found] == ["mod.py:3", "Makefile:1", "pyproject.toml:1"]
    assert "433 of the 1,019 s" in found[0]


def test_the_project_files_include_code_makefile_and_pyproject():
    names = {p.relative_to(REPO).as_posix() for p in project_files()}
    assert {"Makefile", "pyproject.toml", "persona_gym/cli.py", "agents/evaluate.py"} <= names
    assert not any(n.startswith((".venv", "mutants/")) for n in names)


def test_no_reference_to_a_design_doc_that_is_not_in_the_repository():
    design = "DESIGN" + ".md"  # built here so that this file does not name it itself
    if (REPO / design).exists():
        return
    found = [
        f"{path.relative_to(REPO)}:{i}"
        for path in project_files()
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if design in line
    ]
    assert not found, f"references to {design}, which is not in the repository: {found}"
