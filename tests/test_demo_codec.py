"""indextts.demo_codec: the demo's DAC trained from scratch, its scores, and the committed fp16 file."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import indextts.demo_codec as demo_codec
from indextts.audio.dac import CodecLoadError, decode_codes, encode_batch, load_codec
from indextts.config import ConfigError
from indextts.demo_codec import (
    PACKAGED_WEIGHTS,
    DemoCodecConfig,
    install_packaged_codec,
    output_paths,
    read_utterances,
    split_utterances,
    train_demo_codec,
)
from indextts.files import sha256_file
from tests.factories import write_clean

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # DAC's old weight_norm API
    pytest.mark.filterwarnings("ignore::UserWarning"),  # audiotools' optional backends
    pytest.mark.usefixtures("one_torch_thread"),
]

# The committed architecture, trained on short crops so that a step takes ~0.1 s.
TINY = DemoCodecConfig(steps=40, batch_size=4, crop_seconds=(0.2, 0.3), log_every=10, n_heldout=2)


def quiet(_: str) -> None:
    pass


def make_corpus(root: Path, *, n_speakers: int = 2, per_speaker: int = 4, sr: int = 22050) -> Path:
    """A clean.parquet of voiced-like clips at espeak-ng's 22.05 kHz (so the resample runs): a
    harmonic tone per speaker with a syllable-rate envelope and a noise burst; the last clip of
    each speaker is val."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(n_speakers):
        for j in range(per_speaker):
            dur = 1.0 + 0.1 * j
            t = np.arange(int(dur * sr)) / sr
            f0 = 110 + 70 * s + 8 * j
            env = np.clip(np.sin(2 * np.pi * (3 + 0.5 * j) * t), 0, None)
            wave = sum(0.3 / h * np.sin(2 * np.pi * h * f0 * t) for h in range(1, 6)) * env
            wave = wave + 0.02 * rng.standard_normal(len(t)) * (1 - env)
            path = root / f"s{s}_u{j}.wav"
            sf.write(path, wave.astype(np.float32), sr)
            rows.append({"utt_id": f"s{s}_u{j}", "audio_path": str(path), "text": f"text {j}", "raw_text": f"text {j}",
                         "speaker": f"spk{s}", "language": "am", "emotion": "neutral", "duration": dur,
                         "sample_rate": sr, "channels": 1, "split": "val" if j == per_speaker - 1 else "train"})
    return write_clean(root / "clean.parquet", rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("codec") / "codec.pth"
    return out, train_demo_codec(corpus, out, TINY, log=quiet, progress=False)


def test_training_lowers_the_loss_and_writes_a_dac_file_with_log_and_scores(trained):
    weights, report = trained
    log = [json.loads(line) for line in output_paths(weights)["log"].read_text().splitlines()]
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["mel"] < 0.9 * train[0]["mel"], [r["mel"] for r in train]
    assert train[-1]["loss"] < train[0]["loss"], [r["loss"] for r in train]
    for r in train:  # each term logged on its own, and they make up the loss
        assert r["loss"] == pytest.approx(15 * r["mel"] + 0.25 * r["commitment"] + r["codebook"], rel=1e-4)
    scores = json.loads(output_paths(weights)["scores"].read_text())
    assert scores["weights_sha256"] == sha256_file(weights) == report["weights_sha256"]
    # val rows only are scored, never trained on; each has a floor of its speaker with other text
    assert scores["data"]["n_train"] == 6 and sorted(scores["data"]["heldout_ids"]) == ["s0_u3", "s1_u3"]
    assert scores["n"] == scores["n_floor"] == 2
    for r in scores["per_utterance"]:
        assert r["floor_utt_id"].split("_")[0] == r["utt_id"].split("_")[0] != r["floor_utt_id"]
    for part in ("topline", "floor"):
        assert all(math.isfinite(scores[part][k]) for k in ("mcd_frame", "mcd_dtw", "vuv_error"))
    assert [c["step"] for c in scores["checkpoints"]] == [40]
    assert not output_paths(weights)["resume"].exists()


def test_the_file_is_dac_format_fp16_and_loads_exactly(trained):
    weights, _ = trained
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    assert set(blob) == {"state_dict", "metadata"}
    assert {v.dtype for v in blob["state_dict"].values()} == {torch.float16}
    assert blob["metadata"]["kwargs"]["encoder_rates"] == [2, 4, 4, 10]
    model, info = load_codec(weights)
    assert (info.sample_rate, info.hop_length, info.n_q, info.codebook_size) == (16000, 320, 4, 256)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with warnings.catch_warnings():  # DAC's own loader reads it too (and casts on copy)
        warnings.simplefilter("ignore")
        import dac

        theirs = dac.DAC.load(str(weights))
    ours = dict(model.named_parameters())
    assert torch.equal(theirs.quantizer.quantizers[0].codebook.weight, ours["quantizer.quantizers.0.codebook.weight"])
    rng = np.random.default_rng(1)
    for n in (16000, 12345, 320):
        wave = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.1)
        codes = encode_batch(model, wave[None, None], [n])[0]
        assert codes.shape == (4, math.ceil(n / 320))
        assert decode_codes(model, codes).shape == (codes.shape[1] * 320,)


