"""The evaluation stage end to end on real speech: candidate draws, a stage's scores beside the
topline and the floor, the verdict, the probe driver and the report's evaluation pages.

The corpus is espeak-ng Amharic: two voices, six sentences, each spoken in two prosodies. A "good"
stage's samples are the same texts in the other prosody (what a model that reads the text would
produce); a "bad" stage's are other sentences of the same voice (a model that ignores the text).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.factories import write_clean

if shutil.which("espeak-ng") is None:  # `make test` installs it
    pytest.skip("espeak-ng is not installed (make install puts it there)", allow_module_level=True)

SENTENCES = [
    "ሰላም ለዓለም ዛሬ ጥሩ ቀን ነው",
    "ልጆቹ በትምህርት ቤት ውስጥ መጽሐፍ ያነባሉ",
    "አባቴ ትናንት ወደ ገበያ ሄደ",
    "ውሃ ለሕይወት በጣም አስፈላጊ ነው",
    "እናቴ ጣፋጭ ምግብ አዘጋጀች",
    "ከተማው በምሽት በጣም ያምራል",
]
VOICES = {"spkA": ("am+m3", 40), "spkB": ("am+f2", 70)}
PROSODY = {"plain": ("165", "0"), "slow": ("125", "20")}  # espeak-ng -s (speed), -g (word gap)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcorpus")
    rows = []
    for spk, (voice, pitch) in VOICES.items():
        for i, text in enumerate(SENTENCES):
            for pros, (speed, gap) in PROSODY.items():
                path = root / f"{spk}_{i}_{pros}.wav"
                subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", speed, "-g", gap, "-w", str(path),
                                text], check=True, capture_output=True)
                rows.append({"utt_id": f"{spk}_{i}_{pros}", "audio_path": str(path), "text": text, "raw_text": text,
                             "speaker": spk, "language": "am", "emotion": pros, "duration": 1.0,
                             "sample_rate": 22050, "channels": 1, "split": "val" if i < 2 else "train"})
    clean = write_clean(root / "clean.parquet", rows)
    by_id = {r["utt_id"]: r for r in rows}
    # Two samples per voice: sentences 0 and 1, the plain recordings as references.
    samples = [{"name": f"same-{k:02d}", "kind": "same", "text": SENTENCES[i], "speaker": spk,
                "speaker_prompt": by_id[f"{spk}_5_plain"]["audio_path"], "emotion_prompt": "",
                "reference": by_id[f"{spk}_{i}_plain"]["audio_path"], "utt_id": f"{spk}_{i}_plain",
                "stop_reached": "True"}
               for k, (spk, i) in enumerate((s, i) for s in VOICES for i in (0, 1))]
    table = pd.DataFrame(samples)
    table.to_csv(root / "list.tsv", sep="\t", index=False)
    return {"root": root, "clean": clean, "table": table, "by_id": by_id}


def _stage(corpus, name: str, pick) -> "tuple":
    """A stage folder whose <name>.wav is ``pick(speaker, sentence index)``'s recording."""
    folder = corpus["root"] / name
    folder.mkdir(exist_ok=True)
    table = corpus["table"]
    for r in table.to_dict("records"):
        i = SENTENCES.index(r["text"])
        shutil.copyfile(corpus["by_id"][pick(r["speaker"], i)]["audio_path"], folder / f"{r['name']}.wav")
    table.to_csv(folder / "samples.tsv", sep="\t", index=False)
    return folder / "samples.tsv"


def _cfg(**kw):
    from indextts.config import parse_section
    from indextts.evaluation.scoring import EvalConfig

    # dio: four times faster than harvest, which tests/test_evaluation_acoustic.py covers
    return parse_section(EvalConfig, {"n_boot": 200, "acoustic": {"f0_method": "dio"}, **kw}, "eval")


def test_candidate_sets_are_seeded_same_speaker_other_texts(corpus):
    from indextts.evaluation.scoring import candidate_sets

    table = corpus["table"]
    a = candidate_sets(table, corpus["clean"], 5, seed=0)
    assert a == candidate_sets(table, corpus["clean"], 5, seed=0)
    assert a != candidate_sets(table, corpus["clean"], 5, seed=1)
    meta = pd.read_parquet(corpus["clean"]).set_index("audio_path")
    for r in table.to_dict("records"):
        c = a[r["name"]]
        assert c.paths[0] == r["reference"] and len(c.paths) == 5 and c.floor == c.paths[1]
        others = meta.loc[list(c.paths[1:])]
        assert (others["speaker"] == r["speaker"]).all()
        # one recording per text, none with the sample's text (picked by text, not by file)
        assert r["text"] not in set(others["text"]) and others["text"].is_unique
    # more candidates asked than the speaker has texts: all of them
    big = candidate_sets(table, corpus["clean"], 50, seed=0)
    assert all(len(c.paths) == len(SENTENCES) for c in big.values())


