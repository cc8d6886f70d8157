"""Reference measures (MCD-DTW, log-F0 RMSE, voicing error, text retrieval) on real speech, and
the bootstrap summaries.

The speech is espeak-ng Amharic, made once per module: eight sentences in one voice (the
"real recordings"), three of them again in another prosody (slower and higher: what a model
that reads the text would produce) and one only slower (a time-stretched copy). Clips are
analysed with DIO, about four times faster than the default Harvest; Harvest has its own test.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import soundfile as sf

from indextts.config import ConfigError, parse_section
from indextts.evaluation.acoustic import (
    AcousticConfig,
    AcousticFeatures,
    FeatureCache,
    compare,
    extract,
    features_of,
    load_audio,
    mcd_dtw,
    retrieve,
)
from indextts.evaluation.stats import bootstrap_summary, rate_summary

if shutil.which("espeak-ng") is None:  # `make test` installs it; say so instead of skipping silently
    pytest.skip("espeak-ng is not installed (make install puts it there)", allow_module_level=True)

SENTENCES = [
    "ሰላም ለዓለም ዛሬ ጥሩ ቀን ነው",
    "ኢትዮጵያ በአፍሪካ ቀንድ የምትገኝ ሀገር ናት",
    "አዲስ አበባ የኢትዮጵያ ዋና ከተማ ናት",
    "ቡና በጠዋት መጠጣት እወዳለሁ",
    "ልጆቹ በትምህርት ቤት ውስጥ ይማራሉ",
    "ዝናብ ከሰማይ በብዛት እየዘነበ ነው",
    "እናቴ ጣፋጭ ምግብ አዘጋጀች",
    "የአባይ ወንዝ በጣም ረጅም ነው",
]
N_QUERIES = 3  # sentences also spoken in the other prosody
CFG = AcousticConfig(f0_method="dio")
MCD_SCALE = 10 / math.log(10) * math.sqrt(2)


def _espeak(path, text, *args):
    subprocess.run(["espeak-ng", "-v", "am", *args, "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Paths (22.05 kHz wavs): ``real`` (one per sentence, espeak-ng's default prosody),
    ``other`` (the first N_QUERIES sentences at -s 130 -p 70), ``slow`` (sentence 0 at -s 120)."""
    root = tmp_path_factory.mktemp("acoustic")
    return {
        "real": [_espeak(root / f"real{i}.wav", t) for i, t in enumerate(SENTENCES)],
        "other": [_espeak(root / f"other{i}.wav", t, "-s", "130", "-p", "70")
                  for i, t in enumerate(SENTENCES[:N_QUERIES])],
        "slow": _espeak(root / "slow0.wav", SENTENCES[0], "-s", "120"),
    }


@pytest.fixture(scope="module")
def feats():
    return FeatureCache(CFG)


def _with_noise(x, snr_db, seed):
    noise = np.random.default_rng(seed).standard_normal(x.size)
    return x + noise * np.sqrt(np.mean(x**2) / np.mean(noise**2) / 10 ** (snr_db / 10))


# --- features -------------------------------------------------------------------------------------


def test_features_follow_espnets_table_and_the_frame_shift(clips, feats):
    f = feats(clips["real"][0])
    seconds = sf.info(str(clips["real"][0])).duration
    assert f.mcep.shape == (len(f.f0), 24) and f.mcep.dtype == np.float64  # order 23 at 16 kHz, c0 first
    assert abs(len(f.f0) - seconds * 200) <= 2  # 5 ms frames
    assert f.seconds == pytest.approx(seconds, abs=1 / 16000)
    assert 0.3 < np.mean(f.f0 > 0) < 0.95 and 60 <= f.f0[f.f0 > 0].min() and f.f0.max() <= 600
    assert AcousticConfig(sample_rate=22050).mcep_params == (34, 0.45)
    assert AcousticConfig(sample_rate=8000, mcep_dim=12, mcep_alpha=0.31).mcep_params == (12, 0.31)


def test_a_file_at_22khz_and_the_same_audio_written_at_16khz_give_nearly_equal_features(clips, feats, tmp_path):
    import librosa

    x, sr = sf.read(str(clips["real"][0]), dtype="float64")
    # Another resampler than load_audio's (soxr, not scipy), so the two band edges differ.
    path16 = tmp_path / "real0_16k.wav"
    sf.write(str(path16), librosa.resample(x, orig_sr=sr, target_sr=16000, res_type="soxr_hq"), 16000, subtype="FLOAT")
    a, b = feats(clips["real"][0]), features_of(path16, CFG)
    assert a.mcep.shape == b.mcep.shape and a.seconds == pytest.approx(b.seconds, abs=1e-3)
    got = compare(b, a)
    assert got["mcd"] < 0.6, got  # against 4+ dB for the same text in another prosody
    assert got["log_f0_rmse"] < 0.01 and got["vuv_error"] < 0.01 and got["duration_ratio"] == pytest.approx(1, abs=1e-3)
    # Without the band limit the two resamplers' band edges alone cost dBs (ESPnet's full band).
    full = AcousticConfig(f0_method="dio", band_limit=None)
    assert mcd_dtw(features_of(path16, full), features_of(clips["real"][0], full)) > 3 * got["mcd"]


