# One job per configuration: python -m rex.pipeline.job composes the config (Hydra Compose API), quantizes,
# evaluates and writes <results>/runs/<task>/<model>/<label>/{config.yaml, metrics.json | FAILED.json, done}
# atomically. A failed configuration exits 0 with FAILED.json (the tables show it); `done` is written last.
# MLflow logging is a separate rule (aggregate.smk): the tracking store never appears in a job's params, so
# neither it nor the MLflow state can make Snakemake re-run a job.
# Six rules, one per label shape (plain, with budget, with budget and allocation; each with or without the
# ,p=<hash> of a non-default protocol), so that no wildcard value holds a comma (see common.smk); all run the
# same command.


rule quantize_evaluate:
    input:
        unpack(job_inputs),
    output:
        done=f"{R}/runs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}}.log",
    params:
        out=lambda wildcards, output: os.path.dirname(output.done),
        overrides=lambda wildcards: grid.quote_overrides(job_of(wildcards)["overrides"]),
    threads: config.get("job_threads", 1)
    resources:
        mem_mb=job_resource("mem_mb", 3000),
        runtime=job_resource("runtime", 30),
        cpus_per_task=lambda wildcards, threads: threads,
    shell:
        "python -m rex.pipeline.job --out {params.out:q} --threads {threads} --no-mlflow {params.overrides} > {log:q} 2>&1"


use rule quantize_evaluate as quantize_evaluate_budget with:
    output:
        done=f"{R}/runs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}}.log",


use rule quantize_evaluate as quantize_evaluate_alloc with:
    output:
        done=f"{R}/runs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}},alloc={{alloc}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}},alloc={{alloc}}.log",


use rule quantize_evaluate as quantize_evaluate_p with:
    output:
        done=f"{R}/runs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},p={{p}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},p={{p}}.log",


use rule quantize_evaluate as quantize_evaluate_budget_p with:
    output:
        done=f"{R}/runs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}},p={{p}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}},p={{p}}.log",


use rule quantize_evaluate as quantize_evaluate_alloc_p with:
    output:
        done=f"{R}/runs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}},alloc={{alloc}},p={{p}}/done",
    log:
        f"{R}/logs/{{task}}/{{model}}/method={{method}},w={{w}},a={{a}},K={{K}},budget={{budget}},alloc={{alloc}},p={{p}}.log",
