# IndexTTS2 language adaptation: the whole DAG. This file only includes; the rules live in
# rules/<stage>.smk and the helpers in rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


# The description on the front page of `snakemake --report <run.results_dir>/report.zip`.
report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/prepare.smk"
include: "rules/asr_filter.smk"
include: "rules/codes.smk"
include: "rules/model.smk"
include: "rules/train.smk"
include: "rules/synthesize.smk"
include: "rules/export.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
