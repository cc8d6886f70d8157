"""indextts.codes: sharded, exact, reproducible DAC code extraction, its index and its reader."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import yaml

from indextts.audio.dac import load_codec, make_demo_codec
from indextts.codes import CodecConfig
from indextts.config import ConfigError
from indextts.codes import (
    META_COLUMNS,
    CodesConfig,
    CodesIndexError,
    AudioFault,
    extract_codes,
    index_codes,
    plan_batches,
    read_audio,
    read_shard_codes,
    shard_file_name,
    shard_of,
    shard_paths,
)
from indextts.hashing import stable_hash
from indextts.files import sha256_file

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # DAC's old weight_norm API
    pytest.mark.usefixtures("one_torch_thread"),
]

REPO = Path(__file__).resolve().parents[1]

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dac


# --------------------------------------------------------------------------------------------
# Factories


def write_wav(path: Path, seconds: float, sr: int, channels: int = 1, seed: int = 0, subtype: str = "PCM_16") -> Path:
    """A sine sweep plus noise: different in every file, so codes differ too."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    f0 = rng.uniform(100, 400)
    x = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.05 * rng.standard_normal(len(t))
    data = np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype)
    return path


def write_clean(root: Path, n: int = 14, seed: int = 0) -> Path:
    """Short WAVs at several rates (some stereo) and ``clean.parquet`` in the foundation's layout."""
    rng = np.random.default_rng(seed)
    rates = [16000, 22050, 44100, 8000]
    rows = []
    for i in range(n):
        sr = rates[i % len(rates)]
        channels = 2 if i % 3 == 0 else 1
        seconds = float(np.round(rng.uniform(0.3, 2.5), 3))
        utt = f"utt{i:03d}"
        path = write_wav(root / "wavs" / f"{utt}.wav", seconds, sr, channels, seed=seed * 1000 + i)
        info = sf.info(path)
        rows.append(
            {
                "utt_id": utt,
                "audio_path": str(path.resolve()),
                "text": f"text {i}",
                "raw_text": f"Text {i}.",
                "speaker": f"spk{i % 3}",
                "language": "am",
                "emotion": None if i % 4 == 0 else "happy",
                "duration": info.frames / info.samplerate,
                "sample_rate": info.samplerate,
                "channels": info.channels,
                "split": "val" if i % 5 == 0 else "train",
            }
        )
    out = root / "clean" / "clean.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_demo_codec(tmp_path_factory.mktemp("codec") / "dac_tiny.pth")


def _cfgs(weights: Path, **codes) -> tuple[CodecConfig, CodesConfig]:
    base = {"n_shards": 2, "num_workers_cpu": 0, "batch_seconds_cpu": 6.0, "max_batch_size": 5}
    return CodecConfig(weights=str(weights), device="cpu"), CodesConfig(**{**base, **codes})


def _extract_all(codec_cfg, codes_cfg, manifest: Path, out: Path) -> tuple[list[Path], list[Path]]:
    shards, rejects = [], []
    for i in range(codes_cfg.n_shards):
        name = shard_file_name(i, codes_cfg.n_shards)
        s, r = extract_codes(codec_cfg, codes_cfg, manifest, i, out / name, out / "rejects" / name, threads=1, progress=False)
        shards.append(s)
        rejects.append(r)
    return shards, rejects


# --------------------------------------------------------------------------------------------
# Sharding, batching, audio


def test_shard_membership_is_a_stable_hash():
    # Pinned: the same in every process, Python version and PYTHONHASHSEED.
    assert stable_hash("utt000") == int.from_bytes(__import__("hashlib").blake2b(b"utt000", digest_size=8).digest(), "big")
    ids = [f"u{i}" for i in range(400)]
    counts = np.bincount([shard_of(u, 4) for u in ids], minlength=4)
    assert counts.sum() == 400 and counts.min() > 60  # spread, every id in exactly one shard
    code = "from indextts.codes import shard_of; print([shard_of(f'u{i}', 7) for i in range(50)])"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert shard_file_name(3, 64) == "shard-00003-of-00064.parquet"


