# Job folders -> summary.csv (task, model, method, wbits, abits, order, budget, bops, metric, value, status) and
# jobs.csv (one row per job), and the idempotent MLflow sync (a view; it decides nothing about re-runs).


rule aggregate:
    input:
        done_markers(),
    output:
        summary=f"{R}/summary.csv",
        jobs=f"{R}/jobs.csv",
    log:
        f"{R}/logs/aggregate.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{PY} -m rex.pipeline.aggregate --summary {output.summary:q} --jobs {output.jobs:q} {input:q} > {log:q} 2>&1"


rule mlflow_sync:
    input:
        done_markers(),
    output:
        f"{R}/mlflow_sync.json",
    log:
        f"{R}/logs/mlflow_sync.log",
    params:
        uri=TRACKING_URI,
        results=R,
    resources:
        mem_mb=1500,
        runtime=30,
    shell:
        "{PY} -m rex.pipeline.tracking sync --tracking-uri {params.uri:q} --results-dir {params.results:q} "
        "--out {output:q} {input:q} > {log:q} 2>&1"