def test_load_audio_downmixes_and_names_a_bad_file(tmp_path):
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(str(tmp_path / "stereo.wav"), np.stack([tone, np.zeros_like(tone)], axis=1), 8000, subtype="FLOAT")
    x = load_audio(tmp_path / "stereo.wav", 8000)
    assert x.dtype == np.float64 and x.shape == (8000,) and np.allclose(x, tone / 2, atol=1e-6)
    assert load_audio(tmp_path / "stereo.wav", 16000).shape == (16000,)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match="bad.wav"):
        features_of(tmp_path / "bad.wav", CFG)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav", 16000)
    with pytest.raises(ValueError, match="no samples"):
        extract(np.zeros(0), CFG)


def test_feature_cache_analyses_a_file_once(clips):
    cache = FeatureCache(CFG)
    path = clips["real"][1]
    first = cache(path)
    assert cache(path.parent / ".." / path.parent.name / path.name) is first and len(cache) == 1


# --- MCD, F0, voicing -----------------------------------------------------------------------------


def test_mcd_matches_espnets_formula_and_ignores_c0():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 24))
    louder = ref.copy()
    louder[:, 0] += 5.0  # c0 is log energy: loudness is not a distortion
    shifted = louder.copy()
    shifted[:, 3] += 0.1
    f0 = np.zeros(50)
    r = AcousticFeatures(ref, f0, 0.25)
    assert mcd_dtw(AcousticFeatures(louder, f0, 0.25), r) == 0.0
    # Equal lengths and a uniform offset: DTW keeps the diagonal, every frame is 0.1 apart.
    assert mcd_dtw(AcousticFeatures(shifted, f0, 0.25), r) == pytest.approx(MCD_SCALE * 0.1)
    with pytest.raises(ValueError, match="orders"):
        mcd_dtw(r, AcousticFeatures(ref[:, :10], f0, 0.25))


@pytest.mark.parametrize("method", ["dio", "harvest"])
def test_a_clip_against_itself_scores_zero(clips, feats, method):
    f = feats(clips["real"][0]) if method == "dio" else features_of(clips["real"][0], AcousticConfig(f0_method=method))
    assert compare(f, f) == {"mcd": 0.0, "log_f0_rmse": 0.0, "vuv_error": 0.0, "duration_ratio": 1.0}
    assert mcd_dtw(f, f) == 0.0


def test_mcd_grows_with_noise(clips, feats):
    x = load_audio(clips["real"][0], CFG.sample_rate)
    ref = feats(clips["real"][0])
    quiet, loud = (mcd_dtw(extract(_with_noise(x, snr, seed=1), CFG), ref) for snr in (40, 20))
    assert 0 < quiet < loud, (quiet, loud)


def test_dtw_brings_a_slower_reading_of_the_text_much_nearer_than_another_sentence(clips, feats):
    ref = feats(clips["real"][0])
    slow = feats(clips["slow"])
    got = compare(slow, ref)
    others = [mcd_dtw(feats(p), ref) for p in clips["real"][1:]]
    assert got["mcd"] < 0.6 * min(others), (got, others)
    assert got["mcd"] == pytest.approx(mcd_dtw(slow, ref))
    seconds = [sf.info(str(p)).duration for p in (clips["slow"], clips["real"][0])]
    assert got["duration_ratio"] == pytest.approx(seconds[0] / seconds[1], rel=1e-3)
    assert got["duration_ratio"] > 1.2  # espeak-ng -s 120 against its default 175 words/min
    assert got["log_f0_rmse"] < 0.15 and got["vuv_error"] < 0.15


