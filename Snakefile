# REx benchmark pipeline (thin: the rules live in workflow/rules/*.smk, the job logic in rex/pipeline/).
#
#   snakemake --cores 8                                              # embedded default grid
#   snakemake --cores 2 --configfile conf/grid/smoke.yaml            # a handful of jobs, < 2 min
#   snakemake --cores 8 --configfile conf/grid/paper_imagenet.yaml --config imagenet_root=/data/imagenet/val
#   snakemake --profile workflow/profiles/slurm --configfile ...     # same jobs on SLURM
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "conf/grid/default.yaml"


# an unknown key is named with the allowed ones (validate's own message is the whole schema)
from rex.pipeline.grid import check_keys, load_yaml

check_keys(config, load_yaml(Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"))
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/jobs.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/baselines.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
