"""Helpers for tests that drive the real ``snakemake`` on a copy of the workflow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOW_FILES = ("Snakefile", "rules", "schemas", "profiles", "envs", "indextts", "config.yaml")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow (and the library source its code_id hashes) into ``dest``, so a test may
    edit a module or the config without touching the checkout."""
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run the venv's snakemake in ``workdir`` with the README's resources."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(BIN / "snakemake"), "--cores", "2", "--resources", "gpu=1", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """Jobs a dry run would execute, as {rule: count} (``all`` excluded)."""
    proc = snakemake(workdir, "--dry-run", *args)
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    m = re.search(r"Job stats:\n(.*?)\n\s*total\s+\d+", out, re.S)
    assert m, f"no job stats in dry-run output:\n{out[-3000:]}"
    jobs = {}
    for line in m.group(1).splitlines()[2:]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "all":
            jobs[parts[0]] = int(parts[1])
    return jobs


# The demo at a smaller size, for tests that need the whole DAG but not the demo's numbers: 120
# utterances, two code shards, a few training steps (states every 4), two short samples spoken by
# the last stage only, the UNK gate relaxed for the small corpus, thread counts that fit 2 cores.
SMALL_DEMO = {
    "demo": {"n_utterances": 120, "workers": 2},
    "clean": {"probe_workers": 2},
    "vocab": {"max_unk_ratio": 0.05},
    "codes": {"n_shards": 2},
    "train": {
        "state_every": 4,
        "val_every": 100,
        "val_max_batches": 2,
        "num_workers": 0,
        "stage1": {"max_steps": 24, "warmup_steps": 2},
        "stage2": {"max_steps": 4, "warmup_steps": 1},
        "stage3": {"max_steps": 4, "warmup_steps": 1},
    },
    "samples": {"n_same": 1, "n_cross": 1, "n_novel": 0, "stages": [3]},
    "synthesize": {"max_frames": 50},
}


def deep_update(cfg: dict, overrides: dict) -> dict:
    """``cfg`` with ``overrides`` laid over it section by section (as Snakemake merges configfiles)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            deep_update(cfg[key], value)
        else:
            cfg[key] = value
    return cfg


def edit_config(workdir: Path, edit) -> Path:
    """Load ``workdir/config.yaml``, apply ``edit(cfg)`` and write it back."""
    path = workdir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return path