def test_a_stage_that_reads_the_text_beats_the_floor_and_one_that_does_not_is_flagged(corpus, tmp_path):
    from indextts.evaluation.scoring import evaluate_reference, evaluate_stage

    cfg = _cfg(candidates=6)
    ref = evaluate_reference(cfg, corpus["root"] / "list.tsv", out_dir=tmp_path / "reference", codec_weights=None,
                             clean=corpus["clean"])
    good = evaluate_stage(cfg, _stage(corpus, "good", lambda s, i: f"{s}_{i}_slow"), out_dir=tmp_path / "good",
                          clean=corpus["clean"], reference=ref, label="good")
    bad = evaluate_stage(cfg, _stage(corpus, "bad", lambda s, i: f"{s}_{(i + 3) % 6}_slow"), out_dir=tmp_path / "bad",
                         clean=corpus["clean"], reference=ref, label="bad")
    real = evaluate_stage(cfg, _stage(corpus, "real", lambda s, i: f"{s}_{i}_plain"), out_dir=tmp_path / "real",
                          clean=corpus["clean"], reference=ref, label="real")
    floor = good["floor"]
    # Text retrieval finds the right text for a real clip of it in another prosody.
    assert good["measures"]["retrieval_hit"]["mean"] == 1.0, good["measures"]["retrieval_hit"]
    assert good["measures"]["mcd"]["mean"] < floor["mcd"]["mean"]
    assert good["does_not_speak"] == [] and good["retrieval_chance"] == pytest.approx(1 / 6)
    assert good["measures"]["stop_reached"]["mean"] == 1.0
    # The real recording itself scores at least as well as the floor on every reference measure.
    for key in ("mcd", "log_f0_rmse", "vuv_error"):
        assert real["measures"][key]["mean"] <= floor[key]["mean"], key
    assert real["measures"]["duration_ratio"]["mean"] == pytest.approx(1.0)
    assert real["measures"]["mcd"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # Another text in the same voice: flagged, with the reasons.
    assert bad["measures"]["retrieval_hit"]["mean"] == 0.0
    assert any("chance" in why for why in bad["does_not_speak"]), bad["does_not_speak"]
    scores = pd.read_parquet(tmp_path / "good" / "scores.parquet")
    assert list(scores["name"]) == list(corpus["table"]["name"])
    assert {"mcd", "log_f0_rmse", "vuv_error", "duration_ratio", "retrieval_hit", "stop_reached"} <= set(scores.columns)
    # Same inputs, same seed: the same summary (bootstrap intervals included).
    again = evaluate_stage(cfg, _stage(corpus, "good", lambda s, i: f"{s}_{i}_slow"), out_dir=tmp_path / "good2",
                           clean=corpus["clean"], reference=ref, label="good")
    assert again["measures"] == good["measures"]
    # The reference's saved analyses of the real recordings give the very same scores.
    logged = []
    reused = evaluate_stage(cfg, _stage(corpus, "good", lambda s, i: f"{s}_{i}_slow"), out_dir=tmp_path / "good3",
                            clean=corpus["clean"], reference=ref, features=ref.parent / "features.npz", label="good",
                            log=logged.append)
    assert reused["measures"] == good["measures"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "good3" / "scores.parquet"), scores)
    assert any("real recordings' features reused" in line and not line.split(": ")[1].startswith("0 ") for line in logged)


