#!/usr/bin/env bash
# The smoke grid through a real SLURM cluster (snakemake-executor-plugin-slurm), then the same grid locally,
# and a comparison of the two summary.csv files (every column, values compared as written: identical
# metrics, BOPs and statuses are required).
#
#   bash workflow/scripts/slurm_smoke.sh [WORKDIR]        # default WORKDIR: a new /tmp/rex-slurm-smoke.XXXXXX
#
# Starts the local one-node cluster (workflow/scripts/slurm_local.sh) when `sinfo` does not answer. Results:
# WORKDIR/slurm and WORKDIR/local (each a complete results folder), logs WORKDIR/{slurm,local}.log, and
# WORKDIR/verdict.json. Exit status 0 only when both runs succeeded and the tables are identical.
#
# Settings the local cluster needs on top of workflow/profiles/slurm:
#   --slurm-status-command squeue   accounting is off (no slurmdbd), so sacct knows no jobs; squeue is reliable
#                                   because slurm_local.sh sets MinJobAge=3600
#   --slurm-no-account              no accounts without accounting
#   --set-threads quantize_evaluate*=J train_model=T  J, T = the grid's job_threads / train_threads, as in the
#                                   local run: the profile's 4 threads per job would not fit a 2-CPU node, and
#                                   training with another thread count gives another model (float reductions
#                                   are summed in another order), so the tables could not be compared
#   --slurm-init-seconds-before-status-checks 2      small jobs: poll early (default 40 s)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
WORK=${1:-$(mktemp -d /tmp/rex-slurm-smoke.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
GRID=${GRID:-conf/grid/smoke.yaml}
CORES=${CORES:-2}

read -r JT TT < <("$PY" - "$GRID" <<'PY'
import sys, yaml
d = yaml.safe_load(open("conf/grid/default.yaml"))
d.update(yaml.safe_load(open(sys.argv[1])))
print(d.get("job_threads", 1), d.get("train_threads", 2))
PY
)

if ! sinfo -h >/dev/null 2>&1; then
  bash workflow/scripts/slurm_local.sh start
fi
sinfo

echo "== SLURM run -> $WORK/slurm"
t0=$(date +%s)
set +e
"$PY" -m snakemake --profile workflow/profiles/slurm --configfile "$GRID" \
  --config results_dir="$WORK/slurm" \
  --slurm-status-command squeue --slurm-no-account --slurm-init-seconds-before-status-checks 2 \
  --seconds-between-status-checks 2 --set-threads quantize_evaluate="$JT" quantize_evaluate_budget="$JT" quantize_evaluate_alloc="$JT" train_model="$TT" --jobs 4 \
  --latency-wait 30 --retries 0 >"$WORK/slurm.log" 2>&1
rc_slurm=$?
set -e
t1=$(date +%s)
ids=$(grep -oE "SLURM jobid [0-9]+" "$WORK/slurm.log" | awk '{print $3}' | sort -n | uniq | paste -sd, - || true)
echo "snakemake exit $rc_slurm after $((t1 - t0)) s (threads: jobs $JT, training $TT); SLURM job ids: ${ids:-none}"
if [ -n "$ids" ]; then
  squeue -h --states=all -j "$ids" -o "%.8i %.24j %.10T %.8M %N" 2>/dev/null || true
fi
tail -3 "$WORK/slurm.log"

echo "== local run -> $WORK/local"
set +e
"$PY" -m snakemake --cores "$CORES" --configfile "$GRID" --config results_dir="$WORK/local" \
  >"$WORK/local.log" 2>&1
rc_local=$?
set -e
t2=$(date +%s)
echo "snakemake exit $rc_local after $((t2 - t1)) s"
tail -3 "$WORK/local.log"

"$PY" - "$WORK" "$rc_slurm" "$rc_local" "$((t1 - t0))" "$((t2 - t1))" "$ids" <<'PY'
import csv, json, sys
from pathlib import Path

work, rc_s, rc_l, sec_s, sec_l, ids = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), [i for i in sys.argv[6].split(",") if i]

def rows(p):
    if not p.is_file():
        return None
    with open(p) as f:
        return list(csv.DictReader(f))

s, l = rows(work / "slurm" / "summary.csv"), rows(work / "local" / "summary.csv")
identical = s is not None and l is not None and len(s) > 0 and s == l
diff = []
if s is not None and l is not None and not identical:
    key = lambda r: tuple(r[c] for c in ("task", "model", "method", "wbits", "abits", "order", "budget", "metric"))
    ls = {key(r): r for r in l}
    diff = [(key(r), r.get("value"), (ls.get(key(r)) or {}).get("value")) for r in s if ls.get(key(r)) != r][:10]
verdict = dict(slurm_exit=rc_s, local_exit=rc_l, slurm_seconds=sec_s, local_seconds=sec_l, slurm_jobs=len(ids),
               slurm_job_ids=ids, summary_rows=len(s or []), identical=identical, differences=diff,
               failed_rows=sum(r["status"] != "ok" for r in (s or [])))
(work / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
print(json.dumps(verdict))
print(f"summary.csv SLURM vs local: {'IDENTICAL' if identical else 'DIFFERENT'} ({len(s or [])} rows, "
      f"{len(ids)} SLURM jobs, {sec_s} s on SLURM, {sec_l} s locally)")
sys.exit(0 if identical and rc_s == 0 and rc_l == 0 and ids else 1)
PY
