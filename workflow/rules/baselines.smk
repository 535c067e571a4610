# The baselines table (method.md §7): <results>/tables/baselines_<model>.{md,json}, every number measured by
# workflow/scripts/baselines_table.py through rex.runner.classification_job. A rule of the DAG but not in the
# default target (MobileNetV2 on the 1000 bundled images takes about an hour on 2 cores):
#     make baselines            (= workflow/scripts/run.py baselines --cores N)
# Its per-configuration cache (the .json beside the table) is keyed by spec, model, dataset, image count,
# weights sha256 and commit, so a rerun after a code change recomputes, and an interrupted run resumes.
# Its settings (the grid's optional `baselines:` block) are read in common.smk.


rule baselines:
    output:
        md=f"{R}/tables/baselines_{BASELINES_MODEL}.md",
    log:
        f"{R}/logs/baselines.log",
    benchmark:
        f"{R}/benchmarks/baselines.tsv",
    params:
        args=BASELINES_ARGS,
    threads: config.get("job_threads", 1)
    resources:
        mem_mb=4000,
        runtime=240,
        cpus_per_task=lambda wildcards, threads: threads,
    shell:
        "python workflow/scripts/baselines_table.py --out {output.md:q} --threads {threads} {params.args} > {log:q} 2>&1"
