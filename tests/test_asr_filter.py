"""indextts.asr_filter: the ASR consistency filter. Its decisions on given hypothesis texts (exact
CER values, each row on the right side of each threshold, kept + rejected = input), the speech-edge
measure on real speech (espeak-ng), and the whole path through the real rules with a tiny CTC
model built here: a threshold change re-filters without re-transcribing."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from indextts.asr_filter import (
    META_KEY,
    REASONS,
    TRANSCRIPT_SCHEMA,
    AsrFilterConfig,
    AsrFilterError,
    SpeechEdges,
    cer_column,
    character_error_rate,
    decide,
    filter_transcripts,
    model_hash,
    resolve_asr,
    shard_of,
    transcribe_shard,
)
from indextts.config import ConfigError
from indextts.evaluation.asr import AsrConfig, make_random_ctc
from indextts.manifest import CLEAN_SCHEMA
from indextts.text import TextConfig
from tests.workflow_util import SMALL_DEMO, copy_workflow, deep_update, edit_config, planned_jobs, snakemake

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = TextConfig(language="en")


# --- CER on given hypotheses --------------------------------------------------------------------------


@pytest.mark.parametrize("hyp, ref, cer", [
    ("abcd", "abcd", 0.0),
    ("abcf", "abcd", 0.25),  # one substitution in four characters
    ("abc", "abcd", 0.25),  # one deletion
    ("abcdxy", "abcd", 0.5),  # two insertions
    ("", "abcd", 1.0),
    ("a b c d", "abcd", 0.0),  # spaces are word segmentation, not pronunciation
    ("ab", "...", 2.0),  # nothing to score against: the hypothesis' characters
    ("", "...", 0.0),
])
def test_character_error_rate_exact_values(hyp, ref, cer):
    assert character_error_rate(hyp, ref) == pytest.approx(cer, abs=1e-12)


def test_both_sides_go_through_the_pipelines_normaliser():
    got = cer_column(["hello world", "Hello, WORLD!", "hallo world", None], ["Hello, World!"] * 4, TEXT)
    assert got[:3].tolist() == pytest.approx([0.0, 0.0, 0.1])  # case and punctuation never count
    assert math.isnan(got[3])  # no hypothesis (unreadable audio): no CER


def test_decisions_put_each_row_on_the_right_side_of_each_threshold():
    cfg = AsrFilterConfig(max_cer=0.2, min_edge_silence=0.03)
    cer = np.array([0.1, 0.2, 0.2000001, 0.0, 0.0, 0.0, 0.0, 0.9, math.nan])
    lead = np.array([0.5, 0.5, 0.5, 0.0, 0.032, 0.5, 2.0, 0.0, math.nan])
    trail = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.029, 2.0, 0.0, math.nan])
    speech = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, math.nan])
    readable = np.array([True] * 8 + [False])
    got = [REASONS[c] if c >= 0 else "kept" for c in decide(cer, lead, trail, speech, readable, cfg)]
    assert got == ["kept", "kept", "asr_mismatch", "cut_speech", "kept", "cut_speech",
                   "kept",  # no speech detected: left to the CER
                   "asr_mismatch",  # both apply: the first reason wins
                   "unreadable"]
    off = AsrFilterConfig(max_cer=0.2, min_edge_silence=0.0)
    assert (decide(cer[:8], lead[:8], trail[:8], speech[:8], readable[:8], off) != REASONS.index("cut_speech")).all()


def test_config_is_checked_and_the_eval_model_is_the_fallback():
    with pytest.raises(ConfigError, match="asr_filter.max_cer"):
        AsrFilterConfig(max_cer=-0.1)
    with pytest.raises(ConfigError, match="asr_filter.vad_threshold"):
        AsrFilterConfig(vad_threshold=1.0)
    own, ev = AsrConfig(path="/m/own", kind="ctc"), AsrConfig(path="/m/eval")
    assert resolve_asr(AsrFilterConfig(asr=own), ev) == (own, "asr_filter.asr")
    assert resolve_asr(AsrFilterConfig(), ev) == (ev, "eval.asr")
    with pytest.raises(ConfigError, match="set asr_filter.asr.path"):
        resolve_asr(AsrFilterConfig(), AsrConfig())


def test_shards_are_extractions():
    from indextts.codes import shard_of as codes_shard_of

    for i in range(200):
        assert shard_of(f"utt-{i}", 7) == codes_shard_of(f"utt-{i}", 7)


def test_model_hash_follows_every_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    (tmp_path / ".cache").mkdir()
    first = model_hash(tmp_path)
    (tmp_path / ".hidden").write_text("x")  # hidden files are not the model
    assert model_hash(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"1235")
    assert model_hash(tmp_path) != first


# --- the merge step on hand-written transcripts ----------------------------------------------------------


def _pre_asr(path, rows):
    table = pa.table({
        "utt_id": [r[0] for r in rows], "audio_path": [f"/a/{r[0]}.wav" for r in rows], "text": [r[1] for r in rows],
        "raw_text": [r[1] for r in rows], "speaker": ["s1"] * len(rows), "language": ["en"] * len(rows),
        "emotion": [None] * len(rows), "duration": [2.0] * len(rows), "sample_rate": [16000] * len(rows),
        "channels": [1] * len(rows), "replay": [False] * len(rows), "split": [r[2] for r in rows],
    }).cast(CLEAN_SCHEMA)
    pq.write_table(table, path)
    return table


def _transcripts(folder, rows, n_shards=2, digest="d" * 64):
    """Shards as asr-transcribe writes them, from (utt_id, hypothesis, leading, trailing)."""
    paths = []
    for shard in range(n_shards):
        mine = sorted((r for r in rows if shard_of(r[0], n_shards) == shard), key=lambda r: r[0])
        t = pa.table({
            "utt_id": [r[0] for r in mine], "audio_path": [f"/a/{r[0]}.wav" for r in mine], "seconds": [2.0] * len(mine),
            "hypothesis": [r[1] for r in mine], "error": [None if r[1] is not None else "/a: cannot read" for r in mine],
            "leading_silence": [r[2] for r in mine], "trailing_silence": [r[3] for r in mine],
            "speech_seconds": [1.0 if r[1] is not None else math.nan for r in mine], "model_hash": [digest] * len(mine),
        }, schema=TRANSCRIPT_SCHEMA)
        meta = {"format": 1, "shard": shard, "n_shards": n_shards, "model": "tiny (ctc)", "model_hash": digest,
                "asr": {"kind": "ctc"}, "audio_seconds": 2.0 * len(mine), "wall_seconds": 0.1}
        path = folder / f"shard-{shard}.parquet"
        pq.write_table(t.replace_schema_metadata({b"indextts.asr_filter": json.dumps(meta).encode()}), path)
        paths.append(path)
    return paths


CLIPS = [  # utt_id, transcript, split; hypothesis, leading s, trailing s; expected CER, decision
    ("u01", "the cat sat", "train", "the cat sat", 0.3, 0.4, 0.0, "kept"),
    ("u02", "the cat sat", "train", "the bat sat", 0.3, 0.4, 1 / 9, "kept"),
    ("u03", "the cat sat", "train", "the bat sad", 0.3, 0.4, 2 / 9, "asr_mismatch"),
    ("u04", "hello there", "val", "Hello, there!", 0.2, 0.2, 0.0, "kept"),
    ("u05", "a dog ran off", "train", "a dog ran", 0.2, 0.2, 3 / 10, "asr_mismatch"),
    ("u06", "a dog ran off", "train", "a dog ran off", 0.0, 0.3, 0.0, "cut_speech"),
    ("u07", "a dog ran off", "val", "a dog ran off", 0.3, 0.01, 0.0, "cut_speech"),
    ("u08", "a dog ran off", "train", None, math.nan, math.nan, math.nan, "unreadable"),
    ("u09", "one two", "val", "one two", 0.05, 0.05, 0.0, "kept"),
]


def test_filter_keeps_and_rejects_given_hypotheses_and_reconciles(tmp_path):
    pre = _pre_asr(tmp_path / "pre_asr.parquet", [(u, t, s) for u, t, s, *_ in CLIPS])
    shards = _transcripts(tmp_path, [(u, h, a, b) for u, _, _, h, a, b, *_ in CLIPS])
    cfg = AsrFilterConfig(max_cer=0.2, min_edge_silence=0.03)
    out = {k: tmp_path / f"{k}" for k in ("clean.parquet", "rejects.parquet", "summary.json")}
    s = filter_transcripts(cfg, TEXT, tmp_path / "pre_asr.parquet", shards, *out.values())

    want = {u: d for u, *_, d in CLIPS}
    clean = pq.read_table(out["clean.parquet"])
    assert clean.schema == CLEAN_SCHEMA
    assert clean.column("utt_id").to_pylist() == [u for u, d in want.items() if d == "kept"]  # the table's order
    assert clean.to_pylist() == pre.filter(pa.array([d == "kept" for d in want.values()])).to_pylist()
    rejects = pq.read_table(out["rejects.parquet"]).to_pylist()
    assert {r["utt_id"]: r["reason"] for r in rejects} == {u: d for u, d in want.items() if d != "kept"}
    cers = {u: c for u, *_, c, _ in CLIPS}
    for r in rejects:
        if r["reason"] == "unreadable":
            assert r["hypothesis"] is None and math.isnan(r["cer"]) and "cannot read" in r["detail"]
        else:
            assert r["cer"] == pytest.approx(cers[r["utt_id"]], abs=1e-12), r["utt_id"]
            assert r["hypothesis"] == next(h for u, _, _, h, *_ in CLIPS if u == r["utt_id"])
    assert next(r for r in rejects if r["utt_id"] == "u03")["detail"] == "CER 0.222 > asr_filter.max_cer 0.2"
    assert next(r for r in rejects if r["utt_id"] == "u07")["detail"].startswith("trailing silence 0.010 s < asr_filter")

    assert s == json.loads(out["summary.json"].read_text())
    assert (s["input_rows"], s["kept"], s["rejected"], s["reconciled"]) == (9, 4, 5, True)
    assert s["rejected_by_reason"] == {"unreadable": 1, "asr_mismatch": 2, "cut_speech": 2}
    assert s["rejected_share"] == pytest.approx(5 / 9, abs=1e-6)
    assert s["utterances_by_split"] == {"train": 2, "val": 2}
    hist = s["cer"]["histogram"]
    assert s["cer"]["n"] == 8 and sum(hist["counts"]) + hist["above_1"] == 8
    assert [(i, c) for i, c in enumerate(hist["counts"]) if c] == [(0, 5), (2, 1), (4, 1), (6, 1)]  # 0 x5, 1/9, 2/9, 0.3
    assert s["model"]["sha256"] == "d" * 64 and s["transcription"]["shards"] == 2

    # A looser threshold keeps the CER rows; the edge rows stay rejected.
    s2 = filter_transcripts(AsrFilterConfig(max_cer=0.3, min_edge_silence=0.03), TEXT, tmp_path / "pre_asr.parquet",
                            shards, *out.values())
    assert s2["rejected_by_reason"] == {"unreadable": 1, "asr_mismatch": 0, "cut_speech": 2}


def test_filter_refuses_stale_or_mixed_transcripts_and_an_empty_val_split(tmp_path):
    rows = [(u, t, s) for u, t, s, *_ in CLIPS]
    hyps = [(u, h, a, b) for u, _, _, h, a, b, *_ in CLIPS]
    _pre_asr(tmp_path / "pre_asr.parquet", rows)
    out = [tmp_path / "c.parquet", tmp_path / "r.parquet", tmp_path / "s.json"]
    cfg = AsrFilterConfig()
    (tmp_path / "stale").mkdir()
    stale = _transcripts(tmp_path / "stale", hyps[:-1])
    with pytest.raises(AsrFilterError, match="stale: rerun asr_transcribe"):
        filter_transcripts(cfg, TEXT, tmp_path / "pre_asr.parquet", stale, *out)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    mixed = [_transcripts(tmp_path / "a", hyps)[0], _transcripts(tmp_path / "b", hyps, digest="e" * 64)[1]]
    with pytest.raises(AsrFilterError, match="different ASR models"):
        filter_transcripts(cfg, TEXT, tmp_path / "pre_asr.parquet", mixed, *out)
    (tmp_path / "v").mkdir()
    no_val = _transcripts(tmp_path / "v", [(u, h if s == "train" else "zzzz", a, b)
                                           for (u, _, s), (_, h, a, b) in zip(rows, hyps)])
    with pytest.raises(AsrFilterError, match="rejected all 3 val utterances"):
        filter_transcripts(cfg, TEXT, tmp_path / "pre_asr.parquet", no_val, *out)
    assert not any(p.exists() for p in out)


# --- transcription and its cache ---------------------------------------------------------------------------


def _fast_ctc(folder, seed=0):
    # TINY_CTC with longer conv strides (80x instead of 10x fewer frames than samples): ~100x real time
    return make_random_ctc(folder, seed=seed, conv_dim=(8, 8, 8), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4))


def test_transcription_is_cached_by_utterance_audio_file_and_model(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        path = tmp_path / f"u{i}.wav"
        sf.write(path, (0.2 * rng.standard_normal(8000 + 1000 * i)).astype(np.float32), 22050 if i % 2 else 16000)
        rows.append((f"u{i}", "abc", "train"))
    table = _pre_asr(tmp_path / "pre.parquet", rows)
    pq.write_table(table.set_column(1, "audio_path", pa.array([str(tmp_path / f"u{i}.wav") for i in range(6)])),
                   tmp_path / "pre.parquet")
    asr = AsrConfig(path=str(_fast_ctc(tmp_path / "ctc")), kind="ctc", batch_size=3)
    cfg, cache, lines = AsrFilterConfig(device="cpu"), tmp_path / "cache", []

    def run(name, cfg=cfg, asr=asr):
        lines.clear()
        out = transcribe_shard(cfg, asr, tmp_path / "pre.parquet", 0, 1, tmp_path / name, cache=cache, log=lines.append)
        t = pq.read_table(out)
        return t.drop_columns(["model_hash"]).replace_schema_metadata(None), json.loads(t.schema.metadata[META_KEY])

    first, meta = run("a.parquet")
    assert meta["cached"] == 0 and first.column("error").null_count == 6 and first.num_rows == 6
    assert first.column("seconds").to_pylist() == pytest.approx([(8000 + 1000 * i) / (22050 if i % 2 else 16000)
                                                                  for i in range(6)], abs=1e-3)
    again, meta = run("b.parquet")
    assert meta["cached"] == 6 and again.equals(first)  # nothing transcribed, the same table
    assert any("6 of 6 clips from the cache" in ln for ln in lines)
    # Without the cache: the same transcripts, so the cache only saves time.
    fresh = transcribe_shard(cfg, asr, tmp_path / "pre.parquet", 0, 1, tmp_path / "c.parquet", log=lines.append)
    assert pq.read_table(fresh).drop_columns(["model_hash"]).replace_schema_metadata(None).equals(first)
    # A rewritten audio file is transcribed again; a batch size is no part of the key.
    sf.write(tmp_path / "u2.wav", np.zeros(9000, dtype=np.float32), 16000)
    _, meta = run("d.parquet", asr=replace(asr, batch_size=1))
    assert meta["cached"] == 5
    # Another VAD threshold or another model: everything again.
    assert run("e.parquet", cfg=replace(cfg, vad_threshold=0.6))[1]["cached"] == 0
    other = AsrConfig(path=str(_fast_ctc(tmp_path / "ctc2", seed=1)), kind="ctc")
    assert run("f.parquet", asr=other)[1]["cached"] == 0
    # An unreadable file is named and never cached.
    (tmp_path / "u3.wav").write_bytes(b"not audio")
    t, meta = run("g.parquet")
    assert meta["cached"] == 5 and "cannot read audio" in t.column("error")[3].as_py() and t.column("hypothesis")[3].as_py() is None


# --- speech edges on real speech --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """A spoken sentence at 16 kHz with espeak-ng's own short pauses trimmed off both ends."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install puts it there)")
    path = tmp_path_factory.mktemp("speech") / "s.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-w", str(path), "the quick brown fox jumps over the lazy dog"], check=True)
    from indextts.asr_filter import read_clip

    x = read_clip(str(path), 16000)
    loud = np.flatnonzero(np.abs(x) > 0.02)
    return x[loud[0] : loud[-1] + 1]


