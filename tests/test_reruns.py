"""The rerun matrix (README "Reruns"): what the real snakemake would rerun after each change.

One small demo DAG (tests/workflow_util.SMALL_DEMO) runs once for the module; every case is then a
``--dry-run`` job plan after one change, compared with the exact set of rules it must rerun, so a
case fails both when a change reruns too little and when it reruns too much.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
from dataclasses import dataclass
from typing import Callable

import pytest
import yaml

from tests.workflow_util import REPO, SMALL_DEMO, copy_workflow, deep_update, edit_config, planned_jobs, snakemake

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if shutil.which("espeak-ng") is None:  # `make test` installs it; say so instead of skipping silently
    pytest.skip("espeak-ng is not installed (make install puts it there)", allow_module_level=True)

N_SHARDS = SMALL_DEMO["codes"]["n_shards"]
SAMPLE_STAGES = SMALL_DEMO["samples"]["stages"]


def after_training(*stages: int) -> dict[str, int]:
    """The jobs that rerun when these training stages rerun: the stages, their report pieces, the
    probes of their conditioners, the samples of those among them that speak (samples.stages),
    their scores, the samples and evaluation pages, and after stage 3 the export and its page."""
    jobs = {f"train_stage{k}": 1 for k in stages}
    jobs["report_stage"] = len(stages)
    jobs |= {"probe_stage": len(stages), "report_eval": 1}
    if 2 in stages:
        jobs["report_speaker"] = 1
    speaking = [k for k in stages if k in SAMPLE_STAGES]
    if speaking:
        jobs |= {"synthesize_samples": len(speaking), "evaluate_stage": len(speaking), "report_samples": 1}
    if 3 in stages:
        jobs |= {"export": 1, "report_export": 1}
    return jobs


ALL_STAGES = after_training(1, 2, 3)
# New codes: the shards, their index and the training data cache (the pack, its tokens).
EXTRACTION = {"extract_codes": N_SHARDS, "index_codes": 1, "pack_codes": 1, "tokenize_text": 1, "validate_pipeline": 1}
# What scoring every stage reads from the evaluation config, the sample list or the codec:
# the reference scores (topline, floor, real), each stage's scores and the two pages.
SCORES = {"evaluate_reference": 1, "evaluate_stage": len(SAMPLE_STAGES), "report_samples": 1, "report_eval": 1}
PROBES = {"probe_stage": 3, "report_eval": 1}
# What reads bpe.model or vocab_report.json: the text ids of the cache, the gate, training and
# the data report; never the codes or their pack.
VOCAB = {"train_vocab": 1, "tokenize_text": 1, "validate_pipeline": 1, "report_data": 1} | ALL_STAGES


@dataclass(frozen=True)
class Case:
    """One row of the README's reruns table: a change and the exact job plan it must give."""

    id: str
    reruns: dict[str, int]
    config: Callable[[dict], None] | None = None  # edit of config.yaml
    module: str | None = None  # a library file to edit (a comment appended)
    args: tuple[str, ...] = ()  # extra snakemake arguments
    fresh: bool = False  # plan on a copy with no results yet


def _runtime_knobs(c):
    c["codes"].update(num_workers=7, num_workers_cpu=1, batch_seconds_cpu=30.0, batch_seconds_cuda=50.0, max_batch_size=8)
    c["train"].update(num_workers=1, log_every=3, progress="bar")
    c["synthesize"].update(batch_size=2)


