"""The espeak-ng demo corpus: layout, audio format, labels, planted dirty rows, determinism."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from indextts.config import ConfigError, get_section
from indextts.demo import (
    DIRTY_REASONS,
    EMOTIONS,
    MAX_SECONDS,
    MIN_SECONDS,
    SENTENCES,
    SPEAKERS,
    DemoConfig,
    build_demo_corpus,
    cli_demo_corpus,
    is_geez_text,
    make_demo_corpus,
)

ROOT = Path(__file__).resolve().parents[1]

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (`make install` installs it); the demo corpus needs it",
)


def small_config(**overrides) -> DemoConfig:
    """A corpus small enough for a test: 40 clean rows, 6 speakers, 4 emotions, dirty slice."""
    base = dict(
        enabled=True, n_utterances=40, n_speakers=6, emotions=("neutral", "happy", "sad", "angry"), seed=7, workers=2
    )
    return DemoConfig(**{**base, **overrides})


def read_manifest(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def wav_header_data_bytes(path: Path) -> int:
    """The size the WAV's data chunk claims, read from the RIFF header itself."""
    raw = path.read_bytes()
    pos = 12
    while pos + 8 <= len(raw):
        tag, size = struct.unpack("<4sI", raw[pos : pos + 8])
        if tag == b"data":
            return size
        pos += 8 + size + (size & 1)
    raise AssertionError(f"{path}: no data chunk")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (`make install` installs it); the demo corpus needs it")
    out = tmp_path_factory.mktemp("demo")
    return build_demo_corpus(small_config(), out)


@needs_espeak
def test_clean_rows_are_labelled_16bit_mono_within_1_to_6_s(corpus):
    cfg = small_config()
    rejects = {r["line"]: r for r in json.loads(corpus.expected_rejects.read_text(encoding="utf-8"))}
    lines = read_manifest(corpus.manifest)
    clean = [json.loads(line) for i, line in enumerate(lines, 1) if i not in rejects]
    assert len(clean) == cfg.n_utterances == corpus.n_utterances
    assert len(lines) == cfg.n_utterances + len(rejects)
    assert len({r["id"] for r in clean}) == len(clean)
    assert {r["speaker"] for r in clean} == {v.name for v in SPEAKERS[:6]}
    assert {r["emotion"] for r in clean} == set(cfg.emotions)
    seconds = 0.0
    for r in clean:
        assert set(r) == {"id", "audio", "text", "speaker", "emotion", "language"}, r
        assert r["language"] == "am"
        assert r["audio"] == f"wavs/{r['speaker']}/{r['id']}.wav"
        assert r["text"].strip() and is_geez_text(r["text"]), r
        info = sf.info(corpus.manifest.parent / r["audio"])
        assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1), r["id"]
        assert MIN_SECONDS <= info.duration <= MAX_SECONDS, (r["id"], info.duration)
        # The data chunk is whole: the header's length is what the file holds.
        assert wav_header_data_bytes(corpus.manifest.parent / r["audio"]) == info.frames * 2
        seconds += info.duration
    assert corpus.seconds == pytest.approx(seconds)


@needs_espeak
def test_every_planted_defect_is_present(corpus):
    root = corpus.manifest.parent
    lines = read_manifest(corpus.manifest)
    expected = json.loads(corpus.expected_rejects.read_text(encoding="utf-8"))
    assert sorted({r["reason"] for r in expected}) == sorted(DIRTY_REASONS)
    # Spread through the file, not all at the end.
    assert min(r["line"] for r in expected) < len(lines) / 2
    for rej in expected:
        line = lines[rej["line"] - 1]
        if rej["reason"] == "malformed":
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
            continue
        row = json.loads(line)
        assert row["id"] == rej["id"]
        wav = root / row["audio"]
        if rej["reason"] == "missing_file":
            assert not wav.exists()
        elif rej["reason"] == "empty_text":
            assert row["text"].strip() == "" and sf.info(wav).duration >= MIN_SECONDS
        elif rej["reason"] == "truncated":
            on_disk = wav.stat().st_size - 44
            assert wav_header_data_bytes(wav) > on_disk * 1.5
        elif rej["reason"] == "too_short":
            assert sf.info(wav).duration == pytest.approx(0.1, abs=1e-3)
            assert row["text"].strip() and is_geez_text(row["text"])
        elif rej["reason"] == "duplicate":
            first = lines.index(line) + 1
            assert first < rej["line"], "the rejected copy must be the second occurrence"
            assert first not in {r["line"] for r in expected}
        # The other defect-free fields stay valid, so each dirty row has exactly one defect.
        if rej["reason"] != "empty_text":
            assert is_geez_text(row["text"]) and row["text"].strip()