def test_a_clip_cut_at_its_edge_is_flagged_and_one_with_silence_at_both_ends_is_not(speech):
    pad = np.zeros(8000, dtype=np.float32)  # 0.5 s
    padded = np.concatenate([pad, speech, pad])
    cut = int(0.4 * len(speech))
    start_cut = np.concatenate([speech[cut:], pad])  # the clip starts inside a word
    end_cut = np.concatenate([pad, speech[:cut]])  # it ends inside one
    silence = np.zeros(16000, dtype=np.float32)
    edges = SpeechEdges(0.5).measure([padded, start_cut, end_cut, silence])
    assert 0.4 <= edges[0].leading <= 0.6 and 0.4 <= edges[0].trailing <= 0.7, edges[0]
    assert edges[1].leading < 0.03 and edges[1].trailing > 0.3, edges[1]
    assert edges[2].trailing < 0.03 and edges[2].leading > 0.3, edges[2]
    assert edges[3].speech == 0.0 and edges[3].leading == edges[3].trailing == 1.0
    cfg = AsrFilterConfig(max_cer=0.2, min_edge_silence=0.03)
    got = decide(np.zeros(4), *(np.array([getattr(e, k) for e in edges]) for k in ("leading", "trailing", "speech")),
                 np.ones(4, dtype=bool), cfg)
    assert [REASONS[c] if c >= 0 else "kept" for c in got] == ["kept", "cut_speech", "cut_speech", "kept"]
    # Measures do not depend on the other clips measured with them.
    alone = [SpeechEdges(0.5).measure([c])[0] for c in (padded, start_cut)]
    assert [(e.leading, e.trailing) for e in alone] == [(e.leading, e.trailing) for e in edges[:2]]


