# Models trained here (Fashion-MNIST): <results>/models/<model>/{model.pt, metrics.json}, passed to the jobs as
# model.weights=<path>. workflow/scripts/train_model.py runs `python -m rex.train --out ...`, or copies an
# identical checkpoint (same recipe, verified sha256) from rex.paths.cache_root()/models/<model>/ when
# `reuse_cached_models` is true.


rule train_model:
    output:
        checkpoint=f"{R}/models/{{model}}/model.pt",
        metrics=f"{R}/models/{{model}}/metrics.json",
    benchmark:
        f"{R}/benchmarks/train/{{model}}.tsv",
    log:
        f"{R}/logs/train/{{model}}.log",
    params:
        out=lambda wildcards, output: os.path.dirname(output.checkpoint),
        # every value shell-quoted: a grid value such as "0.05;touch x" reaches rex.train verbatim (and is refused there)
        args=lambda wildcards: grid.quote_overrides(TRAIN[wildcards.model]["args"]),
        reuse="--reuse-cache" if config.get("reuse_cached_models", True) else "",
    wildcard_constraints:
        model="|".join(TRAIN) or "no-model-is-trained-here",
    priority: 50  # 30 jobs per model wait for it
    threads: config.get("train_threads", 2)
    resources:
        mem_mb=4000,
        runtime=180,
        cpus_per_task=lambda wildcards, threads: threads,
    shell:
        "python workflow/scripts/train_model.py --model {wildcards.model:q} --out {params.out:q} "
        "--threads {threads} {params.reuse} -- {params.args} > {log:q} 2>&1"
