"""Stage 1 of the demo on a real two-node SLURM through ``profiles/slurm``, with ``nodes: 2``.

``tests/slurm_cluster.TwoNodeSlurm`` starts one slurmctld and two slurmd daemons on this machine,
each slurmd in its own network and UTS namespace (hostnames ``ittnode1``/``ittnode2``, veths at
10.77.0.11/.12 on a bridge at 10.77.0.1), and removes all of it afterwards. The workflow copy's
profile gets the README's multi-node ``set-resources`` for ``train_stage1`` (``nodes: 2``,
``tasks: 2``, ``mpi: "srun"``, ``gpu: 0``, ``--gpus-per-node`` in ``slurm_extra``), as a user
would write it; the rule then launches ``srun`` + ``torchrun --rdzv-backend=c10d`` itself
(``rules/common.smk``), one torchrun agent per node meeting at the first node's hostname. The
demo runs up to ``train_stage1``, every rule a SLURM job; the test checks that the training job
ran on both nodes as two tasks, trained with two ranks and completed.

By hand: ``sudo .venv/bin/pytest -m slurm -s tests/test_slurm_multinode.py``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import slurm_cluster
from tests.test_slurm import IN_CI, SITE_ARGS, _env, _job_record, _run_id, _submitted, _unavailable
from tests.workflow_util import BIN, SMALL_DEMO, copy_workflow

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.integration]

NODES = 2
STEPS = 8
# The README's multi-node set-resources, for the demo: train.gpus is 1, so one (fake) GPU per node.
MULTINODE_RESOURCES = {
    "nodes": NODES,
    "tasks": NODES,
    "mpi": "srun",
    "gpu": 0,
    "slurm_extra": "'--gpus-per-node=1'",
    "cpus_per_task": 2,
}
OVERRIDES = copy.deepcopy(SMALL_DEMO)
OVERRIDES["train"]["stage1"] = {"max_steps": STEPS, "warmup_steps": 2}


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        _unavailable("espeak-ng is not installed (make install puts it there)")
    if not slurm_cluster.is_root():
        _unavailable("the two-node SLURM needs root (slurmd, network namespaces)")
    if slurm_cluster.missing_tools():
        if not IN_CI:
            _unavailable(f"SLURM is not installed here (missing {', '.join(slurm_cluster.missing_tools())})")
        slurm_cluster.install()
    c = slurm_cluster.TwoNodeSlurm(tmp_path_factory.mktemp("slurm2-state"), log=lambda m: print(f"[slurm2] {m}"))
    try:
        c.start()
    except slurm_cluster.ClusterError as e:  # a real cluster's slurm.conf, one running already, no netns support
        _unavailable(f"no throwaway two-node SLURM here: {e}")
    try:
        yield c
    finally:
        c.stop()


def _profile_with_multinode_training(wd: Path) -> None:
    """Write the README's multi-node set-resources for train_stage1 into the copy's profile."""
    path = wd / "profiles/slurm/config.yaml"
    profile = yaml.safe_load(path.read_text())
    profile["set-resources"]["train_stage1"] = dict(MULTINODE_RESOURCES)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


@pytest.fixture(scope="module")
def run2n(cluster2, tmp_path_factory):
    wd = copy_workflow(tmp_path_factory.mktemp("wf-slurm2"))
    (wd / "slurm_test.yaml").write_text(yaml.safe_dump(OVERRIDES, sort_keys=False))
    _profile_with_multinode_training(wd)
    cmd = [str(BIN / "snakemake"), "--profile", "profiles/slurm", "--configfile", "slurm_test.yaml", *SITE_ARGS,
           "--retries", "0", "--until", "train_stage1"]
    t0 = time.monotonic()
    seen_running: dict[str, str] = {}
    with open(wd / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=wd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 900
            while proc.poll() is None and time.monotonic() < deadline:
                out = subprocess.run([slurm_cluster.tool("squeue"), "-h", "-o", "%i|%k|%T"], capture_output=True, text=True).stdout
                for jid, comment, state in (ln.split("|") for ln in out.splitlines() if ln.count("|") == 2):
                    if comment == "rule_train_stage1" and state == "RUNNING" and not seen_running:
                        seen_running = _job_record(jid)  # the allocation while the job runs
                time.sleep(0.5)
            rc = proc.wait(timeout=5) if proc.poll() is None else proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - t0
    text = (wd / "run.log").read_text()
    assert rc == 0, f"the two-node run failed ({rc}):\n{text[-6000:]}"
    submitted = _submitted(text)
    job_id = next(j for j, rule in submitted.items() if rule == "train_stage1")
    final = _job_record(job_id)  # MinJobAge keeps it for an hour
    print(f"\ntwo-node run up to train_stage1: {seconds:.0f} s; {len(submitted)} SLURM jobs (run {_run_id(text)}); "
          f"train_stage1 = job {job_id}: {final.get('JobState')} on {final.get('NodeList')}, "
          f"{final.get('NumNodes')} nodes, {final.get('NumTasks')} tasks, ran {final.get('RunTime')}")
    return {"wd": wd, "job_id": job_id, "running": seen_running, "final": final, "submitted": submitted, "seconds": seconds}


def test_training_job_ran_on_both_nodes_as_two_tasks(run2n):
    final, running = run2n["final"], run2n["running"]
    assert final["JobState"] == "COMPLETED", final
    assert running, "train_stage1 was never seen RUNNING in squeue"
    for rec in (running, final):
        assert rec["NumNodes"] == str(NODES), rec
        assert rec["NodeList"] == "ittnode[1-2]", rec
        assert rec["NumTasks"] == str(NODES), rec
    # No --gpus: one fake GPU per node came from slurm_extra's --gpus-per-node.
    assert "gpu:1" in final.get("TresPerNode", ""), final
    # Every other rule ran as an ordinary one-task job; all of them completed.
    for jid, rule in run2n["submitted"].items():
        rec = final if jid == run2n["job_id"] else _job_record(jid)
        assert rec["JobState"] == "COMPLETED", (rule, rec)
        if rule != "train_stage1":
            assert (rec["NumNodes"], rec["NumTasks"]) == ("1", "1"), (rule, rec)
    # The plugin's log of the job, and srun + torchrun in the command it ran.
    logs = list((run2n["wd"] / ".snakemake/slurm_logs").glob(f"rule_train_stage1/**/{run2n['job_id']}.log"))
    assert logs, "no snakemake slurm log for train_stage1"
    log = logs[0].read_text(errors="replace")
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 torchrun --nnodes=2" in log, log[-3000:]
    assert "--rdzv-backend=c10d" in log


def test_stage1_trained_with_two_ranks_and_completed(run2n):
    wd = run2n["wd"]
    out = wd / "results/train/stage1"
    assert (out / "model.safetensors").stat().st_size > 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["stage"] == "stage1"
    stage_log = (wd / "logs/train/stage1.log").read_text(errors="replace")
    m = re.search(r"(\d+) steps x \d+ micro-batches x (\d+) rank\(s\)", stage_log)
    assert m, stage_log[-3000:]
    assert (int(m.group(1)), int(m.group(2))) == (STEPS, NODES)
    # The final resumable state records the world size it was trained with.
    states = [json.loads(p.read_text()) for p in (out / "state").glob("step-*/state.json")]
    assert states and max(s["step"] for s in states) == STEPS
    assert {s["world_size"] for s in states} == {NODES}
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip() and "step" in ln]
    assert steps and max(steps) == STEPS


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-m", "slurm"]))