def test_plan_batches_bounds_padded_seconds():
    durs = [0.5, 0.6, 1.0, 1.1, 2.0, 3.9, 4.0]
    assert plan_batches(durs, 0, 64) == [[i] for i in range(7)]  # the CPU policy: one at a time
    plan = plan_batches(durs, 4.0, 3)
    assert sorted(i for b in plan for i in b) == list(range(7))
    for b in plan:
        assert len(b) <= 3 and (len(b) == 1 or max(durs[i] for i in b) * len(b) <= 4.0)
    assert plan == [[0, 1, 2], [3, 4], [5], [6]]


def test_read_audio_downmixes_resamples_and_classifies_faults(tmp_path):
    stereo = write_wav(tmp_path / "s.wav", 0.5, 22050, channels=2, subtype="FLOAT")
    raw, _ = sf.read(stereo, dtype="float32")
    mono = read_audio(str(stereo), 22050)
    np.testing.assert_array_equal(mono, raw.mean(axis=1, dtype=np.float32))
    down = read_audio(str(stereo), 16000)
    assert down.dtype == np.float32 and len(down) == math.ceil(len(raw) * 16000 / 22050)
    with pytest.raises(AudioFault) as e:
        read_audio(str(tmp_path / "gone.wav"), 16000)
    assert e.value.reason == "missing_file"
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wav")
    with pytest.raises(AudioFault) as e:
        read_audio(str(tmp_path / "junk.wav"), 16000)
    assert e.value.reason == "unreadable"
    nan = np.zeros((1000, 1), np.float32)
    nan[10] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    with pytest.raises(AudioFault) as e:
        read_audio(str(tmp_path / "nan.wav"), 16000)
    assert e.value.reason == "non_finite"
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioFault) as e:
        read_audio(str(tmp_path / "empty.wav"), 16000)
    assert e.value.reason == "unreadable"


# --------------------------------------------------------------------------------------------
# Extraction


def test_batched_shards_equal_dac_alone_and_read_back_zero_copy(tmp_path, weights):
    manifest = write_clean(tmp_path)
    codec_cfg, codes_cfg = _cfgs(weights, num_workers_cpu=2)
    shards, rejects = _extract_all(codec_cfg, codes_cfg, manifest, tmp_path / "codes")
    ref = dac.DAC.load(str(weights)).eval()  # DAC's own loader and API as the reference
    _, info = load_codec(weights)
    clean = pq.read_table(manifest).to_pandas().set_index("utt_id")
    seen = []
    for i, path in enumerate(shards):
        sc = read_shard_codes(path)
        assert list(sc.meta.columns) == list(META_COLUMNS)
        assert sc.n_q == 3 and sc.frame_rate == 50.0 and sc.codec["weights_sha256"] == sha256_file(weights)
        assert list(sc.meta["utt_id"]) == sorted(sc.meta["utt_id"])
        assert all(shard_of(u, 2) == i for u in sc.meta["utt_id"])
        assert pq.read_table(rejects[i]).num_rows == 0
        for j, utt in enumerate(sc.meta["utt_id"]):
            codes = sc.codes(j)
            assert codes.dtype == np.int16 and codes.shape == (3, sc.meta["n_frames"].iloc[j])
            assert np.shares_memory(codes, sc._values) and not codes.flags.writeable  # a view, no copy
            wave = torch.from_numpy(read_audio(clean.loc[utt, "audio_path"], info.sample_rate))
            with torch.inference_mode():
                _, alone, *_ = ref.encode(ref.preprocess(wave[None, None], info.sample_rate))
            np.testing.assert_array_equal(codes, alone[0].numpy(), err_msg=utt)
            assert sc.meta["text"].iloc[j] == clean.loc[utt, "text"]
            seen.append(utt)
        np.testing.assert_array_equal(sc.codes(-1), sc.codes(len(sc) - 1))
        with pytest.raises(IndexError):
            sc.codes(len(sc))
    assert sorted(seen) == sorted(clean.index)  # every split, every row
    # The plan really mixed lengths in batches (else this test proves nothing about padding).
    durs = sorted(clean["duration"])
    assert len(plan_batches(durs, codes_cfg.batch_seconds_cpu, codes_cfg.max_batch_size)) < len(durs)

    index = index_codes(codes_cfg, manifest, shards, rejects, tmp_path / "codes" / "index.json")
    data = json.loads(index.read_text())
    assert shard_paths(index) == shards
    assert data["totals"]["rows"] == len(clean) and data["totals"]["rejected"] == 0
    assert data["totals"]["frames"] == sum(read_shard_codes(s).meta["n_frames"].sum() for s in shards)
    assert math.isclose(data["totals"]["seconds"], clean["duration"].sum(), abs_tol=0.01)
    assert math.isclose(data["totals"]["hours"], clean["duration"].sum() / 3600, abs_tol=1e-6)
    assert [s["sha256"] for s in data["shards"]] == [sha256_file(s) for s in shards]
    assert data["codec"]["frame_rate"] == 50.0 and data["frame_check"]["max_abs_diff_frames"] < 1.01


