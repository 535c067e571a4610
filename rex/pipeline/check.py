"""Accuracy floors of a grid (its ``checks:`` list), checked against ``summary.csv``.

A grid that exists to check the pipeline (``conf/grid/smoke.yaml``) names the numbers a working
implementation must reach; this step fails the Snakemake run when one is missed, so a collapse (a broken
quantizer, a wrong preprocessing, an untrained model) cannot pass as a result. Torch-free.

    python -m rex.pipeline.check --summary results/summary.csv --checks '<json list>' --out results/checks.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Optional

from .. import protocols
from ..io import atomic_write_json

KEYS = ("model", "method", "wbits", "abits", "order", "budget", "metric")


def _same(row_value: str, want) -> bool:
    if want is None or want == "":
        return row_value in ("", "None")
    try:
        return float(row_value) == float(want)
    except ValueError:
        return str(row_value) == str(want)


def find_row(rows: list[dict], check: dict) -> Optional[dict]:
    """The summary row a check names (budget and order default to dense order 1 / no budget)."""
    want = {"order": 1, "budget": None, **check}
    preset = want.get("preset") or protocols.DEFAULT_PRESET  # a check names the shared protocol's row unless it says otherwise
    for r in rows:
        if r.get("preset") not in (None, "", preset):  # FP32 rows and rows from before presets have none
            continue
        if all(_same(r[k], want.get(k)) for k in KEYS):
            return r
    return None


def evaluate(rows: list[dict], checks: list[dict]) -> list[dict]:
    """One result per check: the measured value, the floor, and whether it holds (a missing or failed row
    never holds)."""
    out = []
    for c in checks:
        r = find_row(rows, c)
        value = None if r is None or r["status"] != "ok" or r["value"] == "" else float(r["value"])
        ok = value is not None and value >= float(c["min"])
        problem = ("no such row in summary.csv" if r is None else
                   f"the job {r['status']}" if value is None else
                   "" if ok else f"{value:g} < floor {float(c['min']):g}")
        out.append({**c, "value": value, "ok": ok, "problem": problem})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rex.pipeline.check", description=__doc__.splitlines()[0])
    ap.add_argument("--summary", required=True)
    ap.add_argument("--checks", required=True, help="the grid's checks list, as JSON")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    with open(a.summary, newline="") as f:
        rows = list(csv.DictReader(f))
    results = evaluate(rows, json.loads(a.checks))
    for r in results:
        name = ",".join(f"{k}={r.get(k)}" for k in KEYS if r.get(k) not in (None, ""))
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {name}: {r['value']} (floor {r['min']}; {r.get('why', '')})"
              + (f" -- {r['problem']}" if r["problem"] else ""))
    bad = [r for r in results if not r["ok"]]
    if bad:
        print(f"{len(bad)} of {len(results)} accuracy floors missed: the pipeline's numbers are not trustworthy "
              f"(see {a.summary}).", file=sys.stderr)
        return 1
    atomic_write_json(Path(a.out), {"checks": results}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