@pytest.mark.parametrize("kind", ["base", "novel"])
def test_base_and_novel_samples_are_scored_by_kind_and_kept_out_of_the_headline(corpus, tmp_path, kind, capsys):
    """samples.n_base rows (kind base) measure the old languages, samples.n_novel rows (kind novel)
    texts training never saw (issue 17: no goal): their scores are by_kind's, never the headline's,
    whose verdict they cannot hide or cause; eval-summary prints them on lines of their own."""
    from indextts.evaluation.scoring import cli_eval_summary, evaluate_stage

    table = corpus["table"].copy()
    table.loc[table["speaker"] == "spkB", "kind"] = kind
    folder = tmp_path / "mixed"
    folder.mkdir()
    for r in table.to_dict("records"):  # spkA reads its text; the base speaker reads another one
        i = SENTENCES.index(r["text"])
        pick = f"spkA_{i}_slow" if r["speaker"] == "spkA" else f"spkB_{(i + 3) % 6}_slow"
        shutil.copyfile(corpus["by_id"][pick]["audio_path"], folder / f"{r['name']}.wav")
    table.to_csv(folder / "samples.tsv", sep="\t", index=False)
    got = evaluate_stage(_cfg(candidates=6), folder / "samples.tsv", out_dir=tmp_path / "out", clean=corpus["clean"],
                         label="mixed")
    assert got["n"] == 2 and got["measures"]["retrieval_hit"]["mean"] == 1.0 and got["does_not_speak"] == []
    assert got["by_kind"][kind]["retrieval_hit"]["mean"] == 0.0
    assert got["by_kind"]["same"]["retrieval_hit"]["mean"] == 1.0
    assert len(pd.read_parquet(tmp_path / "out" / "scores.parquet")) == 4  # every sample is scored
    capsys.readouterr()
    assert cli_eval_summary([str(tmp_path / "out" / "summary.json")]) == 0
    printed = capsys.readouterr().out
    assert f"  {kind} (not in the headline), n=2: text retrieval top-1 0.000" in printed, printed
    assert "  same, n=2: text retrieval top-1 1.000" in printed, printed


def test_saved_features_are_reused_only_for_unchanged_files_and_the_same_config(corpus, tmp_path):
    import os

    from indextts.evaluation.acoustic import FeatureCache

    paths = [r["audio_path"] for r in list(corpus["by_id"].values())[:3]]
    cache = FeatureCache(_cfg().acoustic)
    feats = [cache(p) for p in paths]
    cache.save(tmp_path / "f.npz", keep=lambda p: p.name != Path(paths[2]).name)
    fresh = FeatureCache(_cfg().acoustic)
    assert fresh.load(tmp_path / "f.npz") == 2 and len(fresh) == 2
    for p, f in zip(paths[:2], feats):
        got = fresh(p)
        assert np.array_equal(got.mcep, f.mcep) and np.array_equal(got.f0, f.f0) and got.seconds == f.seconds
    # another analysis config: nothing taken
    assert FeatureCache(_cfg(acoustic={"f0_method": "harvest"}).acoustic).load(tmp_path / "f.npz") == 0
    # a file rewritten since: its entry is left out
    moved = corpus["root"] / "moved.wav"
    shutil.copyfile(paths[0], moved)
    cache(moved)
    cache.save(tmp_path / "g.npz")
    os.utime(moved, ns=(0, 0))
    assert FeatureCache(_cfg().acoustic).load(tmp_path / "g.npz") == len(cache) - 1
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz: not a features file"):
        FeatureCache(_cfg().acoustic).load(tmp_path / "bad.npz")


def test_topline_is_the_recording_through_the_codec(corpus, tmp_path):
    import soundfile as sf

    from indextts.audio.dac import make_demo_codec
    from indextts.evaluation.scoring import evaluate_reference

    codec = make_demo_codec(tmp_path / "dac.pth", seed=0)
    out = tmp_path / "reference"
    path = evaluate_reference(_cfg(candidates=3), corpus["root"] / "list.tsv", out_dir=out, codec_weights=codec,
                              clean=corpus["clean"], n_codebooks=2)
    scores = pd.read_parquet(path)
    assert set(scores["system"]) == {"topline", "floor"}
    top = scores[scores["system"] == "topline"]
    assert len(top) == len(corpus["table"]) and top["mcd"].notna().all()
    for r in corpus["table"].to_dict("records"):
        wav, sr = sf.read(out / "topline" / f"{r['name']}.wav")
        ref_info = sf.info(r["reference"])
        assert sr == 16000 and abs(len(wav) / sr - ref_info.duration) < 0.03
    summary = json.loads((out / "summary.json").read_text())
    assert summary["systems"]["topline"]["mcd"]["n"] == len(corpus["table"])


def test_bad_sample_tables_name_the_row(corpus, tmp_path):
    from indextts.evaluation.scoring import EvaluationError, evaluate_stage, read_samples

    bad = corpus["table"].copy()
    bad.loc[1, "reference"] = str(tmp_path / "nowhere.wav")
    bad.to_csv(tmp_path / "bad.tsv", sep="\t", index=False)
    with pytest.raises(EvaluationError, match=r"row 2 \('same-01'\): reference .*nowhere.wav does not exist"):
        read_samples(tmp_path / "bad.tsv")
    corpus["table"].drop(columns=["reference"]).to_csv(tmp_path / "noref.tsv", sep="\t", index=False)
    with pytest.raises(EvaluationError, match="missing column"):
        read_samples(tmp_path / "noref.tsv")
    corpus["table"].to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    with pytest.raises(EvaluationError, match="generated WAV"):
        evaluate_stage(_cfg(), tmp_path / "s.tsv", out_dir=tmp_path / "o")


