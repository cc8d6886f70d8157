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


def demo_sample_names(wd):
    """The sample names config.yaml's samples section gives (same-00 .., cross-00 .., novel-00 ..)."""
    from indextts.synthesize import sample_names

    samples = yaml.safe_load((wd / "config.yaml").read_text())["samples"]
    return sample_names(samples["n_same"], samples["n_cross"], samples.get("n_novel", 0), samples.get("n_base", 0))


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
    # Issue 17's bar for the demo: codebook 0's val loss at most 60% of a uniform guess over its
    # codes. The old bar, a 30% drop of the mean code loss from the first val, was met on a random
    # codec's codes and says little on real ones (about 27% here, after codebook 0 has levelled off).
    import math

    extra = metas[1]["extra"]
    uniform = math.log(extra["codes_codec"]["codebook_size"])
    cb0 = extra["final_val"]["mel_loss/cb0"]
    assert cb0 <= 0.6 * uniform, f"stage 1 val loss of codebook 0: {cb0:.3f} nats, {cb0 / uniform:.1%} of ln(size)"
    assert extra["val_mel_loss_drop"] > 0.2, extra["val_mel_loss_drop"]





def demo_goals(demo) -> dict[str, tuple[bool, str]]:
    """Issue 17's goals, measured on the demo's own outputs: goal -> (met, the measured values).
    The bar is stage 3 on the headline samples (same and cross; novel ones have no goal)."""
    import math

    s3 = json.loads((demo / "results/eval/stage3/summary.json").read_text())
    gen, top, floor = s3["measures"], s3["topline"], s3["floor"]
    scores = pd.read_parquet(demo / "results/eval/stage3/scores.parquet")
    kinds = scores["kind"].value_counts().to_dict()
    extra = json.loads((demo / "results/train/stage1/model.json").read_text())["extra"]
    uniform = math.log(extra["codes_codec"]["codebook_size"])
    cb0 = extra["final_val"]["mel_loss/cb0"]
    ratio = top["mcd"]["mean"] / floor["mcd"]["mean"]
    half_gap = floor["mcd"]["mean"] - 0.5 * (floor["mcd"]["mean"] - top["mcd"]["mean"])
    hit, dur = gen["retrieval_hit"], gen["duration_ratio"]
    stops = scores.loc[scores["kind"].isin(["same", "cross"]), "stop_reached"].astype(float)
    return {
        "codec topline MCD-DTW <= 0.8 x floor": (
            ratio <= 0.8, f"{top['mcd']['mean']:.2f} / {floor['mcd']['mean']:.2f} dB = {ratio:.3f}"),
        "stage-1 val loss of codebook 0 <= 0.6 ln(size)": (cb0 <= 0.6 * uniform, f"{cb0:.3f} nats = {cb0 / uniform:.1%}"),
        "sample set: >= 16 same + cross, plus novel": (
            kinds.get("same", 0) + kinds.get("cross", 0) >= 16 and kinds.get("novel", 0) > 0, str(kinds)),
        "every sample reaches its stop token": (bool((stops == 1.0).all()), f"{int(stops.sum())}/{len(stops)} (same, cross)"),
        "stage-3 text retrieval top-1 >= 0.8": (
            hit["mean"] >= 0.8, f"{hit['mean']:.2f} [{hit['ci_low']:.2f}, {hit['ci_high']:.2f}], n={hit['n']}, "
                                f"chance {s3['retrieval_chance']:.2f}"),
        "stage-3 MCD-DTW closes half the floor-topline gap": (
            gen["mcd"]["mean"] <= half_gap, f"{gen['mcd']['mean']:.2f} dB, bar {half_gap:.2f}"),
        "stage-3 median duration ratio in [0.85, 1.2]": (0.85 <= dur["median"] <= 1.2, f"{dur['median']:.3f}"),
        "stage-3 log-F0 RMSE below the floor's": (
            gen["log_f0_rmse"]["mean"] < floor["log_f0_rmse"]["mean"],
            f"{gen['log_f0_rmse']['mean']:.3f} vs {floor['log_f0_rmse']['mean']:.3f}"),
    }