def test_shard_bytes_do_not_depend_on_batching_or_workers(tmp_path, weights):
    manifest = write_clean(tmp_path, n=10, seed=1)
    digests = []
    for k, codes in enumerate([{"batch_seconds_cpu": 0.0}, {"batch_seconds_cpu": 20.0, "max_batch_size": 64, "num_workers_cpu": 2}]):
        codec_cfg, codes_cfg = _cfgs(weights, n_shards=1, **codes)
        (s,), (r,) = _extract_all(codec_cfg, codes_cfg, manifest, tmp_path / f"run{k}")
        digests.append((sha256_file(s), sha256_file(r)))
    assert digests[0] == digests[1]


def test_vanished_unreadable_and_nan_audio_are_rejected_and_reported(tmp_path, weights):
    manifest = write_clean(tmp_path, n=12, seed=2)
    clean = pq.read_table(manifest).to_pandas().set_index("utt_id")
    os.remove(clean.loc["utt001", "audio_path"])  # vanished after cleaning
    Path(clean.loc["utt002", "audio_path"]).write_bytes(b"RIFF\x00\x00garbage")  # became unreadable
    bad = np.full((800, 1), np.inf, np.float32)
    sf.write(clean.loc["utt003", "audio_path"], bad, 16000, subtype="FLOAT")  # inf samples
    codec_cfg, codes_cfg = _cfgs(weights)
    shards, rejects = _extract_all(codec_cfg, codes_cfg, manifest, tmp_path / "codes")
    rej = pa.concat_tables([pq.read_table(r) for r in rejects]).to_pandas().set_index("utt_id")
    assert dict(rej["reason"]) == {"utt001": "missing_file", "utt002": "unreadable", "utt003": "non_finite"}
    assert rej.loc["utt001", "audio_path"] == clean.loc["utt001", "audio_path"]
    kept = sorted(u for s in shards for u in read_shard_codes(s).meta["utt_id"])
    assert kept == sorted(set(clean.index) - {"utt001", "utt002", "utt003"})  # the shards completed
    data = json.loads(index_codes(codes_cfg, manifest, shards, rejects, tmp_path / "index.json").read_text())
    assert data["totals"]["rejected"] == 3
    assert data["totals"]["rejects_by_reason"] == {"missing_file": 1, "unreadable": 1, "non_finite": 1, "too_short": 0}
    assert {r["utt_id"]: r["reason"] for r in data["rejects"]} == dict(rej["reason"])
    assert sum(s["rejected"] for s in data["shards"]) == 3


