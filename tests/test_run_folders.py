"""One results folder per config (run.results_dir, run.logs_dir), and every input the config names
checked before any job (check_configured_inputs in rules/common.smk).

Snakemake leaves a job out of the DAG when its outputs exist, without looking at its inputs or
params, so a config naming files that are not there would otherwise run on what another config
left behind. The same check after a complete demo run is in tests/test_reruns.py.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.workflow_util import SMALL_DEMO, copy_workflow, deep_update, edit_config, planned_jobs, snakemake

pytestmark = [pytest.mark.integration, pytest.mark.slow]

UNTIL = ("--until", "select_speakers")  # demo_corpus, clean_manifest, select_speakers: the cheap end


def tree(wd: Path, *roots: str) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` of ``wd`` as {path relative to wd: (size, mtime_ns)}."""
    out = {}
    for root in roots:
        for p in sorted((wd / root).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(wd))] = (st.st_size, st.st_mtime_ns)
    return out


def write_config(wd: Path, name: str, cfg: dict) -> list[str]:
    (wd / name).write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return ["--configfile", name]


HEADER = "Inputs named by the config are missing, so no job runs:"


def dag_error(wd: Path, cfg: dict) -> tuple[list[str], str]:
    """A dry run with ``cfg`` laid over config.yaml, which must stop before any job: the lines
    naming a missing key (``key: path: why``), and the whole output."""
    proc = snakemake(wd, "--dry-run", *write_config(wd, "alt.yaml", cfg), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and HEADER in out, out[-3000:]
    assert "Job stats" not in out
    lines = out.split(HEADER, 1)[1].splitlines()[1:]
    return [ln.strip() for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("  "))]], out


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make install puts it there)")
def test_two_configs_with_their_own_folders_leave_each_other_alone(tmp_path):
    """The small demo in the default folders (A), then the same demo in runs/b (B), in one working
    directory: B writes only under its folders, A's files keep their bytes and mtimes, and a rerun
    of A's cleaning leaves B's files alone."""
    wd = copy_workflow(tmp_path)
    edit_config(wd, lambda c: deep_update(c, copy.deepcopy(SMALL_DEMO)))
    # The demo's generated inputs live under run.results_dir, so B names its own.
    b = write_config(wd, "b.yaml", {
        "run": {"results_dir": "runs/b/results", "logs_dir": "runs/b/logs"},
        "data": {"manifests": ["runs/b/results/demo/corpus/manifest.jsonl"]},
        "codec": {"weights": "runs/b/results/demo/codec/dac_tiny.pth"},
    })

    snakemake(wd, *UNTIL)
    a_files = tree(wd, "results", "logs")
    assert "results/speakers/speakers.json" in a_files and "logs/clean/clean_manifest.log" in a_files
    assert not (wd / "runs").exists()

    snakemake(wd, *b, *UNTIL)
    assert tree(wd, "results", "logs") == a_files, "B's run touched A's files"
    b_files = tree(wd, "runs")
    # The same outputs and logs as A's, each in B's folders.
    assert {p.removeprefix("runs/b/") for p in b_files} == set(a_files)
    assert (json.loads((wd / "runs/b/results/speakers/speakers.json").read_text())
            == json.loads((wd / "results/speakers/speakers.json").read_text()))
    assert planned_jobs(wd, *UNTIL) == {} and planned_jobs(wd, *b, *UNTIL) == {}

    snakemake(wd, "--forcerun", "clean_manifest", *UNTIL)
    assert tree(wd, "runs") == b_files, "A's rerun touched B's files"
    again = tree(wd, "results", "logs")
    assert again["results/clean/clean.parquet"][1] > a_files["results/clean/clean.parquet"][1]
    assert planned_jobs(wd, *b, *UNTIL) == {}


def test_demo_inputs_are_exempt_only_where_the_demo_rules_write_them(tmp_path):
    """Nothing has run: the demo's manifest and codec may be missing while demo.enabled makes them,
    at the paths its rules write, and nowhere else."""
    wd = copy_workflow(tmp_path)
    assert planned_jobs(wd, *UNTIL) == {"demo_corpus": 1, "clean_manifest": 1, "select_speakers": 1}

    named, _ = dag_error(wd, {"data": {"manifests": ["results/demo/corpus/other.jsonl"]}})
    assert named == ["data.manifests[0]: results/demo/corpus/other.jsonl: no such file"]

    named, _ = dag_error(wd, {"demo": {"enabled": False}})
    assert named == ["data.manifests[0]: results/demo/corpus/manifest.jsonl: no such file",
                     "codec.weights: results/demo/codec/dac_tiny.pth: no such file"]

    # Another results folder moves what the demo writes; config.yaml's paths then name nothing.
    named, out = dag_error(wd, {"run": {"results_dir": "runs/x/results"}})
    assert len(named) == 2 and "the demo writes its manifest to runs/x/results/demo/corpus/manifest.jsonl" in out
    assert not (wd / "results").exists() and not (wd / "runs").exists()


def test_semantic_codec_needs_its_w2v_bert_folder_with_its_files_and_dac_does_not(tmp_path):
    wd = copy_workflow(tmp_path)
    (wd / "models/w2v").mkdir(parents=True)
    (wd / "models/w2v/config.json").write_text("{}")
    (wd / "models/codec.safetensors").write_bytes(b"")
    semantic = {"kind": "semantic", "weights": "models/codec.safetensors"}

    named, _ = dag_error(wd, {"codec": semantic})
    assert named == ["codec.w2v_bert: not set", "codec.w2v_bert_stats: not set"]

    named, _ = dag_error(wd, {"codec": {**semantic, "w2v_bert": "models/w2v", "w2v_bert_stats": "models"}})
    assert named == ["codec.w2v_bert: models/w2v: has no preprocessor_config.json, *.safetensors",
                     "codec.w2v_bert_stats: models: is a folder, not a file"]

    # DAC never reads them: set or not, they are not checked.
    unread = {"codec": {"w2v_bert": "models/gone", "w2v_bert_stats": "models/gone.pt"}}
    assert planned_jobs(wd, *write_config(wd, "dac.yaml", unread), *UNTIL) == {
        "demo_corpus": 1, "clean_manifest": 1, "select_speakers": 1}
