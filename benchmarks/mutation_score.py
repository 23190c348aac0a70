"""The mutation score of the last `mutmut run` (`make mutation`), per module, as a Markdown table.

Reads `mutmut results --all true` (one line per mutant: ``<module>.<function>__mutmut_<n>:
<status>``) and prints, per mutated module, how many mutants were killed, survived, timed out,
were suspicious or had no test, the score ``killed / total`` and the surviving mutants' names
(``mutmut show <name>`` prints the change). Run from the repository root.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

COLUMNS = ("killed", "survived", "timeout", "suspicious", "no tests")
_LINE = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+)$")
_MODULE = re.compile(r"^(?P<module>.+?)\.x(?:_|ǁ)")


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], check=True, capture_output=True, text=True
    ).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in out.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        name, status = match["name"], match["status"].strip()
        module = _MODULE.match(name)
        key = module["module"] if module else name
        counts[key][status] += 1
        if status == "survived":
            survivors[key].append(name)
    if not counts:
        print("no mutation results: run `make mutation` first", file=sys.stderr)
        return 1
    total = Counter()
    print("| module | " + " | ".join(COLUMNS) + " | other | total | score |")
    print("|---" * (len(COLUMNS) + 4) + "|")
    for module in sorted(counts):
        row = counts[module]
        total += row
        print(_row(module, row))
    print(_row("**all**", total))
    for module in sorted(survivors):
        print(
            f"\nsurvived in {module}: " + ", ".join(n.rsplit(".", 1)[-1] for n in survivors[module])
        )
    return 0


def _row(label: str, row: Counter) -> str:
    n = sum(row.values())
    other = n - sum(row[c] for c in COLUMNS)
    score = f"{100 * row['killed'] / n:.1f}%" if n else "-"
    return (
        f"| {label} | " + " | ".join(str(row[c]) for c in COLUMNS) + f" | {other} | {n} | {score} |"
    )


if __name__ == "__main__":
    sys.exit(main())
