"""The benchmark command writes its JSON and CSV files, every configuration measured in the same run."""
import csv
import json
import subprocess
import sys

import pytest

from rex.paths import PROJECT_ROOT


@pytest.mark.slow
def test_bench_command_writes_json_and_csv(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "rex", "bench", "--models", "mobilenet_v2", "--limit", "8",
                        "--batch-size", "4", "--threads", "1", "--only", "fake W4A8 K=2,int W8A8,processes",
                        "--out", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    rows = {row["config"]: row for row in d["rows"]}
    assert set(rows) == {"fp32", "fake W4A8 K=2", "int W8A8 K=1", "ensemble W4A8 K=3 (members in processes)"}
    assert all(row["status"] == "ok" and row["n"] == 8 for row in rows.values()), rows
    assert rows["fp32"]["eval_time_vs_fp32"] == 1.0 and rows["fp32"]["bops"] > rows["fake W4A8 K=2"]["bops"]
    for row in rows.values():
        assert row["eval_seconds"] > 0 and row["peak_rss_mb"] > 0 and 0 <= row["top1"] <= 100
    assert d["meta"]["threads"] == 1 and d["meta"]["limit"] == 8
    with open(out.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["config"] for t in table] == [row["config"] for row in d["rows"]]
