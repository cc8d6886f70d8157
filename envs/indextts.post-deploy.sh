#!/usr/bin/env bash
# Run by Snakemake inside the new conda env of `--sdm conda`, after the pins of indextts.yaml:
# installs this package (the `indextts` command every rule calls) from the checkout the workflow
# runs from, which rules/common.smk exports as INDEXTTS_SOURCE. Editable, like `make install`, so
# a source edit reaches the env as it reaches code_id's rerun trigger.
set -euo pipefail
src="${INDEXTTS_SOURCE:?not set: this script is run by snakemake --sdm conda (rules/common.smk sets it)}"
python -m pip install --no-deps -e "$src"