def test_report_data_shows_the_filter(tmp_path):
    from indextts.report import ReportConfig, report_data

    _pre_asr(tmp_path / "pre.parquet", [(u, t, s) for u, t, s, *_ in CLIPS])
    shards = _transcripts(tmp_path, [(u, h, a, b) for u, _, _, h, a, b, *_ in CLIPS])
    filter_transcripts(AsrFilterConfig(), TEXT, tmp_path / "pre.parquet", shards, tmp_path / "clean.parquet",
                       tmp_path / "asr_rejects.parquet", tmp_path / "asr_summary.json")
    summary = {"input_rows": 12, "kept": 9, "rejected": 3, "reconciled": True, "rejected_by_reason": {"too_short": 3},
               "hours_kept": 0.005, "hours_by_split": {}, "utterances_by_split": {}, "speakers": 1}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "speakers.json").write_text(json.dumps({"speakers": {"s1": 0}, "stats": {}}))
    out = report_data(ReportConfig(), summary=tmp_path / "summary.json", clean=tmp_path / "clean.parquet",
                      vocab_report=tmp_path / "vocab.json", speakers=tmp_path / "speakers.json",
                      page=tmp_path / "data.html", durations_plot=tmp_path / "d.png", speakers_plot=tmp_path / "s.png",
                      asr_summary=tmp_path / "asr_summary.json", asr_cer_plot=tmp_path / "cer.png")
    assert out[-1] == tmp_path / "cer.png" and (tmp_path / "cer.png").stat().st_size > 1000
    page = (tmp_path / "data.html").read_text()
    assert "<h2>ASR filter</h2>" in page and "55.56 %" in page and "asr_mismatch" in page


