"""The real snakemake on the embedded demo config (what `make demo` runs): end to end, config errors.

The rerun matrix lives in tests/test_reruns.py (on a smaller demo), SLURM in tests/test_slurm.py.
"""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
import yaml

from tests.workflow_util import copy_workflow, planned_jobs, snakemake

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if shutil.which("espeak-ng") is None:  # `make test` installs it; say so instead of skipping silently
    pytest.skip("espeak-ng is not installed (make install puts it there)", allow_module_level=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole demo DAG, run once for the module."""
    wd = copy_workflow(tmp_path_factory.mktemp("wf"))
    snakemake(wd)
    return wd


def alt_config(wd, edit, name="alt.yaml"):
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    cfg = copy.deepcopy(cfg)
    edit(cfg)
    (wd / name).write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return ["--configfile", name]


def test_demo_dag_outputs_and_second_run_does_nothing(demo):
    for out in ("clean/clean.parquet", "clean/rejects.parquet", "clean/summary.json", "vocab/bpe.model", "vocab/vocab_report.json", "speakers/speakers.json"):
        assert (demo / "results" / out).stat().st_size > 0, out
    assert planned_jobs(demo) == {}


def test_planted_dirty_rows_are_rejected_with_their_reason(demo):
    corpus = demo / "results/demo/corpus"
    expected = json.loads((corpus / "expected_rejects.json").read_text())
    assert {e["reason"] for e in expected} >= {"missing_file", "empty_text", "truncated", "too_short", "duplicate", "malformed"}
    rejects = pd.read_parquet(demo / "results/clean/rejects.parquet")
    got = {int(r.row): r.reason for r in rejects.itertuples()}
    for e in expected:
        assert got.get(e["line"]) == e["reason"], f"line {e['line']} ({e['id']}): expected {e['reason']}, got {got.get(e['line'])}"
    # Nothing but the planted rows is rejected from the synthetic corpus.
    assert len(rejects) == len(expected)

    summary = json.loads((demo / "results/clean/summary.json").read_text())
    lines = [ln for ln in (corpus / "manifest.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()]
    clean = pd.read_parquet(demo / "results/clean/clean.parquet")
    assert summary["input_rows"] == len(lines) == len(clean) + len(rejects)
    assert summary["kept"] == len(clean) and summary["rejected"] == len(rejects) and summary["reconciled"]
    assert sum(summary["rejected_by_reason"].values()) == len(rejects)
    assert clean["utt_id"].is_unique and set(clean["split"]) == {"train", "val"}








def test_demo_dag_produces_code_shards_and_index(demo):
    index = json.loads((demo / "results/codes/index.json").read_text())
    shards = sorted((demo / "results/codes").glob("shard-*.parquet"))
    assert len(shards) == 4
    clean = pd.read_parquet(demo / "results/clean/clean.parquet")
    rows = sum(len(pd.read_parquet(p, columns=["utt_id"])) for p in shards)
    assert rows == len(clean)  # every clean utterance is encoded exactly once
    assert index["totals"]["rows"] == len(clean) and index["n_shards"] == 4
    assert [s["rows"] for s in index["shards"]] == [len(pd.read_parquet(p, columns=["utt_id"])) for p in shards]
    report = json.loads((demo / "results/validate/report.json").read_text())
    assert report["ok"] and [c["status"] for c in report["checks"]] == ["pass"] * 5






def test_unknown_key_fails_before_any_job_naming_the_key(tmp_path):
    wd = copy_workflow(tmp_path)
    args = alt_config(wd, lambda c: c["clean"].update(min_durration=1.0))
    proc = snakemake(wd, *args, check=False)
    assert proc.returncode != 0
    assert "min_durration" in proc.stdout + proc.stderr
    assert not (wd / "results").exists()


def test_wrong_type_fails_before_any_job_naming_the_key(tmp_path):
    wd = copy_workflow(tmp_path)
    args = alt_config(wd, lambda c: c["speakers"].update(top_k="many"))
    proc = snakemake(wd, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "top_k" in out and "many" in out
    assert not (wd / "results").exists()


def test_demo_dag_trains_three_stages_and_stage1_learns(demo):
    metas = {}
    for k in (1, 2, 3):
        folder = demo / "results/train" / f"stage{k}"
        for name in ("model.safetensors", "model.json", "metrics.jsonl"):
            assert (folder / name).stat().st_size > 0, f"stage{k}/{name}"
        metas[k] = json.loads((folder / "model.json").read_text())
        assert metas[k]["stage"] == f"stage{k}" and (folder / "tb").is_dir()
    assert (demo / "results/train/stage2/speaker_classifier.safetensors").is_file()
    # The chain: each stage's parent is the previous stage's weights.
    from indextts.checkpoint import checkpoint_sha256

    assert metas[2]["parent_sha256"] == checkpoint_sha256(demo / "results/train/stage1")
    assert metas[3]["parent_sha256"] == checkpoint_sha256(demo / "results/train/stage2")
    # The bar for the demo: val mel loss at least 30% lower at the end of stage 1.
    assert metas[1]["extra"]["val_mel_loss_drop"] >= 0.30, metas[1]["extra"]["first_val"]



