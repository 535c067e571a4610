# Job folders -> summary.csv (task, model, method, wbits, abits, order, budget, bops, metric, value, status) and
# jobs.csv (one row per job); and MLflow, a view of the job folders: one small local rule per (task, model)
# logs each of that model's folders as one run (found again by its config_hash tag, so re-logging updates
# instead of duplicating; an unchanged folder is skipped) and leaves a marker. One process per model, not
# per job: importing mlflow and its SQL store costs ~4.5 CPU-s, which per job was ~15% of the default grid. Parallel loggers serialise on a file lock with retries (rex.pipeline.tracking). Deleting
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
        lambda wc: model_done_markers(wc.task, wc.model),
    output:
        f"{R}/mlflow/{{task}}/{{model}}.json",
    benchmark:
        f"{R}/benchmarks/mlflow/{{task}}/{{model}}.tsv",
    log:
        f"{R}/logs/mlflow/{{task}}/{{model}}.log",
    params:
        uri=TRACKING_URI,
        grid_name=GRID_NAME,
    localrule: True
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m rex.pipeline.tracking sync --tracking-uri {params.uri:q} --grid {params.grid_name:q} "
        "--out {output:q} {input:q} > {log:q} 2>&1"