CASES = [
    Case("stage3-lr", after_training(3), config=lambda c: c["train"]["stage3"].update(lr=3.0e-4)),
    Case("stage1-steps", ALL_STAGES, config=lambda c: c["train"]["stage1"].update(max_steps=20)),
    Case("stage2-replay-ratio", after_training(2, 3), config=lambda c: c["train"]["stage2"].update(replay_ratio=0.1)),
    Case("codec", EXTRACTION | ALL_STAGES | SCORES, config=lambda c: c["codec"].update(n_quantizers=2)),
    # Another demo codec: new codes and all that reads them, never a new corpus.
    Case("demo-codec", {"make_demo_codec": 1} | EXTRACTION | ALL_STAGES | SCORES,
         config=lambda c: c["demo"].update(codec="random")),
    # index_codes' own check: the index and what reads it, not the shards.
    Case("frame-tolerance", {"index_codes": 1, "validate_pipeline": 1} | ALL_STAGES,
         config=lambda c: c["codes"].update(frame_tolerance=3.0)),
    Case("train-module", ALL_STAGES, module="train/recipe.py"),
    Case("forcerun-stage2", after_training(2, 3), args=("--forcerun", "train_stage2")),
    Case("until-select-speakers", {"demo_corpus": 1, "clean_manifest": 1, "select_speakers": 1},
         args=("--until", "select_speakers"), fresh=True),
    Case("runtime-knobs", {}, config=_runtime_knobs),
    Case("text-normalisation",
         {"clean_manifest": 1, "select_speakers": 1, "sample_list": 1} | EXTRACTION | VOCAB | ALL_STAGES | SCORES,
         config=lambda c: c["text"].update(punctuation_map={"!": "።"})),
    Case("speakers-top-k", {"select_speakers": 1, "report_data": 1} | after_training(2, 3),
         config=lambda c: c["speakers"].update(top_k=3)),
    Case("vocab-size", VOCAB, config=lambda c: c["vocab"].update(vocab_size=200)),
    Case("vocab-module", VOCAB, module="vocab.py"),
    # A new bpe.model with the same config: re-tokenised, the codes pack kept.
    Case("vocab-file", VOCAB, args=("--forcerun", "train_vocab")),
    # The dataset's code: the gate and training, not the cache they read.
    Case("dataset-module", {"validate_pipeline": 1} | ALL_STAGES, module="dataset.py"),
    Case("sampling", {"synthesize_samples": len(SAMPLE_STAGES), "evaluate_stage": len(SAMPLE_STAGES),
                      "report_samples": 1, "report_eval": 1},
         config=lambda c: c["synthesize"].update(temperature=0.5)),
    # Scoring reads neither training nor sampling: an evaluation change rescores the same WAVs.
    Case("eval-candidates", SCORES, config=lambda c: c["eval"].update(candidates=5)),
    Case("eval-module", SCORES | PROBES, module="evaluation/acoustic.py"),
    Case("probe-folds", PROBES, config=lambda c: c["eval"]["probe"].update(folds=3)),
    Case("released-config", {"export": 1, "report_export": 1}, config=lambda c: c["pretrained"].update(config="config.yaml")),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole small demo DAG, run once for the module (training included)."""
    wd = copy_workflow(tmp_path_factory.mktemp("wf-reruns"))
    edit_config(wd, lambda c: deep_update(c, copy.deepcopy(SMALL_DEMO)))
    snakemake(wd)
    return wd


def _plan(wd, case: Case, tmp_path) -> dict[str, int]:
    if case.fresh:
        wd = copy_workflow(tmp_path)
        edit_config(wd, lambda c: deep_update(c, copy.deepcopy(SMALL_DEMO)))
    args = list(case.args)
    if case.config is not None:
        cfg = yaml.safe_load((wd / "config.yaml").read_text())
        case.config(cfg)
        (wd / "changed.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
        args += ["--configfile", "changed.yaml"]
    if case.module is None:
        return planned_jobs(wd, *args)
    module = wd / "indextts" / case.module
    original = module.read_text()
    try:
        module.write_text(original + "\n# an edit\n")
        return planned_jobs(wd, *args)
    finally:
        module.write_text(original)


def test_demo_is_complete_and_a_second_run_does_nothing(demo):
    assert json.loads((demo / "results/validate/report.json").read_text())["ok"]
    for stage in (1, 2, 3):
        assert (demo / f"results/train/stage{stage}/model.safetensors").stat().st_size > 0
    assert planned_jobs(demo) == {}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_change_reruns_exactly_what_it_touches(demo, case, tmp_path):
    jobs = _plan(demo, case, tmp_path)
    assert jobs == case.reruns, (
        f"{case.id}: reran {dict(sorted(jobs.items()))}, expected {dict(sorted(case.reruns.items()))}")


def _files(wd) -> dict[str, tuple[int, int]]:
    """Every output and log of the demo as {path: (size, mtime_ns)}."""
    return {str(p.relative_to(wd)): (p.stat().st_size, p.stat().st_mtime_ns)
            for root in ("results", "logs") for p in sorted((wd / root).rglob("*")) if p.is_file()}


# After a complete run every job's outputs exist, so Snakemake alone would plan neither the
# cleaning of a missing manifest nor the extraction with missing codec weights: the later stages
# would run on the demo's corpus and codes. The config check stops such a run before any job.
MISSING_INPUTS = [
    pytest.param(lambda c: (c["demo"].update(enabled=False), c["data"].update(manifests=["corpus/gone.jsonl"])),
                 ["data.manifests[0]: corpus/gone.jsonl: no such file"], id="manifest"),
    pytest.param(lambda c: c["codec"].update(weights="weights/gone.pth"),
                 ["codec.weights: weights/gone.pth: no such file"], id="codec-weights"),
]


@pytest.mark.parametrize("edit, named", MISSING_INPUTS)
def test_a_config_naming_a_missing_input_stops_before_any_job(demo, edit, named):
    cfg = yaml.safe_load((demo / "config.yaml").read_text())
    edit(cfg)
    (demo / "missing.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    before = _files(demo)
    for dry in (("--dry-run",), ()):
        proc = snakemake(demo, *dry, "--configfile", "missing.yaml", check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Job stats" not in out, out[-3000:]
        assert "Inputs named by the config are missing, so no job runs:" in out
        for line in named:
            assert f"\n  {line}\n" in out, out[-3000:]
    assert _files(demo) == before


def test_korean_example_before_its_files_exist_names_every_missing_key(demo):
    """The README's "Your own corpus" followed in the clone where the demo ran, before the paths
    of config/korean.yaml point at real files: every key is named at once and nothing runs."""
    shutil.copytree(REPO / "config", demo / "config", dirs_exist_ok=True)
    before = _files(demo)
    proc = snakemake(demo, "--dry-run", "--configfile", "config/korean.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Job stats" not in out, out[-3000:]
    korean = yaml.safe_load((REPO / "config/korean.yaml").read_text())
    manifests = korean["data"]["manifests"]
    for key, path in [("data.manifests[0]", manifests[0]), ("data.manifests[1].path", manifests[1]["path"]),
                      *((f"codec.{k}", korean["codec"][k]) for k in ("weights", "w2v_bert", "w2v_bert_stats")),
                      ("vocab.base_model", korean["vocab"]["base_model"]),
                      *((f"pretrained.{k}", korean["pretrained"][k])
                        for k in ("gpt", "bpe", "s2mel", "campplus", "bigvgan"))]:
        assert f"  {key}: {path}: no such " in out, key
    assert _files(demo) == before and not (demo / "runs").exists()


def test_runtime_knobs_still_reach_the_commands_and_the_library(demo):
    """They rerun nothing because they stay out of params, but every command still carries them."""
    cfg = yaml.safe_load((demo / "config.yaml").read_text())
    _runtime_knobs(cfg)
    (demo / "knobs.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    out = snakemake(demo, "--dry-run", "--printshellcmds", "--forceall", "--configfile", "knobs.yaml").stdout
    for command in ("indextts extract-codes", "indextts index-codes", "indextts train --stage 1"):
        words = shlex.split(next(ln for ln in out.splitlines() if command in ln))
        runtime = json.loads(words[words.index("--runtime") + 1])
        assert runtime["codes"]["num_workers_cpu"] == 1 and runtime["train"]["log_every"] == 3, (command, runtime)
    from indextts.codes import _sections

    config = {"codec": {"weights": "dac.pth"}, "codes": {"n_shards": 2}}
    _, codes_cfg = _sections(json.dumps(config), json.dumps({"codes": {"num_workers_cpu": 3}}))
    assert (codes_cfg.n_shards, codes_cfg.num_workers_cpu) == (2, 3)


def test_training_launcher_follows_train_gpus_and_the_nodes_resource(demo):
    """One process; torchrun over one node's train.gpus GPUs; srun + a c10d torchrun per node with
    the SLURM resource nodes > 1 (README "On a SLURM cluster"). None of them reruns anything."""

    def launcher(*args):
        out = snakemake(demo, "--dry-run", "--printshellcmds", "--resources", "gpu=2", *args).stdout
        line = next(ln for ln in out.splitlines() if "train --stage 1 " in ln)
        return line.removeprefix("Shell command:").split(" train --stage 1 ")[0].strip()

    force = ("--forcerun", "train_stage1", "--until", "train_stage1")
    assert launcher(*force) == "indextts"
    cfg = yaml.safe_load((demo / "config.yaml").read_text())
    cfg["train"]["gpus"] = 2
    (demo / "gpus2.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    assert launcher("--configfile", "gpus2.yaml", *force) == "torchrun --standalone --nproc-per-node=2 -m indextts"
    multi = launcher("--configfile", "gpus2.yaml", "--set-resources", "train_stage1:nodes=3", *force)
    assert multi.startswith("srun --nodes=3 --ntasks=3 --ntasks-per-node=1 torchrun --nnodes=3 --nproc-per-node=2 --rdzv-backend=c10d")
    assert multi.endswith(":29500 -m indextts") and '--rdzv-id="$SLURM_JOB_ID"' in multi
    assert planned_jobs(demo, "--set-resources", "train_stage1:nodes=3") == {}
