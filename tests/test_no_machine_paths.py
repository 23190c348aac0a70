"""Shipped and committed files carry no paths of the machine that made them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(
    r"(/root/|/home/[A-Za-z0-9_.-]+/|/Users/[A-Za-z0-9_.-]+/|/tmp/|[A-Z]:\\\\Users\\\\)"
)
TEXT = {".json", ".md", ".yaml", ".yml", ".txt", ".jsonl", ".toml", ".cfg"}


def _text_files(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT]


@pytest.mark.parametrize("folder", ["persona_gym", "envs_config", "benchmarks", "agents"])
def test_no_machine_paths(folder):
    offenders = []
    for path in _text_files(ROOT / folder):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "machine paths in committed files:\n" + "\n".join(offenders[:20])


def test_the_shipped_agent_records_no_machine_path():
    import zipfile

    for path in (ROOT / "agents" / "shipped").rglob("*.zip"):
        with zipfile.ZipFile(path) as archive:
            data = archive.read("data").decode()
        assert not MACHINE_PATH.search(data), (
            f"{path.relative_to(ROOT)}: {MACHINE_PATH.search(data).group(0)}"
        )