# What the demo meets today (issue 17's frontier, BENCHMARKS.md): each must hold on every run. The
# other goals are measured and reported as warnings with their values, so a run that meets one shows it
# (the demo's GPT does not read the text yet: bench/bench_text_use.py).
DEMO_GOALS_MET = (
    "codec topline MCD-DTW <= 0.8 x floor",
    "stage-1 val loss of codebook 0 <= 0.6 ln(size)",
    "sample set: >= 16 same + cross, plus novel",
)


def test_demo_goals_of_issue_17_on_its_own_outputs(demo):
    import warnings

    goals = demo_goals(demo)
    missed = {name: got for name, (met, got) in goals.items() if name in DEMO_GOALS_MET and not met}
    assert not missed, "demo goals no longer met: " + "; ".join(f"{k}: {v}" for k, v in missed.items())
    for name, (met, got) in goals.items():
        if name not in DEMO_GOALS_MET:
            warnings.warn(f"demo goal {'met' if met else 'not met'}: {name}: {got}", stacklevel=1)


# --- synthesis, export, report (issue 9) ----------------------------------------------------------


def test_demo_dag_yields_samples_export_and_report(demo):
    """rule all covers the samples of every stage, the export and the report pieces."""
    import soundfile as sf

    names = demo_sample_names(demo)
    n_cross = sum(n.startswith("cross-") for n in names)
    for stage in (1, 2, 3):
        table = pd.read_csv(demo / f"results/samples/stage{stage}/samples.tsv", sep="\t")
        assert list(table["name"]) == names
        assert {"text", "speaker_prompt", "emotion_prompt", "frames", "seconds", "stop_reached", "rtf"} <= set(table.columns)
        for row in table.itertuples():
            info = sf.info(str(demo / f"results/samples/stage{stage}/{row.name}.wav"))
            assert abs(info.duration - row.seconds) < 1e-3 and row.frames * 320 == info.frames
        assert (table["kind"] == "cross").sum() == n_cross and (table.loc[table["kind"] == "cross", "emotion_prompt"] != "").all()
    export = json.loads((demo / "results/export/export_report.json").read_text())
    assert export["reimport"]["ok"] and export["n_codebooks"] == 4  # the demo's DAC: our folder, with the reason
    assert "4 codebooks" in export["official_refused"]
    assert sorted(p.name for p in (demo / "results/export").iterdir() if not p.name.startswith(".")) == export["files"]
    for piece in ("data/data.html", "data/durations.png", "data/speakers.png", "stage2/speaker.png", "export.html",
                  "samples/index.html", "eval/evaluation.html", "eval/measures.png",
                  *(f"stage{k}/{n}" for k in (1, 2, 3) for n in ("losses.png", "summary.html"))):
        assert (demo / "results/report" / piece).stat().st_size > 0, piece


def test_demo_dag_scores_every_stage_beside_the_topline_and_floor(demo):
    """evaluate_reference once, evaluate_stage and probe_stage per stage: one score row per
    sample, the measures with n and an interval, the codec topline's WAVs, the probes."""
    names = demo_sample_names(demo)
    ref = pd.read_parquet(demo / "results/eval/reference/scores.parquet")
    assert sorted(ref.loc[ref["system"] == "topline", "name"]) == sorted(names)
    assert set(ref["system"]) == {"topline", "floor"}  # "real" only with eval.asr or eval.speaker models
    for name in names:
        assert (demo / f"results/eval/reference/topline/{name}.wav").stat().st_size > 0
    for stage in (1, 2, 3):  # each stage reused the reference's analyses of the real recordings
        assert "real recordings' features reused" in (demo / f"logs/eval/stage{stage}.log").read_text()
    for stage in (1, 2, 3):
        scores = pd.read_parquet(demo / f"results/eval/stage{stage}/scores.parquet")
        assert sorted(scores["name"]) == sorted(names)
        summary = json.loads((demo / f"results/eval/stage{stage}/summary.json").read_text())
        for measure in ("mcd", "log_f0_rmse", "vuv_error", "duration_ratio", "retrieval_hit", "stop_reached"):
            m = summary["measures"][measure]
            assert m["n"] > 0 and m["ci_low"] <= m["mean"] <= m["ci_high"], (stage, measure, m)
        assert summary["retrieval_chance"] == pytest.approx(0.1)
        headline = [n for n in names if not n.startswith(("novel-", "base-"))]
        assert summary["n"] == len(headline) and set(summary["by_kind"]) == {n.split("-")[0] for n in names}
        assert summary["topline"]["mcd"]["n"] == len(headline) and summary["floor"]["mcd"]["mean"] > 0
        assert isinstance(summary["does_not_speak"], list)
        probe = json.loads((demo / f"results/eval/stage{stage}/probe.json").read_text())
        speaker = probe["probes"]["speaker_from_emo_vec"]
        assert speaker["k"] == 6 and speaker["chance"] == pytest.approx(1 / 6) and 0 <= speaker["accuracy"] <= 1