def test_same_seed_same_bytes_and_resume_equals_one_run(corpus, tmp_path, monkeypatch):
    # the cosine schedule, as the committed codec was trained: a resumed run follows it too
    cfg = replace(TINY, steps=6, log_every=3, save_every=3, lr_schedule="cosine", min_lr_ratio=0.1)
    a = train_demo_codec(corpus, tmp_path / "a.pth", cfg, log=quiet, progress=False)
    # another file name, and scoring a checkpoint on the way draws from no generator the run uses
    b = train_demo_codec(corpus, tmp_path / "other_name.pth", replace(cfg, eval_every=3), log=quiet, progress=False)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert [c["step"] for c in b["checkpoints"]] == [3, 6]
    c = train_demo_codec(corpus, tmp_path / "c.pth", replace(cfg, seed=1), log=quiet, progress=False)
    assert c["weights_sha256"] != a["weights_sha256"]

    save = demo_codec._save_resume

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_codec, "_save_resume", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_demo_codec(corpus, tmp_path / "r.pth", cfg, log=quiet, progress=False)
    monkeypatch.setattr(demo_codec, "_save_resume", save)
    assert output_paths(tmp_path / "r.pth")["resume"].exists() and not (tmp_path / "r.pth").exists()
    lines: list[str] = []
    r = train_demo_codec(corpus, tmp_path / "r.pth", cfg, log=lines.append, progress=False)
    assert any("resuming at step 3" in line for line in lines)
    assert r["weights_sha256"] == a["weights_sha256"]
    logs = [[json.loads(x)["loss"] for x in output_paths(tmp_path / n)["log"].read_text().splitlines()
             if json.loads(x)["kind"] == "train"] for n in ("a.pth", "r.pth")]
    assert logs[0] == logs[1]
    lrs = [json.loads(x)["lr"] for x in output_paths(tmp_path / "r.pth")["log"].read_text().splitlines()
           if json.loads(x)["kind"] == "train"]
    assert lrs == [cfg.lr_at(3), cfg.lr_at(6)] and lrs[0] > lrs[1]