def test_log_f0_rmse_is_nan_when_no_frame_is_voiced_in_both(clips, feats):
    ref = feats(clips["real"][0])
    noise = extract(np.random.default_rng(2).standard_normal(16000) * 0.1, CFG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-mean warnings
        got = compare(noise, ref)
        unvoiced = compare(AcousticFeatures(noise.mcep, np.zeros_like(noise.f0), noise.seconds), ref)
    assert math.isnan(got["log_f0_rmse"]) or got["log_f0_rmse"] >= 0
    assert math.isnan(unvoiced["log_f0_rmse"]) and 0 < unvoiced["vuv_error"] < 1 and math.isfinite(unvoiced["mcd"])
    assert got["mcd"] > 2 * compare(feats(clips["slow"]), ref)["mcd"]


# --- text retrieval -------------------------------------------------------------------------------


@pytest.mark.parametrize("query", range(N_QUERIES))
def test_retrieval_finds_the_text_of_a_reading_in_another_prosody(clips, feats, query):
    gen = feats(clips["other"][query])
    # Rotate the candidates so that the target sits at a different index for every query.
    order = np.roll(np.arange(len(SENTENCES)), 3 * query + 2)
    candidates = [feats(clips["real"][i]) for i in order]
    target = int(np.flatnonzero(order == query)[0])
    got = retrieve(gen, candidates, target)
    assert got["hit"] and got["rank"] == 1 and got["n"] == len(SENTENCES), got
    assert got["mcd_to_target"] < got["mcd_best_other"]
    # Against the wrong text the same query is not a hit.
    wrong = retrieve(gen, candidates, (target + 1) % len(candidates))
    assert not wrong["hit"] and wrong["rank"] > 1 and wrong["mcd_best_other"] == pytest.approx(got["mcd_to_target"])


def test_retrieve_ranks_ties_by_position_and_checks_its_arguments():
    rng = np.random.default_rng(0)
    f0 = np.zeros(20)
    gen = AcousticFeatures(rng.standard_normal((20, 5)), f0, 0.1)
    far = AcousticFeatures(gen.mcep + 1.0, f0, 0.1)
    cands = [far, gen, gen, far]  # two exact copies: a tie
    assert retrieve(gen, cands, 1) == {"hit": True, "rank": 1, "n": 4, "mcd_to_target": 0.0, "mcd_best_other": 0.0}
    assert retrieve(gen, cands, 2)["rank"] == 2 and not retrieve(gen, cands, 2)["hit"]
    assert retrieve(gen, cands, 0)["rank"] == 3
    assert math.isnan(retrieve(gen, [far], 0)["mcd_best_other"])
    with pytest.raises(ValueError, match="target 4"):
        retrieve(gen, cands, 4)
    with pytest.raises(ValueError, match="no candidates"):
        retrieve(gen, [], 0)


# --- config ---------------------------------------------------------------------------------------


def test_config_errors_name_every_bad_key_at_once():
    with pytest.raises(ConfigError) as e:
        AcousticConfig(frame_shift_ms=0, f0_floor=300, f0_ceil=200, mcep_alpha=1.5, band_limit=1.2)
    msg = str(e.value)
    for key in ("frame_shift_ms", "f0_ceil", "mcep_alpha", "band_limit"):
        assert f"eval.acoustic.{key}" in msg, msg
    with pytest.raises(ConfigError, match=r"eval\.acoustic\.sample_rate.*mcep_dim"):
        AcousticConfig(sample_rate=8000)
    with pytest.raises(ConfigError, match=r"eval\.acoustic\.f0_ceil.*half"):
        AcousticConfig(sample_rate=16000, f0_ceil=9000.0)
    with pytest.raises(ConfigError, match=r"eval\.acoustic\.f0_method"):
        parse_section(AcousticConfig, {"f0_method": "crepe"}, "eval.acoustic")
    cfg = parse_section(AcousticConfig, {"sample_rate": 24000, "band_limit": None}, "eval.acoustic")
    assert cfg.mcep_params == (34, 0.46) and cfg.band_limit is None


# --- statistics -----------------------------------------------------------------------------------


def test_bootstrap_summary_is_reproducible_and_brackets_the_mean():
    values = np.random.default_rng(0).normal(5.0, 1.0, size=40).tolist()
    a = bootstrap_summary(values, seed=7)
    assert a == bootstrap_summary(values, seed=7)
    assert a != bootstrap_summary(values, seed=8)  # other draws, other interval ends
    assert a["n"] == 40 and a["mean"] == pytest.approx(np.mean(values))
    assert a["median"] == pytest.approx(np.median(values))
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    half = 1.96 * np.std(values, ddof=1) / math.sqrt(40)  # the normal interval, for scale
    assert a["ci_high"] - a["ci_low"] == pytest.approx(2 * half, rel=0.2)
    assert bootstrap_summary(values + [math.nan, math.nan], seed=7) == a


def test_bootstrap_summary_of_no_value_and_of_one():
    empty = {"n": 0, "mean": None, "median": None, "ci_low": None, "ci_high": None}
    assert bootstrap_summary([math.nan], seed=0) == bootstrap_summary([], seed=0) == empty
    one = {"n": 1, "mean": 2.5, "median": 2.5, "ci_low": 2.5, "ci_high": 2.5}
    assert bootstrap_summary([2.5, math.nan], seed=0) == one
    with pytest.raises(ValueError, match="level"):
        bootstrap_summary([1.0, 2.0], seed=0, level=95)


def test_rate_summary_on_known_flags():
    got = rate_summary([True] * 6 + [False] * 14, seed=0)
    assert got["n"] == 20 and got["k"] == 6 and got["mean"] == pytest.approx(0.3) and got["median"] == 0.0
    assert 0.05 < got["ci_low"] < 0.3 < got["ci_high"] < 0.55
    every = {"n": 5, "k": 5, "mean": 1.0, "median": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    assert rate_summary([True] * 5, seed=0) == every
    assert rate_summary([], seed=0)["n"] == 0 and rate_summary([], seed=0)["k"] == 0