def test_cli_evaluate_prints_the_scores_and_the_warning(corpus, tmp_path, capsys):
    from indextts.cli import main

    samples = _stage(corpus, "bad_cli", lambda s, i: f"{s}_{(i + 2) % 6}_plain")
    cfg = json.dumps({"eval": {"n_boot": 200, "candidates": 6, "acoustic": {"f0_method": "dio"}},
                      "text": {"language": "am"}})
    assert main(["evaluate", "--samples", str(samples), "--clean", str(corpus["clean"]), "--out-dir",
                 str(tmp_path / "o"), "--config", cfg, "--label", "stage9"]) == 0
    out = capsys.readouterr()
    assert "text retrieval top-1: 0.000" in out.out
    assert "WARNING stage9 does not yet speak the text" in out.err
    # eval-summary (what `make demo` ends with) prints the same lines from the written summary
    assert main(["eval-summary", str(tmp_path / "o" / "summary.json")]) == 0
    again = capsys.readouterr()
    assert again.out.splitlines()[1:] == out.out.splitlines()[1:] and again.err == out.err
    assert main(["eval-summary", str(tmp_path / "o" / "scores.parquet")]) == 1
    assert "scores.parquet: not an evaluate summary.json" in capsys.readouterr().err


def test_report_eval_page_and_plot(corpus, tmp_path):
    from indextts.evaluation.scoring import evaluate_reference, evaluate_stage
    from indextts.report import ReportConfig, report_eval

    cfg = _cfg(candidates=6)
    ref = evaluate_reference(cfg, corpus["root"] / "list.tsv", out_dir=tmp_path / "ref", codec_weights=None,
                             clean=corpus["clean"])
    summaries = {}
    for stage, pick in ((1, lambda s, i: f"{s}_{(i + 3) % 6}_slow"), (3, lambda s, i: f"{s}_{i}_slow")):
        evaluate_stage(cfg, _stage(corpus, f"st{stage}", pick), out_dir=tmp_path / f"stage{stage}",
                       clean=corpus["clean"], reference=ref, label=f"stage{stage}")
        summaries[stage] = tmp_path / f"stage{stage}" / "summary.json"
    probe = tmp_path / "stage3" / "probe.json"
    probe.write_text(json.dumps({"probes": {"speaker_from_emo_vec": {"accuracy": 0.5, "chance": 0.5, "majority": 0.5,
                                                                      "n": 8, "k": 2, "folds": 2}}}))
    page, plot = tmp_path / "eval.html", tmp_path / "eval.png"
    report_eval(ReportConfig(), summaries, {3: probe}, page=page, plot=plot)
    html = page.read_text()
    assert "Stage 1 does not yet speak the text" in html and "Stage 3 does not" not in html
    assert "text retrieval top-1" in html and "floor" in html and "speaker from emo vec" in html
    assert "set eval.asr.path" in html  # the model-based measures say they are off
    assert plot.stat().st_size > 5000


def test_probe_driver_embeds_held_out_utterances(tmp_path):
    """The probe command on a tiny trained-from-nothing checkpoint: every probe present, labels
    from clean.parquet, accuracies in [0, 1] beside chance."""
    from indextts.config import parse_section
    from indextts.evaluation.disentangle import probe_stage
    from indextts.evaluation.scoring import EvalConfig
    from tests.factories import make_train_corpus
    from tests.test_synthesize import write_checkpoint

    data = make_train_corpus(tmp_path / "c", n_speakers=3, per_speaker=6)
    codec = tmp_path / "codec.pth"
    codec.write_bytes(b"only its sha256 is recorded")
    ckpt = write_checkpoint(tmp_path, codec)
    cfg = parse_section(EvalConfig, {"probe": {"split": "all", "folds": 3}}, "eval")
    result = probe_stage(cfg, ckpt, data["clean"], log=lambda m: None)
    assert result["n"] == 18 and result["emotion_labels"]
    assert set(result["probes"]) == {"speaker_from_emo_vec", "speaker_from_speaker_latent",
                                     "emotion_from_emo_vec", "emotion_from_speaker_latent"}
    for r in result["probes"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["chance"] == pytest.approx(1 / 3) and r["k"] == 3
    # The tones' pitch follows the speaker: a linear probe on the speaker latents finds it.
    assert result["probes"]["speaker_from_speaker_latent"]["accuracy"] > 0.6
    assert not math.isnan(np.mean([r["accuracy"] for r in result["probes"].values()]))