def test_index_fails_when_frames_disagree_with_duration(tmp_path, weights):
    manifest = write_clean(tmp_path, n=6, seed=3)
    clean = pq.read_table(manifest).to_pandas().set_index("utt_id")
    # The file was replaced by a longer one after cleaning: the manifest's duration is stale.
    write_wav(Path(clean.loc["utt004", "audio_path"]), clean.loc["utt004", "duration"] + 0.2, int(clean.loc["utt004", "sample_rate"]))
    codec_cfg, codes_cfg = _cfgs(weights)
    shards, rejects = _extract_all(codec_cfg, codes_cfg, manifest, tmp_path / "codes")
    with pytest.raises(CodesIndexError, match=r"utt004 \(shard-0000\d-of-00002.parquet\): \d+ frames, expected"):
        index_codes(codes_cfg, manifest, shards, rejects, tmp_path / "index.json")
    assert not (tmp_path / "index.json").exists()
    # A looser tolerance accepts it (0.2 s = 10 frames at 50 frames/s, plus rounding).
    loose = dataclasses.replace(codes_cfg, frame_tolerance=11.5)
    index_codes(loose, manifest, shards, rejects, tmp_path / "index.json")


def test_index_fails_when_shards_miss_manifest_rows(tmp_path, weights):
    manifest = write_clean(tmp_path, n=6, seed=4)
    codec_cfg, codes_cfg = _cfgs(weights)
    shards, rejects = _extract_all(codec_cfg, codes_cfg, manifest, tmp_path / "codes")
    more = write_clean(tmp_path / "bigger", n=8, seed=4)  # utt006, utt007 were never encoded
    with pytest.raises(CodesIndexError, match=r"2 utterances missing \(e\.g\. \['utt006', 'utt007'\]\)"):
        index_codes(codes_cfg, more, shards, rejects, tmp_path / "index.json")
    with pytest.raises(CodesIndexError, match="expected shards 0..2"):
        index_codes(dataclasses.replace(codes_cfg, n_shards=3), manifest, shards, rejects, tmp_path / "i.json")


_KILLABLE = textwrap.dedent(
    """
    import sys, time
    from indextts.codes import CodecConfig, CodesConfig, extract_codes

    def after_batch(k):
        print("BATCH", k, flush=True)
        time.sleep(60)  # mid-shard: killed here

    weights, manifest, out, rej = sys.argv[1:5]
    extract_codes(CodecConfig(weights=weights, device="cpu"),
                  CodesConfig(n_shards=1, num_workers_cpu=2, batch_seconds_cpu=3.0, max_batch_size=4),
                  manifest, 0, out, rej, threads=1, progress=False, on_batch=after_batch)
    """
)


