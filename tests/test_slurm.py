"""The demo DAG on a real one-node SLURM through ``profiles/slurm``, with a preempted training job.

``tests/slurm_cluster.py`` installs slurm-wlm and munge when they are missing (CI, root), starts
munged, slurmctld and slurmd with a fake GPU, and stops exactly those daemons afterwards. The
profile is used unchanged; the test passes what an accounting-less site passes on the command
line (README "On a SLURM cluster") and a config file with small overrides. Run 1 is cancelled
with ``scancel`` while ``train_stage1`` runs, after it saved a state; run 2 is a plain rerun of
the DAG, which must resume that state and end with the weights of an uninterrupted run.

By hand: ``sudo .venv/bin/pytest -m slurm -s tests/test_slurm.py`` (``-s`` prints the job table).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import slurm_cluster
from tests.workflow_util import BIN, SMALL_DEMO, copy_workflow, planned_jobs, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.integration]

IN_CI = os.environ.get("CI", "").lower() == "true"
HOW_TO_RUN = (
    "`make test` installs slurm-wlm and munge (root or sudo) and runs it as root; by hand: "
    "`sudo apt-get install slurm-wlm munge && sudo .venv/bin/pytest -m slurm tests/test_slurm.py`"
)
# What an accounting-less site adds to the profile (README), plus test-only speed settings: a
# short first status check and three jobs at a time on a 2-core machine.
SITE_ARGS = [
    "--slurm-no-account",
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "2",
    "--slurm-keep-successful-logs",
    "--jobs", "3",
]
# Small enough for a few minutes (tests/workflow_util.SMALL_DEMO), written as the config file a
# user would pass.
OVERRIDES = SMALL_DEMO
TOTAL_STAGE1 = SMALL_DEMO["train"]["stage1"]["max_steps"]
STATE_EVERY = SMALL_DEMO["train"]["state_every"]
GPU_RULES = {"extract_codes", "validate_pipeline", "train_stage1", "train_stage2", "train_stage3", "synthesize_samples"}
LOCAL_RULES = {"all"}


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason}: in CI the SLURM test must run, not skip")
    pytest.skip(f"{reason}. {HOW_TO_RUN}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        _unavailable("espeak-ng is not installed (make install puts it there)")
    if not slurm_cluster.is_root():
        _unavailable("the one-node SLURM needs root (slurmd)")
    if slurm_cluster.missing_tools():
        if not IN_CI:
            _unavailable(f"SLURM is not installed here (missing {', '.join(slurm_cluster.missing_tools())})")
        slurm_cluster.install()
    c = slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm-state"), log=lambda m: print(f"[slurm] {m}"))
    try:
        c.start()
    except slurm_cluster.ClusterError as e:  # e.g. a real cluster's slurm.conf, or one running already
        _unavailable(f"no throwaway SLURM here: {e}")
    try:
        yield c
    finally:
        c.stop()


def _squeue(*fmt_args: str) -> list[list[str]]:
    out = subprocess.run([slurm_cluster.tool("squeue"), "--states=all", "-h", *fmt_args], capture_output=True, text=True, check=True)
    return [ln.split("|") for ln in out.stdout.splitlines() if ln.strip()]


def _job_record(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, NumTasks, NumCPUs, TresPerJob, Comment ...)."""
    out = subprocess.run([slurm_cluster.tool("scontrol"), "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    rec = {}
    for tok in out.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            rec.setdefault(k, v)
    return rec


def _run_id(log: str) -> str:
    m = re.search(r"SLURM run ID: (\S+)", log)
    assert m, f"no SLURM run ID in snakemake's output:\n{log[-3000:]}"
    return m.group(1)


def _submitted(log: str) -> dict[str, str]:
    """{SLURM job id: rule} from the plugin's 'has been submitted with SLURM jobid' lines."""
    found = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_([A-Za-z0-9_]+)/", log)
    return {jid: rule for jid, rule in found}


def _snakemake_cmd(*args: str) -> list[str]:
    return [str(BIN / "snakemake"), "--profile", "profiles/slurm", "--configfile", "slurm_test.yaml", *SITE_ARGS, *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_WAIT_POLICY": "PASSIVE"}


def _stage1_state_steps(wd: Path) -> list[int]:
    root = wd / "results/train/stage1/state"
    return sorted(json.loads((p / "state.json").read_text())["step"] for p in root.glob("step-*") if (p / "state.json").is_file())


def _cancel_stage1_after_a_state(wd: Path, proc: subprocess.Popen, timeout: float) -> tuple[str, int]:
    """Wait until train_stage1 runs as a SLURM job and has saved a state, then scancel it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"run 1 ended ({proc.returncode}) before train_stage1 saved a state")
        running = [r for r in _squeue("-o", "%i|%k|%T") if r[1] == "rule_train_stage1" and r[2] == "RUNNING"]
        steps = _stage1_state_steps(wd)
        if running and steps:
            subprocess.run([slurm_cluster.tool("scancel"), running[0][0]], check=True)
            return running[0][0], steps[-1]
        time.sleep(0.2)
    pytest.fail(f"train_stage1 did not save a state within {timeout:.0f} s")


@pytest.fixture(scope="module")
def slurm_demo(cluster, tmp_path_factory):
    """Run 1 (cancelled in stage 1) and run 2 (the rerun) of the demo DAG on SLURM."""
    wd = copy_workflow(tmp_path_factory.mktemp("wf-slurm"))
    (wd / "slurm_test.yaml").write_text(yaml.safe_dump(OVERRIDES, sort_keys=False))
    expected = planned_jobs(wd, "--configfile", "slurm_test.yaml")  # the fresh DAG, from a local dry run
    t0 = time.monotonic()
    with open(wd / "run1.log", "w") as log1:
        proc = subprocess.Popen(_snakemake_cmd("--retries", "0"), cwd=wd, env=_env(), stdout=log1, stderr=subprocess.STDOUT, text=True)
        try:
            cancelled, state_step = _cancel_stage1_after_a_state(wd, proc, timeout=900)
            rc1 = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    t1 = time.monotonic()
    log1_text = (wd / "run1.log").read_text()
    records = _records(1, _run_id(log1_text))  # right away: slurmctld forgets jobs after MinJobAge
    run2 = subprocess.run(_snakemake_cmd(), cwd=wd, env=_env(), capture_output=True, text=True, timeout=1200)
    t2 = time.monotonic()
    log2_text = run2.stdout + run2.stderr
    assert run2.returncode == 0, f"the rerun failed:\n{log2_text[-6000:]}"
    records += _records(2, _run_id(log2_text))
    return {
        "wd": wd, "expected": expected, "rc1": rc1, "cancelled": cancelled, "state_step": state_step,
        "records": records, "submitted": (_submitted(log1_text), _submitted(log2_text)), "seconds": (t1 - t0, t2 - t1),
    }


def _records(run: int, run_id: str) -> list[dict[str, str]]:
    """Every SLURM job of one run (its jobs carry the run's id as their name), as scontrol sees
    it, tagged with the run and the rule (the plugin puts rule_<name>[_wildcards_...] in the comment)."""
    rows = []
    for job_id, _name, comment, state in _squeue("--name", run_id, "-o", "%i|%j|%k|%T"):
        rec = _job_record(job_id)
        rule = re.sub(r"_wildcards_.*$", "", comment).removeprefix("rule_")
        rows.append({"run": run, "rule": rule, "comment": comment, "id": job_id, "state": state, **rec})
    return rows


@pytest.fixture(scope="module")
def jobs(slurm_demo):
    """Every SLURM job of both runs, in submission order, and their table (printed, and written
    to slurm_jobs.txt in the test's workflow copy)."""
    rows = sorted(slurm_demo["records"], key=lambda r: int(r["id"]))
    table = [f"{'run':>3} {'job':>5} {'rule (wildcards)':<38} {'state':<10} {'tasks':>5} {'cpus':>4} {'gpu':<12} {'mem':>7} {'limit':>8} {'ran':>8}"]
    for r in rows:
        table.append(f"{r['run']:>3} {r['id']:>5} {r['comment'].removeprefix('rule_'):<38} {r['state']:<10} {r.get('NumTasks', '?'):>5} "
                     f"{r.get('NumCPUs', '?'):>4} {r.get('TresPerJob', '-').replace('(null)', '-'):<12} {r.get('MinMemoryNode', '?'):>7} "
                     f"{r.get('TimeLimit', '?'):>8} {r.get('RunTime', '?'):>8}")
    s1, s2 = slurm_demo["seconds"]
    table.append(f"run 1 (cancelled in train_stage1 after the state of step {slurm_demo['state_step']}): {s1:.0f} s; run 2 (rerun): {s2:.0f} s; total {s1 + s2:.0f} s")
    text = "\n".join(table)
    (slurm_demo["wd"] / "slurm_jobs.txt").write_text(text + "\n")
    print("\n" + text)
    return rows


def test_every_rule_ran_as_one_slurm_job_task(slurm_demo, jobs):
    completed = {}
    for r in jobs:
        if r["state"] == "COMPLETED":
            completed[r["rule"]] = completed.get(r["rule"], 0) + 1
    expected = {rule: n for rule, n in slurm_demo["expected"].items() if rule not in LOCAL_RULES}
    assert completed == expected, f"completed SLURM jobs per rule {completed} != the DAG's {expected}"
    # The plugin's own record of what it submitted agrees with SLURM's.
    submitted = {**slurm_demo["submitted"][0], **slurm_demo["submitted"][1]}
    assert {r["id"]: r["rule"] for r in jobs} == submitted
    for r in jobs:
        assert r["NumTasks"] == "1", f"job {r['id']} ({r['comment']}) ran as {r['NumTasks']} tasks"
        gpu = r.get("TresPerJob", "(null)")
        if r["rule"] in GPU_RULES:
            assert gpu == "gres:gpu:1", f"GPU rule {r['comment']} got {gpu}"
        else:
            assert "gpu" not in gpu, f"CPU rule {r['comment']} got {gpu}"
        if r["state"] == "COMPLETED":
            assert list((slurm_demo["wd"] / ".snakemake/slurm_logs").glob(f"rule_{r['rule']}/**/{r['id']}.log")), r
    # The profile's per-rule numbers reached sbatch (set-resources and the rule's own mem_mb).
    profile = yaml.safe_load((slurm_demo["wd"] / "profiles/slurm/config.yaml").read_text())
    extract = next(r for r in jobs if r["rule"] == "extract_codes")
    assert extract["NumCPUs"] == str(profile["set-resources"]["extract_codes"]["cpus_per_gpu"])
    assert extract["MinMemoryNode"] == f"{profile['set-resources']['extract_codes']['mem_mb']}M"


def test_outputs_are_complete_and_up_to_date(slurm_demo):
    wd = slurm_demo["wd"]
    report = json.loads((wd / "results/validate/report.json").read_text())
    assert report["ok"]
    for stage in (1, 2, 3):
        meta = json.loads((wd / f"results/train/stage{stage}/model.json").read_text())
        assert (wd / f"results/train/stage{stage}/model.safetensors").stat().st_size > 0
        assert meta["stage"] == f"stage{stage}"
    # Nothing left to do for a local run of the same DAG: the SLURM jobs left complete metadata.
    assert planned_jobs(wd, "--configfile", "slurm_test.yaml") == {}


def test_cancelled_training_resumes_its_state_and_matches_an_uninterrupted_run(slurm_demo, jobs, tmp_path):
    wd = slurm_demo["wd"]
    assert slurm_demo["rc1"] != 0, "run 1 should fail once its training job is cancelled"
    cancelled = next(r for r in jobs if r["id"] == slurm_demo["cancelled"])
    assert (cancelled["run"], cancelled["rule"], cancelled["state"]) == (1, "train_stage1", "CANCELLED")
    # No job that finished in run 1 ran again in run 2; the cancelled stage did.
    done1 = {r["comment"] for r in jobs if r["run"] == 1 and r["state"] == "COMPLETED"}
    run2 = {r["comment"] for r in jobs if r["run"] == 2}
    assert not done1 & run2, f"run 2 repeated finished jobs: {done1 & run2}"
    assert "rule_train_stage1" in run2
    # ... and stage 1 continued from the newest state of run 1, not from step 0.
    log = (wd / "logs/train/stage1.log").read_text()
    m = re.search(r"resuming from \S+ at step (\d+)", log)
    assert m, f"stage 1 did not resume:\n{log[-2000:]}"
    resumed = int(m.group(1))
    assert slurm_demo["state_step"] <= resumed < TOTAL_STAGE1 and resumed % STATE_EVERY == 0

    # The uninterrupted reference: stage 1 again, locally, from no state at all.
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref, symlinks=True, ignore=shutil.ignore_patterns("slurm_logs"))
    shutil.rmtree(ref / "results/train")
    snakemake(ref, "--configfile", "slurm_test.yaml", "--until", "train_stage1")
    assert "resuming" not in (ref / "logs/train/stage1.log").read_text()
    from safetensors.torch import load_file

    got = load_file(wd / "results/train/stage1/model.safetensors")
    want = load_file(ref / "results/train/stage1/model.safetensors")
    assert got.keys() == want.keys()
    differ = [k for k in got if not (got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and bool((got[k] == want[k]).all()))]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-m", "slurm"]))