def test_demo_report_zip_opens_in_chromium(demo, tmp_path):
    from tests.test_report import check_report, open_in_chromium

    proc = snakemake(demo, "--report", "results/report.zip")
    assert "Report created" in proc.stdout + proc.stderr
    seen = open_in_chromium(demo / "results/report.zip", tmp_path)
    page = demo / "results/report/samples"
    # data (2), per stage losses and summary (2 x 3), stage 2's speaker plot, the evaluation plot
    check_report(seen, tmp_path, n_images=2 + 2 * 3 + 1 + 1, wav_of=lambda url: page / url.split("/", 5)[5])
    generated = {a["src"] for a in seen["audio"] if a["src"].startswith("stage")}
    names = demo_sample_names(demo)
    assert generated == {f"stage{k}/{n}.wav" for k in (1, 2, 3) for n in names}
    assert {p["title"] for p in seen["pages"]} >= {"Data", "Stage 1", "Stage 2", "Stage 3", "Samples per stage", "Export",
                                                  "Evaluation"}
    evaluation = next(p for p in seen["pages"] if p["title"] == "Evaluation")
    assert evaluation["tables"] >= 2 and "text retrieval top-1" in evaluation["text"] and "MCD-DTW" in evaluation["text"]
    # every sample of every stage: its spectrograms (generated, real, topline) load with a size
    spectra = [i for i in seen["page_images"] if i["src"].startswith("spectra/")]
    assert sorted(i["src"] for i in spectra) == sorted(f"spectra/stage{k}_{n}.png" for k in (1, 2, 3) for n in names)
    assert all(i["w"] > 400 and i["h"] > 100 for i in spectra)


def test_each_stage_speaks_from_its_folder_and_the_codec_alone(demo, tmp_path):
    """A stage folder copied away, its model.json pointing at a vocabulary and codec that are gone."""
    import subprocess

    from tests.workflow_util import BIN

    codec = tmp_path / "dac.pth"
    shutil.copy(demo / "results/demo/codec/dac_tiny.pth", codec)
    prompt = pd.read_parquet(demo / "results/clean/clean.parquet").query("split == 'val'")["audio_path"].iloc[0]
    for stage in (1, 2, 3):
        folder = tmp_path / f"stage{stage}"
        for name in ("model.safetensors", "model.json", "bpe.model"):
            (folder / name).parent.mkdir(exist_ok=True)
            shutil.copy(demo / f"results/train/stage{stage}" / name, folder / name)
        meta = json.loads((folder / "model.json").read_text())
        meta["vocab"]["path"], meta["codec"]["weights"] = "/gone/bpe.model", "/gone/dac.pth"
        (folder / "model.json").write_text(json.dumps(meta))
        out = tmp_path / f"s{stage}.wav"
        proc = subprocess.run([str(BIN / "indextts"), "synthesize", "--checkpoint", str(folder), "--codec-weights",
                               str(codec), "--text", "ሰላም ነው", "--speaker-prompt", prompt, "--out", str(out),
                               "--max-frames", "50"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert out.stat().st_size > 44


def test_released_config_reruns_only_the_export_and_batch_size_nothing(demo):
    """pretrained.config is read by the export alone; synthesize.batch_size cannot change a sample."""
    jobs = planned_jobs(demo, *alt_config(demo, lambda c: c["pretrained"].update(config="config.yaml")))
    assert jobs == {"export": 1, "report_export": 1}
    assert planned_jobs(demo, *alt_config(demo, lambda c: c["synthesize"].update(batch_size=2))) == {}
    jobs = planned_jobs(demo, *alt_config(demo, lambda c: c["synthesize"].update(temperature=0.5)))
    assert jobs == {"synthesize_samples": 3, "evaluate_stage": 3, "report_samples": 1, "report_eval": 1}