def test_killed_mid_shard_reruns_to_the_same_bytes(tmp_path, weights):
    manifest = write_clean(tmp_path, n=10, seed=5)
    out, rej = tmp_path / "codes" / "shard-00000-of-00001.parquet", tmp_path / "codes" / "rejects" / "r.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(weights), str(manifest), str(out), str(rej)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().startswith("BATCH")  # one batch encoded, more to come
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its DataLoader workers, no cleanup
    finally:
        proc.wait(timeout=30)
    assert not out.exists() and not rej.exists()  # nothing half-written under the real names
    codec_cfg, codes_cfg = _cfgs(weights, n_shards=1, num_workers_cpu=2, batch_seconds_cpu=3.0, max_batch_size=4)
    extract_codes(codec_cfg, codes_cfg, manifest, 0, out, rej, threads=1, progress=False)
    rerun = sha256_file(out)
    ref, ref_rej = tmp_path / "ref.parquet", tmp_path / "ref_rej.parquet"
    extract_codes(codec_cfg, codes_cfg, manifest, 0, ref, ref_rej, threads=1, progress=False)
    assert rerun == sha256_file(ref)
    assert sha256_file(rej) == sha256_file(ref_rej)
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_extract_and_index(tmp_path, weights):
    from indextts.cli import main

    manifest = write_clean(tmp_path, n=5, seed=6)
    cfg = json.dumps({"codec": {"weights": str(weights), "device": "cpu"}, "codes": {"n_shards": 1, "num_workers_cpu": 0}})
    shard, rej = tmp_path / "s.parquet", tmp_path / "r.parquet"
    argv = ["--config", cfg, "--manifest", str(manifest), "--output", str(shard), "--rejects", str(rej)]
    assert main(["extract-codes", *argv, "--shard", "00000", "--threads", "1", "--no-progress"]) == 0
    assert len(read_shard_codes(shard)) == 5
    assert main(["extract-codes", *argv, "--shard", "1"]) == 2  # outside 0..0: a config error
    index_argv = ["--config", cfg, "--manifest", str(manifest), "--shards", str(shard), "--rejects", str(rej)]
    assert main(["index-codes", *index_argv, "--output", str(tmp_path / "index.json")]) == 0
    bad = json.dumps({"codes": {"n_shards": 1, "frame_tolerance": 0.0}})  # every row off by a fraction
    assert main(["index-codes", "--config", bad, *index_argv[2:], "--output", str(tmp_path / "i2.json")]) == 1


def test_demo_config_points_at_the_demo_codec_rule_output():
    # The make_demo_codec rule writes this fixed path; the demo config must read it.
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    assert cfg["codec"]["weights"] == "results/demo/codec/dac_tiny.pth"
    common = (REPO / "rules" / "common.smk").read_text()
    assert 'DEMO_CODEC = f"{RESULTS}/demo/codec/dac_tiny.pth"' in common
    assert "weights=DEMO_CODEC," in (REPO / "rules" / "codes.smk").read_text()


def test_empty_shards_are_written_and_indexed(tmp_path, weights):
    manifest = write_clean(tmp_path, n=3, seed=7)
    codec_cfg, codes_cfg = _cfgs(weights, n_shards=8)
    shards, rejects = _extract_all(codec_cfg, codes_cfg, manifest, tmp_path / "codes")
    sizes = [len(read_shard_codes(s)) for s in shards]
    assert sum(sizes) == 3 and sizes.count(0) >= 5
    empty = read_shard_codes(shards[sizes.index(0)])
    assert empty.n_q == 3 and list(empty.meta.columns) == list(META_COLUMNS)
    data = json.loads(index_codes(codes_cfg, manifest, shards, rejects, tmp_path / "index.json").read_text())
    assert data["totals"]["rows"] == 3 and len(data["shards"]) == 8


# --------------------------------------------------------------------------------------------
# The semantic codec (codec.kind semantic): w2v-BERT 2.0 + MaskGCT codec, tiny random models


@pytest.fixture(scope="module")
def semantic(tmp_path_factory) -> dict:
    """The ``codec`` section of a tiny random w2v-BERT + semantic codec pair."""
    from indextts.audio.semantic_codec import make_tiny_semantic

    return make_tiny_semantic(tmp_path_factory.mktemp("semantic"))


def _extract_semantic(codec: dict, manifest: Path, out: Path, features=None, **codes) -> tuple[list[Path], list[Path]]:
    codec_cfg = CodecConfig(**codec)
    codes_cfg = CodesConfig(**{"n_shards": 2, "num_workers_cpu": 0, "batch_seconds_cpu": 0.0, **codes})
    shards, rejects = [], []
    for i in range(codes_cfg.n_shards):
        name = shard_file_name(i, codes_cfg.n_shards)
        s, r = extract_codes(codec_cfg, codes_cfg, manifest, i, out / name, out / "rejects" / name, threads=1,
                             progress=False, features_cfg=features)
        shards.append(s)
        rejects.append(r)
    return shards, rejects


