# summary.csv -> tables (md, csv, tex) and accuracy-vs-BOPs plots per (task, model), and results/report.md.


rule table:
    input:
        summary=f"{R}/summary.csv",
        jobs=f"{R}/jobs.csv",
    output:
        md=f"{R}/tables/{{task}}_{{model}}.md",
        csv=f"{R}/tables/{{task}}_{{model}}.csv",
        tex=f"{R}/tables/{{task}}_{{model}}.tex",
    benchmark:
        f"{R}/benchmarks/tables/{{task}}_{{model}}.tsv",
    log:
        f"{R}/logs/tables/{{task}}_{{model}}.log",
    params:
        prefix=lambda wildcards, output: os.path.splitext(output.md)[0],
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m rex.pipeline.report table --summary {input.summary:q} --jobs {input.jobs:q} "
        "--task {wildcards.task:q} --model {wildcards.model:q} --out-prefix {params.prefix:q} > {log:q} 2>&1"


rule plot:
    input:
        summary=f"{R}/summary.csv",
        jobs=f"{R}/jobs.csv",
    output:
        f"{R}/plots/{{task}}_{{model}}.png",
    benchmark:
        f"{R}/benchmarks/plots/{{task}}_{{model}}.tsv",
    log:
        f"{R}/logs/plots/{{task}}_{{model}}.log",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m rex.pipeline.report plot --summary {input.summary:q} --jobs {input.jobs:q} "
        "--task {wildcards.task:q} --model {wildcards.model:q} --out {output:q} > {log:q} 2>&1"


rule report:
    input:
        summary=f"{R}/summary.csv",
        jobs=f"{R}/jobs.csv",
        tables=table_files(),
        plots=plot_files(),
    output:
        f"{R}/report.md",
    benchmark:
        f"{R}/benchmarks/report.tsv",
    log:
        f"{R}/logs/report.log",
    params:
        grid_name=GRID_NAME,
        uri=TRACKING_URI if MLFLOW else "",
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m rex.pipeline.report page --summary {input.summary:q} --jobs {input.jobs:q} --out {output:q} "
        "--grid {params.grid_name:q} --tracking-uri {params.uri:q} --tables {input.tables:q} "
        "--plots {input.plots:q} > {log:q} 2>&1"


# The grid's accuracy floors (`checks:`, e.g. conf/grid/smoke.yaml): the run fails when one is missed.
rule check:
    input:
        summary=f"{R}/summary.csv",
    output:
        f"{R}/checks.json",
    log:
        f"{R}/logs/checks.log",
    params:
        checks=json.dumps(CHECKS),
    localrule: True
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "python -m rex.pipeline.check --summary {input.summary:q} --checks {params.checks:q} --out {output:q} "
        "> {log:q} 2>&1 || {{ cat {log:q} >&2; exit 1; }}"