@needs_espeak
def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    cfg = small_config(n_utterances=12, n_speakers=3, emotions=("neutral", "sad"))
    a = make_demo_corpus(cfg, tmp_path / "a").parent
    # Also across worker counts: the thread pool's finishing order must not leak into the output.
    b = make_demo_corpus(dataclasses.replace(cfg, workers=1), tmp_path / "b").parent
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(p.suffix == ".wav" for p in files_a)
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = make_demo_corpus(dataclasses.replace(cfg, seed=cfg.seed + 1), tmp_path / "c")
    assert c.read_bytes() != (a / "manifest.jsonl").read_bytes()


@needs_espeak
def test_rerun_replaces_the_previous_corpus_and_clean_only_mode(tmp_path):
    make_demo_corpus(small_config(n_utterances=10, n_speakers=2), tmp_path)
    manifest = make_demo_corpus(small_config(n_utterances=6, n_speakers=2, dirty=False), tmp_path)
    rows = [json.loads(line) for line in read_manifest(manifest)]
    assert len(rows) == 6 and json.loads((tmp_path / "expected_rejects.json").read_text()) == []
    # Nothing left over from the first run (stale wavs, staging folders).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected_rejects.json", "manifest.jsonl", "wavs"]
    assert sorted(p.name for p in (tmp_path / "wavs").rglob("*.wav")) == sorted(Path(r["audio"]).name for r in rows)


@needs_espeak
def test_cli_reads_a_yaml_config(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"demo": {"n_utterances": 6, "n_speakers": 2, "dirty": False}}))
    assert cli_demo_corpus(["--config", str(cfg), "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "6 utterances, 2 speakers" in out
    assert len(read_manifest(tmp_path / "out" / "manifest.jsonl")) == 6


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="demo.n_speakers"):
        get_section(DemoConfig, {"demo": {"n_speakers": len(SPEAKERS) + 1}}, "demo")
    with pytest.raises(ConfigError, match="demo.emotions.*'furious'"):
        get_section(DemoConfig, {"demo": {"emotions": ["neutral", "furious"]}}, "demo")
    with pytest.raises(ConfigError, match="demo.n_utterance"):
        get_section(DemoConfig, {"demo": {"n_utterance": 5}}, "demo")


def test_defaults_match_the_schema_and_config_yaml():
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    props = schema["properties"]["demo"]["properties"]
    defaults = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(DemoConfig()).items()}
    assert {k: p["default"] for k, p in props.items()} == defaults
    assert set(props["emotions"]["items"]["enum"]) == set(EMOTIONS)
    assert props["n_speakers"]["maximum"] == len(SPEAKERS)
    demo_yaml = yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))["demo"]
    assert get_section(DemoConfig, {"demo": demo_yaml}, "demo").enabled


def test_sentences_are_geez_and_distinct():
    assert len(SENTENCES) >= 80 and len(set(SENTENCES)) == len(SENTENCES)
    assert all(is_geez_text(s) for s in SENTENCES)
    # Ethiopic numerals are not spoken by espeak-ng, so a sentence holding one would mismatch.
    assert not any(0x1369 <= ord(c) <= 0x137C for s in SENTENCES for c in s)
    assert not is_geez_text("ሰላም hello")