def test_cosine_schedule_anneals_from_lr_to_its_floor():
    cfg = replace(TINY, steps=100, lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1)
    assert cfg.lr_at(1) == pytest.approx(1e-3) and cfg.lr_at(100) == pytest.approx(1e-4, rel=1e-2)
    assert cfg.lr_at(51) == pytest.approx(0.55e-3)  # halfway: halfway between lr and the floor
    lrs = [cfg.lr_at(k) for k in range(1, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert {replace(TINY, lr=2e-3).lr_at(k) for k in (1, 50, 100)} == {2e-3}  # constant: the default
    with pytest.raises(ConfigError, match="lr_schedule.*min_lr_ratio|min_lr_ratio"):
        DemoCodecConfig(lr_schedule="linear", min_lr_ratio=2.0)


def test_packaged_codec_loads_and_its_scores_show_a_codec(tmp_path):
    scores = json.loads(output_paths(PACKAGED_WEIGHTS)["scores"].read_text())
    assert scores["weights_sha256"] == sha256_file(PACKAGED_WEIGHTS)
    assert scores["dtype"] == "fp16" and PACKAGED_WEIGHTS.stat().st_size < 1.5e6
    _, info = load_codec(PACKAGED_WEIGHTS)
    assert (info.sample_rate, info.hop_length, info.n_q) == (16000, 320, scores["dac_kwargs"]["n_codebooks"])
    top, floor = scores["topline"], scores["floor"]
    assert top["mcd_frame"] < floor["mcd_frame"] and top["mcd_dtw"] < floor["mcd_dtw"], (top, floor)
    assert scores["n"] >= 20 and scores["checkpoints"][-1]["step"] == scores["config"]["steps"]
    assert output_paths(PACKAGED_WEIGHTS)["log"].is_file()

    out = tmp_path / "demo" / "codec.pth"
    install_packaged_codec(out)
    assert sha256_file(out) == scores["weights_sha256"]
    assert json.loads(output_paths(out)["scores"].read_text()) == scores and output_paths(out)["log"].is_file()
    bad = tmp_path / "bad" / PACKAGED_WEIGHTS.name
    bad.parent.mkdir()
    bad.write_bytes(PACKAGED_WEIGHTS.read_bytes()[:-10])
    output_paths(bad)["scores"].write_text(json.dumps(scores))
    with pytest.raises(ValueError, match="sha256"):
        install_packaged_codec(tmp_path / "x.pth", weights=bad)


def test_load_codec_refuses_integer_tensors(trained, tmp_path):
    weights, _ = trained
    blob = torch.load(weights, map_location="cpu", weights_only=True)
    key = next(iter(blob["state_dict"]))
    blob["state_dict"][key] = blob["state_dict"][key].to(torch.int16)
    torch.save(blob, tmp_path / "int.pth")
    with pytest.raises(CodecLoadError, match="not floating point"):
        load_codec(tmp_path / "int.pth")


def test_config_names_every_bad_field():
    with pytest.raises(ConfigError) as e:
        DemoCodecConfig(encoder_rates=(2, 4, 5, 8), decoder_rates=(8, 5, 4, 2), steps=0, crop_seconds=(0.05, 1.0))
    msg = str(e.value)
    for name in ("encoder_rates: odd strides [5]", "steps:", "crop_seconds:"):
        assert name in msg, msg


def test_jsonl_manifest_skips_dirty_rows_and_holds_out_by_seed(tmp_path):
    wav = tmp_path / "wavs" / "a.wav"
    wav.parent.mkdir()
    sf.write(wav, np.zeros(22050, dtype=np.float32), 22050)
    rows = [{"id": f"u{i}", "audio": "wavs/a.wav", "text": f"t{i % 3}", "speaker": f"s{i % 2}"} for i in range(8)]
    lines = [json.dumps(r) for r in rows] + [
        "{not json", json.dumps({"id": "gone", "audio": "wavs/none.wav", "text": "t", "speaker": "s0"}),
        json.dumps({"id": "quiet", "audio": "wavs/a.wav", "text": "", "speaker": "s0"}), json.dumps(rows[0])]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    said: list[str] = []
    utts = read_utterances(tmp_path / "manifest.jsonl", log=said.append)
    assert [u.utt_id for u in utts] == [f"u{i}" for i in range(8)] and "skipped 4 rows" in said[0]
    split = split_utterances(utts, 3, seed=0)
    assert split == split_utterances(utts, 3, seed=0)
    assert len(split.heldout) == 3 and not {u.utt_id for u in split.heldout} & {u.utt_id for u in split.train}
    for u, f in zip(split.heldout, split.floors):
        assert f.speaker == u.speaker and f.text != u.text
