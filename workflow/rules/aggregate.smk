# Job folders -> summary.csv (task, model, method, wbits, abits, order, budget, bops, metric, value, status) and
# jobs.csv (one row per job); and MLflow, a view of the job folders: one small local rule per job logs its
# folder as one run (found again by its config_hash tag, so re-logging updates instead of duplicating) and
# leaves a marker. Parallel loggers serialise on a file lock with retries (rex.pipeline.tracking). Deleting
# the MLflow store does not re-run anything: `python -m rex.pipeline.tracking sync <job folders>` refills it.


rule aggregate:
    input:
        done_markers(),
    output:
        summary=f"{R}/summary.csv",
        jobs=f"{R}/jobs.csv",
    benchmark:
        f"{R}/benchmarks/aggregate.tsv",
    log:
        f"{R}/logs/aggregate.log",
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m rex.pipeline.aggregate --summary {output.summary:q} --jobs {output.jobs:q} {input:q} > {log:q} 2>&1"


rule mlflow_log:
    input:
        done=f"{R}/runs/{{task}}/{{model}}/{{label}}/done",
    output:
        f"{R}/mlflow/{{task}}/{{model}}/{{label}}.json",
    benchmark:
        f"{R}/benchmarks/mlflow/{{task}}/{{model}}/{{label}}.tsv",
    log:
        f"{R}/logs/mlflow/{{task}}/{{model}}/{{label}}.log",
    params:
        uri=TRACKING_URI,
        grid_name=GRID_NAME,
    localrule: True
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m rex.pipeline.tracking log --tracking-uri {params.uri:q} --grid {params.grid_name:q} "
        "--out {output:q} {input.done:q} > {log:q} 2>&1"
