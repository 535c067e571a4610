# One job per configuration: python -m rex.pipeline.job composes the config (Hydra Compose API), quantizes,
# evaluates and writes <results>/runs/<task>/<model>/<label>/{config.yaml, metrics.json | FAILED.json, done}
# atomically. A failed configuration exits 0 with FAILED.json (the tables show it); `done` is written last.
# The grid name and the MLflow store reach the job through the environment (REX_GRID, REX_TRACKING_URI, set in
# common.smk), not through params: neither may make Snakemake re-run a job.


rule quantize_evaluate:
    input:
        unpack(job_inputs),
    output:
        done=f"{R}/runs/{{task}}/{{model}}/{{label}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/{{label}}.log",
    params:
        out=lambda wildcards, output: os.path.dirname(output.done),
        overrides=lambda wildcards: grid.quote_overrides(job_of(wildcards)["overrides"]),
    threads: config.get("job_threads", 1)
    resources:
        mem_mb=job_resource("mem_mb", 3000),
        runtime=job_resource("runtime", 30),
        cpus_per_task=lambda wildcards, threads: threads,
    shell:
        "{PY} -m rex.pipeline.job --out {params.out:q} --threads {threads} {params.overrides} > {log:q} 2>&1"