def test_semantic_shards_hold_one_stream_at_50_per_second_equal_to_each_utterance_alone(tmp_path, semantic):
    from indextts.audio.w2v_bert import w2v_bert_frames
    from indextts.features import PromptFeatureStore, PromptFeaturesConfig, crop_window, features_path_for
    from indextts.audio.semantic_codec import TINY_CODEC, load_semantic_encoder

    manifest = write_clean(tmp_path, n=12, seed=4)
    feats_cfg = PromptFeaturesConfig(store=True, max_ref_seconds=1.0)
    one, one_rej = _extract_semantic(semantic, manifest, tmp_path / "one", feats_cfg)
    batched, _ = _extract_semantic(semantic, manifest, tmp_path / "batched", feats_cfg, batch_seconds_cpu=30.0,
                                   max_batch_size=64, num_workers_cpu=2)
    assert [sha256_file(s) for s in one] == [sha256_file(s) for s in batched]  # batching changes no byte
    clean = pq.read_table(manifest).to_pandas().set_index("utt_id")
    assert len(plan_batches(sorted(clean["duration"]), 30.0, 64)) < len(clean)  # it did batch
    encoder = load_semantic_encoder(CodecConfig(**semantic))
    store = PromptFeatureStore([features_path_for(s) for s in one])
    store_b = PromptFeatureStore([features_path_for(s) for s in batched])
    n_seen = 0
    for path in one:
        sc = read_shard_codes(path)
        assert sc.n_q == 1 and sc.frame_rate == 50.0
        assert sc.codec["kind"] == "semantic" and sc.codec["codebook_size"] == TINY_CODEC.codebook_size
        assert sc.codec["weights_sha256"] == sha256_file(semantic["weights"]) and len(sc.codec["w2v_bert_sha256"]) == 64
        for j, utt in enumerate(sc.meta["utt_id"]):
            wave = read_audio(clean.loc[utt, "audio_path"], 16000)
            inputs = encoder.prepare([wave])
            n = int(inputs["frames"][0])
            alone_codes, alone_feats = encoder.encode(inputs)
            codes = sc.codes(j)
            assert codes.shape == (1, n) and n == w2v_bert_frames(len(wave))
            np.testing.assert_array_equal(codes, alone_codes[0, :, :n].numpy(), err_msg=utt)
            stored = store.get(utt)
            assert stored.shape == (min(codes.shape[1], 50), 32)
            start, _ = crop_window(utt, n, 50)
            want = alone_feats[0, start : start + len(stored)].numpy().astype(np.float16).astype(np.float32)
            np.testing.assert_allclose(stored, want, atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(store_b.get(utt), stored, atol=2e-3, rtol=2e-3)
            n_seen += 1
    assert n_seen == len(clean)
    features = [features_path_for(s) for s in one]
    data = json.loads(index_codes(CodesConfig(n_shards=2), manifest, one, one_rej, tmp_path / "index.json",
                                  features=features).read_text())
    assert data["codec"]["kind"] == "semantic" and data["codec"]["n_q"] == 1 and data["codec"]["frame_rate"] == 50.0
    assert data["frame_check"]["max_abs_diff_frames"] < 2.0  # 50/s less the fbank's last partial window
    assert data["totals"]["feature_bytes"] == sum(f.stat().st_size for f in features)
    assert [s["features"]["rows"] for s in data["shards"]] == [len(read_shard_codes(s)) for s in one]
    # An index over features that miss a shard's rows fails, naming the file.
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(features[1].read_bytes())
    with pytest.raises(CodesIndexError, match="broken.parquet: holds"):
        index_codes(CodesConfig(n_shards=2), manifest, one, one_rej, tmp_path / "bad.json", features=[broken, features[0]])


def test_semantic_rejects_audio_too_short_for_one_frame_and_dac_cannot_store_features(tmp_path, semantic, weights):
    from indextts.features import PromptFeaturesConfig

    manifest = write_clean(tmp_path, n=6, seed=5)
    clean = pq.read_table(manifest).to_pandas().set_index("utt_id")
    sf.write(clean.loc["utt002", "audio_path"], np.zeros(500, np.float32), 16000)  # 31 ms: under two fbank windows
    shards, rejects = _extract_semantic(semantic, manifest, tmp_path / "codes")
    rej = pa.concat_tables([pq.read_table(r) for r in rejects]).to_pandas().set_index("utt_id")
    assert dict(rej["reason"]) == {"utt002": "too_short"} and "560" in rej.loc["utt002", "detail"]
    codec_cfg, codes_cfg = _cfgs(weights)
    with pytest.raises(ConfigError, match="features.store is true but codec.kind is 'dac'"):
        extract_codes(codec_cfg, codes_cfg, manifest, 0, tmp_path / "d.parquet", tmp_path / "r.parquet",
                      features_cfg=PromptFeaturesConfig(store=True))
    with pytest.raises(ConfigError, match="codec.w2v_bert and codec.w2v_bert_stats"):
        CodecConfig(weights="x", kind="semantic")
    with pytest.raises(ConfigError, match="one code stream"):
        CodecConfig(**{**semantic, "n_quantizers": 2})


# --------------------------------------------------------------------------------------------
# The rules, with the real snakemake


def _snakemake(workdir: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_rules_rerun_extraction_on_codec_change_not_on_vocab_change(tmp_path, weights):
    """extract_codes + index_codes through snakemake on a hand-made corpus: then a vocabulary
    change leaves the codes alone, a codec change re-extracts every shard."""
    lines = []
    for i in range(6):
        sr = (16000, 22050)[i % 2]
        path = write_wav(tmp_path / "wavs" / f"u{i}.wav", 1.2 + 0.25 * i, sr, channels=1 + (i == 3), seed=i)
        lines.append(json.dumps({"id": f"u{i}", "audio": str(path), "text": "ሰላም ነው ዛሬ", "speaker": f"s{i % 2}"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["demo"]["enabled"] = False
    cfg["data"]["manifests"] = [str(tmp_path / "manifest.jsonl")]
    cfg["codec"] = {"weights": str(weights), "device": "cpu"}
    cfg["codes"]["n_shards"] = 2

    def write_config() -> None:
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")

    write_config()
    _snakemake(tmp_path, "results/codes/index.json")
    index = json.loads((tmp_path / "results" / "codes" / "index.json").read_text())
    assert index["totals"]["rows"] == 6 and index["codec"]["n_q"] == 3
    shard0 = tmp_path / "results" / "codes" / "shard-00000-of-00002.parquet"
    assert (tmp_path / "logs" / "codes" / "shard-00000.log").read_text().count("encoded") == 1

    cfg["vocab"]["vocab_size"] = cfg["vocab"]["vocab_size"] + 1
    write_config()
    assert "Nothing to be done" in _snakemake(tmp_path, "-n", "results/codes/index.json")

    cfg["codec"]["n_quantizers"] = 2
    write_config()
    plan = _snakemake(tmp_path, "-n", "results/codes/index.json")
    assert re.search(r"extract_codes\s+2\b", plan) and re.search(r"index_codes\s+1\b", plan), plan
    _snakemake(tmp_path, "results/codes/index.json")
    assert read_shard_codes(shard0).n_q == 2


@pytest.mark.slow
@pytest.mark.integration
def test_semantic_extraction_of_the_demo_corpus_through_the_rules(tmp_path):
    """codec.kind semantic with the tiny w2v-BERT and codec, through the real snakemake: the demo
    corpus goes to one stream of codes at 50 frames/s with stored prompt features; batched and
    one-at-a-time extraction write the same shard bytes; a forced rerun writes the same bytes."""
    import shutil

    from indextts.audio.w2v_bert import w2v_bert_frames
    from indextts.features import PromptFeatureStore
    from indextts.audio.semantic_codec import TINY_CODEC, make_tiny_semantic
    from tests.workflow_util import copy_workflow, edit_config, planned_jobs, snakemake

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install puts it there)")
    (tmp_path / "wf").mkdir()
    wd = copy_workflow(tmp_path / "wf")
    codec = make_tiny_semantic(tmp_path / "models")

    def semantic(cfg, batch_seconds=0.0):
        cfg["demo"]["n_utterances"] = 40
        cfg["codec"] = codec
        cfg["features"] = {"store": True, "max_ref_seconds": 2.0}
        cfg["codes"].update(n_shards=2, batch_seconds_cpu=batch_seconds, max_batch_size=16)

    edit_config(wd, semantic)
    # After an option of one value: the helpers end their command line with --resources, whose
    # values would take a bare target.
    target = ("--cores", "2", "results/codes/index.json")
    snakemake(wd, *target)
    codes_dir = wd / "results" / "codes"
    index = json.loads((codes_dir / "index.json").read_text())
    assert index["codec"]["kind"] == "semantic" and index["codec"]["n_q"] == 1
    assert index["codec"]["codebook_size"] == TINY_CODEC.codebook_size and index["codec"]["frame_rate"] == 50.0
    assert index["totals"]["rows"] == 40 and index["totals"]["rejected"] == 0
    assert index["frame_check"]["max_abs_diff_frames"] < 2.0
    clean = pq.read_table(wd / "results/clean/clean.parquet").to_pandas().set_index("utt_id")
    shards = sorted(codes_dir.glob("shard-*.parquet"))
    features = [codes_dir / "features" / s.name for s in shards]
    store = PromptFeatureStore(features)
    assert len(store) == 40 and store.dim == 32
    for s in shards:
        sc = read_shard_codes(s)
        for j, utt in enumerate(sc.meta["utt_id"]):
            wave = read_audio(clean.loc[utt, "audio_path"], 16000)
            assert sc.codes(j).shape == (1, w2v_bert_frames(len(wave)))
            assert abs(sc.codes(j).shape[1] - clean.loc[utt, "duration"] * 50) < 2
            assert len(store.get(utt)) == min(sc.codes(j).shape[1], 100)
    outputs = sorted(codes_dir.rglob("*.parquet")) + [codes_dir / "index.json"]
    first = {p.relative_to(codes_dir): sha256_file(p) for p in outputs}
    first_feats = {u: store.get(u) for u in clean.index}
    assert planned_jobs(wd, *target) == {}

    # The same shards when forced to run again, and when batched (a runtime knob: no rerun by itself).
    snakemake(wd, "--forcerun", "extract_codes", *target)
    assert {p.relative_to(codes_dir): sha256_file(p) for p in outputs} == first
    edit_config(wd, lambda cfg: semantic(cfg, batch_seconds=30.0))
    assert planned_jobs(wd, *target) == {}
    snakemake(wd, "--forcerun", "extract_codes", *target)
    log = (wd / "logs/codes/shard-00000.log").read_text()
    utterances, batches = re.search(r"(\d+) utterances .* \((\d+) batches", log).groups()
    assert int(batches) < int(utterances)  # it did batch
    assert {Path(s.name): sha256_file(s) for s in shards} == {Path(s.name): first[Path(s.name)] for s in shards}
    store = PromptFeatureStore(features)
    for u, f in first_feats.items():
        np.testing.assert_allclose(store.get(u), f, atol=2e-3, rtol=2e-3)

    # A w2v-BERT change re-encodes; a vocabulary change does not.
    edit_config(wd, lambda cfg: cfg["vocab"].update(vocab_size=cfg["vocab"]["vocab_size"] + 1))
    assert not {"extract_codes", "index_codes"} & set(planned_jobs(wd, *target))
    edit_config(wd, lambda cfg: cfg["codec"].update(w2v_bert_layer=1))
    assert planned_jobs(wd, *target) == {"extract_codes": 2, "index_codes": 1}
