"""Mutation score per module from mutmut's cached results (``make mutation``).

Usage: ``python benchmarks/mutation_score.py [PATTERN ...]`` in the repository root, after
``mutmut run``; PATTERNs (fnmatch, as given to ``mutmut run``) restrict the count to the
scoped mutants. Prints a Markdown table: killed / tested and the score per module, and the
surviving mutants' names (review them with ``mutmut show NAME``).
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<name>keyseg\.[\w.ǁ]+__mutmut_\d+): (?P<status>.+?)\s*$")
MODULE = re.compile(r"^(?P<module>keyseg(?:\.[a-z_0-9]+)*?)\.x[_ǁ]")
KILLED = {"killed", "timeout", "caught by type check"}


def main(patterns: list[str]) -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    listing = subprocess.run([str(mutmut), "results", "--all", "true"], check=True,
                             capture_output=True, text=True).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in listing.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        name, status = match["name"], match["status"]
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        module = MODULE.match(name)["module"]
        counts[module][status] += 1
        if status == "survived":
            survivors[module].append(name)
    print("| module | mutants | killed | survived | not run | score |")
    print("|---|---:|---:|---:|---:|---:|")
    for module in sorted(counts):
        c = counts[module]
        killed = sum(c[s] for s in KILLED)
        tested = killed + c["survived"] + c["no tests"]
        score = f"{100 * killed / tested:.1f}%" if tested else "-"
        print(f"| {module} | {sum(c.values())} | {killed} | {c['survived']} | "
              f"{c['not checked']} | {score} |")
    for module, names in sorted(survivors.items()):
        print(f"\nsurvived in {module}: " + ", ".join(n.rsplit(".", 1)[-1] for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
