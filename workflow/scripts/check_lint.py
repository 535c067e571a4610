"""`snakemake --lint`, failing on every lint except the one this venv-based project accepts.

Accepted: "Specify a conda environment or container for each rule" -- the jobs run in the project's virtual
environment (.venv, made by workflow/scripts/setup.sh, offline), which is where the software is pinned
(pyproject.toml). Any other lint fails `make lint`.

    python workflow/scripts/check_lint.py [extra snakemake args]
"""
from __future__ import annotations

import re
import subprocess
import sys

ACCEPTED = ("Specify a conda environment or container for each rule",)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint", *args], capture_output=True, text=True)
    text = r.stdout + r.stderr
    lints = re.findall(r"^    \* (.+?):?$", text, flags=re.M)
    if r.returncode != 0 and not lints:  # not a lint result: the workflow itself failed to load
        print(text, file=sys.stderr)
        return r.returncode
    other = [lint for lint in lints if not lint.startswith(ACCEPTED)]
    accepted = len(lints) - len(other)
    print(f"snakemake --lint: {len(lints)} lint(s), {accepted} accepted ({ACCEPTED[0]!r}), {len(other)} other")
    for lint in other:
        print(f"  - {lint}")
    if other:
        print(text, file=sys.stderr)
    return 1 if other else 0


if __name__ == "__main__":
    sys.exit(main())