# --- through the real rules ---------------------------------------------------------------------------------

# The demo at a smaller size with the filter on: a tiny random CTC model (its conv strides longer
# than TINY_CTC's, 80x instead of 10x, so that it runs at ~100x real time), every clip kept by the
# CER, the edge check off (espeak-ng starts speaking in its first window).
FILTER_DEMO = {
    "demo": {"n_utterances": 60},
    "vocab": {"max_unk_ratio": 1.0},  # not under test here: the corpus is small, and filtered below
    "speakers": {"min_utterances": 1},
    "asr_filter": {"enabled": True, "asr": {"path": "models/ctc", "kind": "ctc", "batch_size": 4},
                   "device": "cpu", "max_cer": 1000.0, "min_edge_silence": 0.0},
}
TARGETS = ("results/clean/asr_summary.json", "results/report/data/data.html")


def _plan(wd, edit):
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    edit(cfg)
    (wd / "changed.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    return planned_jobs(wd, *TARGETS, "--configfile", "changed.yaml")


@pytest.mark.slow
@pytest.mark.integration
def test_the_filter_runs_through_the_real_rules_and_a_threshold_refilters_only(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install puts it there)")
    wd = copy_workflow(tmp_path)
    edit_config(wd, lambda c: deep_update(deep_update(c, copy.deepcopy(SMALL_DEMO)), copy.deepcopy(FILTER_DEMO)))
    _fast_ctc(wd / "models/ctc")
    n = SMALL_DEMO["codes"]["n_shards"]
    assert planned_jobs(wd, *TARGETS) == {"demo_corpus": 1, "clean_manifest": 1, "asr_transcribe": n,
                                          "asr_filter_merge": 1, "train_vocab": 1, "select_speakers": 1,
                                          "report_data": 1}
    snakemake(wd, "--printshellcmds", *TARGETS)  # a flag, so that the targets are not read as --resources

    res = wd / "results"
    pre, clean = pq.read_table(res / "clean/pre_asr.parquet"), pq.read_table(res / "clean/clean.parquet")
    summary = json.loads((res / "clean/asr_summary.json").read_text())
    assert summary["reconciled"] and summary["kept"] == clean.num_rows == pre.num_rows == summary["input_rows"]
    assert clean.to_pylist() == pre.to_pylist()  # everything kept: the same table
    shards = sorted((res / "asr_filter/transcripts").glob("*.parquet"))
    transcripts = pa.concat_tables([pq.read_table(p) for p in shards])
    assert sorted(transcripts.column("utt_id").to_pylist()) == sorted(pre.column("utt_id").to_pylist())
    assert set(transcripts.column("model_hash").to_pylist()) == {model_hash(wd / "models/ctc")}
    assert transcripts.column("error").null_count == transcripts.num_rows
    assert (res / "report/data/asr_cer.png").stat().st_size > 1000
    assert planned_jobs(wd, *TARGETS) == {}

    # A threshold: the merge and what reads clean.parquet, no transcription.
    refilter = {"asr_filter_merge": 1, "train_vocab": 1, "select_speakers": 1, "report_data": 1}
    assert _plan(wd, lambda c: c["asr_filter"].update(max_cer=30.0)) == refilter
    assert _plan(wd, lambda c: c["asr_filter"].update(min_edge_silence=0.05)) == refilter
    # A speed knob: nothing. What a transcript depends on: every shard again.
    assert _plan(wd, lambda c: c["asr_filter"]["asr"].update(batch_size=2)) == {}
    retranscribe = {"asr_transcribe": n} | refilter
    assert _plan(wd, lambda c: c["asr_filter"].update(vad_threshold=0.6)) == retranscribe

    # Run the threshold change: the transcripts stay as they were, the decisions follow the CER.
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    cers = cer_column(transcripts.column("hypothesis").to_pylist(),
                      [dict(zip(pre.column("utt_id").to_pylist(), pre.column("raw_text").to_pylist()))[u]
                       for u in transcripts.column("utt_id").to_pylist()], TextConfig(language="am"))
    threshold = float(np.quantile(cers, 0.75))
    edit_config(wd, lambda c: c["asr_filter"].update(max_cer=threshold))
    snakemake(wd, "--printshellcmds", *TARGETS)  # a flag, so that the targets are not read as --resources
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps
    summary = json.loads((res / "clean/asr_summary.json").read_text())
    assert summary["rejected_by_reason"]["asr_mismatch"] == int((cers > threshold).sum()) > 0
    assert summary["kept"] + summary["rejected"] == summary["input_rows"] == pre.num_rows
    assert pq.read_table(res / "clean/asr_rejects.parquet").num_rows == summary["rejected"]

    # The corpus cleaned again: every shard reruns, each clip from the cache (same audio, same model).
    before = [pq.read_table(p).replace_schema_metadata(None) for p in shards]
    snakemake(wd, "--forcerun", "clean_manifest", "--printshellcmds", *TARGETS)
    assert [pq.read_table(p).replace_schema_metadata(None) for p in shards] == before
    for i in range(n):
        log = (wd / f"logs/asr_filter/shard-{i:05d}.log").read_text()
        assert "0 clips (0.0 s of audio) transcribed" in log and "from the cache" in log, log

    # A new model folder: transcribed again.
    _fast_ctc(wd / "models/ctc", seed=1)
    assert planned_jobs(wd, *TARGETS) == retranscribe


@pytest.mark.slow
@pytest.mark.integration
def test_with_the_filter_off_the_dag_is_unchanged(tmp_path):
    """Off (the demo's default), no rule of the filter exists and clean_manifest writes clean.parquet
    with the command it always had."""
    wd = copy_workflow(tmp_path)
    edit_config(wd, lambda c: deep_update(c, copy.deepcopy(SMALL_DEMO)))
    out = snakemake(wd, "--dry-run", "--printshellcmds", "--until", "select_speakers").stdout
    assert "asr_" not in out and "pre_asr" not in out
    line = next(ln for ln in out.splitlines() if "indextts clean-manifest" in ln)
    assert line.strip().endswith("--out-dir results/clean > logs/clean/clean_manifest.log 2>&1")
