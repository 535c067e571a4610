"""The benchmark pipeline around the library: one job per configuration, result folders, MLflow, tables.

- ``rex.pipeline.grid``      expand a grid file (``conf/grid/*.yaml``) into jobs (pure Python + PyYAML; the
                             Snakefile imports it, and ``rex`` loads torch lazily, so building the DAG never does)
- ``rex.pipeline.job``       ``python -m rex.pipeline.job --out DIR override ...``: compose the job's config with
                             Hydra's Compose API, quantize + evaluate, write the job folder atomically
- ``rex.pipeline.tracking``  MLflow: one run per job folder, looked up by its config hash (idempotent, locked)
- ``rex.pipeline.aggregate`` job folders -> ``summary.csv`` (+ ``jobs.csv`` with one row per job)
- ``rex.pipeline.report``    ``summary.csv`` -> tables (md/csv/tex), plots (png), ``report.md``

The per-job folders are the source of truth; everything downstream (summary, tables, MLflow) is a view.
"""
