"""Multi-node training on real processes: two "nodes" on this machine, each a ``torchrun
--nnodes=2 --rdzv-backend=c10d`` with 2 CPU ranks (gloo), launched by the exact command line
``rules/common.smk`` builds for a SLURM job with ``nodes: 2``, rendezvous on 127.0.0.1. Stage 1
trained that way equals one process with the same global batch.

The command comes from Snakemake itself (a dry run of the workflow with the SLURM resource
``nodes=2``); only the SLURM commands it calls are stand-ins on PATH: ``srun`` starts its command
once per node, here twice on this machine, and ``squeue``/``scontrol`` name 127.0.0.1 as the
allocation's first node.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_train import cfg_with, metrics, run_cli, weights
from tests.workflow_util import BIN, copy_workflow, snakemake

pytestmark = pytest.mark.slow

NODES, PER_NODE = 2, 2

SRUN = """#!/bin/bash
# srun on one machine: start the command once per task (= node) at once, each with its SLURM ids.
n=1
while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#--ntasks=};; esac; shift; done
pids=()
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SQUEUE = "#!/bin/bash\necho 'node[1-2]'\n"
SCONTROL = "#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\nprintf '127.0.0.1\\n127.0.0.1\\n'\n"


def slurm_launcher(tmp_path: Path) -> str:
    """The launcher of train_stage1 that the workflow builds for ``nodes=2`` and ``train.gpus: 2``."""
    (tmp_path / "wf").mkdir()
    wd = copy_workflow(tmp_path / "wf")
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg["train"]["gpus"] = PER_NODE
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    out = snakemake(wd, "--dry-run", "--printshellcmds", "--resources", f"gpu={PER_NODE}",
                    "--set-resources", f"train_stage1:nodes={NODES}", "--until", "train_stage1").stdout
    line = next(ln for ln in out.splitlines() if "train --stage 1 " in ln)
    return line.removeprefix("Shell command:").split(" train --stage 1 ")[0].strip()


def test_two_torchrun_nodes_train_stage1_like_one_process(tmp_path):
    from tests.factories import make_train_corpus

    launcher = slurm_launcher(tmp_path)
    assert launcher.startswith(f"srun --nodes={NODES} --ntasks={NODES} --ntasks-per-node=1 torchrun --nnodes={NODES} "
                               f"--nproc-per-node={PER_NODE} --rdzv-backend=c10d"), launcher
    corpus = make_train_corpus(tmp_path / "corpus", per_speaker=12)
    world = NODES * PER_NODE
    # Small batches, so 3 steps x 4 micro-batches stay within epoch 0 in both layouts.
    small = dict(max_tokens=160, val_every=100, state_every=100, stage1={"max_steps": 3})

    single = tmp_path / "single"
    run_cli(corpus, single, 1, cfg_with(grad_accum=world, **small))

    fake = tmp_path / "slurm-bin"
    fake.mkdir()
    for name, text in (("srun", SRUN), ("squeue", SQUEUE), ("scontrol", SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    multi = tmp_path / "multi"
    args = ["train", "--stage", "1", "--config", json.dumps(cfg_with(grad_accum=1, **small)),
            "--codes-index", str(corpus["index"]), "--clean", str(corpus["clean"]), "--bpe", str(corpus["bpe"]),
            "--out-dir", str(multi)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", SLURM_JOB_ID=f"test{os.getpid()}",
               PATH=f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", launcher + " " + shlex.join(args)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert f"{world} rank(s)" in proc.stdout, proc.stdout[-3000:]
    per_rank = int(proc.stdout.split(" micro-batches per epoch per rank")[0].rsplit(" ", 1)[-1])
    assert per_rank >= 3, proc.stdout  # the premise: no epoch boundary inside the compared steps

    a, b = weights(single), weights(multi)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].dtype.is_floating_point)
    assert worst < 1e-5, worst  # tests/test_train.py's DDP tolerance: the same sums in another order
    la = [r["loss"] for r in metrics(single) if r["split"] == "train"]
    lb = [r["loss"] for r in metrics(multi) if r["split"] == "train"]
    assert la == pytest.approx(lb, abs=1e-5)

