"""indextts.evaluation.asr / speaker / probe: the model-based measures. Tiny random models are
written with ``save_pretrained`` and load through the same code path as a real folder, with every
socket failing while they load and run."""

from __future__ import annotations

import functools
import json
import shutil
import socket
from itertools import groupby
from pathlib import Path

import numpy as np
import pytest
import torch

from indextts.evaluation.asr import (
    AsrConfig,
    AsrModel,
    EvalModelError,
    error_rates,
    make_random_ctc,
    make_random_whisper,
    pool_error_rates,
    space_separated,
)
from indextts.evaluation.probe import probe_accuracy
from indextts.evaluation.speaker import SpeakerConfig, SpeakerModel, cosine, make_random_xvector
from indextts.text import TextConfig, normalize_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CTC_CHARS = "abcdefgh"
MMS_CHARS = {"amh": "abcdefgh", "kor": "ijklmnopq"}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test; the hub's offline switches are off, so
    only local_files_only keeps transformers from trying."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    return {
        "ctc": make_random_ctc(root / "ctc", vocab=CTC_CHARS),
        "ctc_group": make_random_ctc(root / "ctc_group", feat_extract_norm="group", do_stable_layer_norm=False),
        "mms": make_random_ctc(root / "mms", vocab=MMS_CHARS),
        "whisper": make_random_whisper(root / "whisper"),
        "xvector": make_random_xvector(root / "xvector"),
        "xvector_layer": make_random_xvector(root / "xvector_layer", feat_extract_norm="layer",
                                             do_stable_layer_norm=True),
    }


def waves(seed: int = 0, lengths=(3000, 5000, 800)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * np.sin(2 * np.pi * (150 + 40 * i) * np.arange(n) / 16000) + 0.1 * rng.standard_normal(n))
            .astype(np.float32) for i, n in enumerate(lengths)]


def test_the_fixture_refuses_connections(no_network):
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.socket().connect(("127.0.0.1", 9))


# --- ASR: CTC -----------------------------------------------------------------------------------------


def reference_ctc(folder: Path, clip: np.ndarray) -> str:
    """Greedy CTC spelled out on a direct Wav2Vec2ForCTC call: argmax, merge repeats, drop blanks."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    model = Wav2Vec2ForCTC.from_pretrained(folder, local_files_only=True).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
    vocab = {i: t for t, i in json.loads((folder / "vocab.json").read_text()).items()}
    with torch.no_grad():
        ids = model(**fe(clip, sampling_rate=16000, return_tensors="pt")).logits[0].argmax(-1).tolist()
    chars = [vocab[i] for i, _ in groupby(ids) if vocab[i] != "<pad>"]
    return " ".join("".join(" " if c == "|" else c for c in chars if c not in ("<s>", "</s>", "<unk>")).split())


def test_ctc_loads_offline_and_transcribes_a_batch_as_each_clip_alone(folders, no_network):
    asr = AsrModel(AsrConfig(path=str(folders["ctc"]), kind="ctc", batch_size=8))
    assert asr.sample_rate == 16000 and asr.name == "ctc (ctc)" and asr._exact_batches
    clips = waves()
    texts = asr.transcribe(clips)
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert set("".join(texts)) <= set(CTC_CHARS + " ")
    assert asr.transcribe(clips) == texts  # deterministic
    assert [asr.transcribe([c])[0] for c in clips] == texts  # padding changes no row
    assert [reference_ctc(folders["ctc"], c) for c in clips] == texts
    # No frame at all (receptive field 20 samples) or no samples: nothing was said.
    assert asr.transcribe([clips[0][:10], np.zeros(0, np.float32), clips[1]]) == ["", "", texts[1]]


def test_group_normalised_ctc_runs_one_clip_at_a_time(folders, no_network):
    asr = AsrModel(AsrConfig(path=str(folders["ctc_group"]), kind="ctc", batch_size=8))
    assert not asr._exact_batches
    clips = waves(1)
    texts = asr.transcribe(clips)
    assert texts == [reference_ctc(folders["ctc_group"], c) for c in clips]


def test_mms_adapter_and_vocabulary_follow_the_language(folders, no_network, tmp_path):
    clips = waves(2)
    out = {}
    for lang, chars in MMS_CHARS.items():
        asr = AsrModel(AsrConfig(path=str(folders["mms"]), kind="ctc", language=lang))
        assert asr.name == f"mms (ctc, {lang})" and asr.model.target_lang == lang
        out[lang] = asr.transcribe(clips)
        assert set("".join(out[lang])) <= set(chars + " ") and "".join(out[lang]), lang
    with pytest.raises(EvalModelError, match=r"eval.asr.language: .*mms is a multi-language CTC model.*amh, kor"):
        AsrModel(AsrConfig(path=str(folders["mms"]), kind="ctc"))
    with pytest.raises(EvalModelError, match=r"eval.asr.language: .*one of its 2 languages \(amh, kor\), got 'tir'"):
        AsrModel(AsrConfig(path=str(folders["mms"]), kind="ctc", language="tir"))
    partial = shutil.copytree(folders["mms"], tmp_path / "mms_partial")
    (partial / "adapter.kor.safetensors").unlink()
    with pytest.raises(EvalModelError, match=r"no adapter.kor.safetensors \(adapters for: amh\)"):
        AsrModel(AsrConfig(path=str(partial), kind="ctc", language="kor"))


# --- ASR: Whisper -------------------------------------------------------------------------------------


def test_whisper_loads_offline_and_transcribes_short_and_long_clips(folders, no_network):
    cfg = AsrConfig(path=str(folders["whisper"]), kind="whisper", language="korean", max_new_tokens=8, batch_size=2)
    asr = AsrModel(cfg)
    assert asr.sample_rate == 16000 and asr.name == "whisper (whisper, korean)" and asr._language == "<|ko|>"
    calls = []
    generate = asr._whisper_generate
    asr._whisper_generate = lambda clips, long_form: calls.append((len(clips), long_form)) or generate(clips, long_form)
    # The tiny model's window is 1 s: 24000 samples take the long-form path, in a batch of its own.
    clips = waves(3, lengths=(8000, 12000, 16000, 24000)) + [np.zeros(0, np.float32)]
    texts = asr.transcribe(clips)
    assert calls == [(2, False), (1, False), (1, True)]
    assert len(texts) == 5 and all(isinstance(t, str) for t in texts) and texts[4] == ""
    assert asr.transcribe(clips) == texts
    assert [asr.transcribe([c])[0] for c in clips] == texts
    for spelled in ("ko", "<|ko|>", "Korean"):
        assert AsrModel(AsrConfig(path=cfg.path, language=spelled, max_new_tokens=8))._language == "<|ko|>"


def test_whisper_settings_the_model_lacks_are_errors_naming_the_key(folders, no_network):
    path = str(folders["whisper"])
    with pytest.raises(EvalModelError, match=r"eval.asr.language: 'klingon' is not a language of .*whisper"):
        AsrModel(AsrConfig(path=path, language="klingon"))
    with pytest.raises(EvalModelError, match=r"eval.asr.max_new_tokens: 200 is more than .* can decode \(60"):
        AsrModel(AsrConfig(path=path, language="ko"))


# --- ASR: error rates ---------------------------------------------------------------------------------


def test_known_edits_give_the_exact_cer_and_spaces_do_not_count():
    same = lambda s: s  # noqa: E731
    r = error_rates("abxdefg", "abcdef", same, words=False)  # one substitution, one insertion
    assert r == {"cer": 2 / 6, "wer": None, "ref_chars": 6, "edits": 2, "ref_words": None, "word_edits": None}
    # Spacing is word segmentation: CER ignores it, WER does not (3 words, 2 substituted, 1 deleted).
    r = error_rates("abcd xef", "ab cd ef", same, words=True)
    assert r["cer"] == 1 / 6 and r["edits"] == 1 and r["ref_chars"] == 6
    assert r["wer"] == 1.0 and r["ref_words"] == 3 and r["word_edits"] == 3
    assert error_rates("", "abc", same, words=True)["cer"] == 1.0  # all deleted
    with pytest.raises(ValueError, match="empty after normalisation"):
        error_rates("abc", " ?! ", same, words=False)


def test_the_normaliser_applies_to_both_sides():
    seen = []

    def spy(text: str) -> str:
        seen.append(text)
        return text.lower()

    assert error_rates("HELLO World", "hello WORLD.", spy, words=True)["cer"] == 0.0
    assert sorted(seen) == ["HELLO World", "hello WORLD."]
    # The pipeline's own normaliser: Ethiopic word space and full stop, Latin case.
    am = functools.partial(normalize_text, cfg=TextConfig(language="am"))
    r = error_rates("ሰላም ዓለም", "ሰላም፡ዓለም።", am, words=True)
    assert (r["cer"], r["wer"], r["ref_chars"], r["ref_words"]) == (0.0, 0.0, 6, 2)
    en = functools.partial(normalize_text, cfg=TextConfig(language="en"))
    r = error_rates("Hello world", "“Hello”, World!", en, words=True)
    assert r["cer"] == 0.0 and r["wer"] == 0.0
    assert error_rates("hello world", "Hello, World!", en, words=True, strip_punctuation=False)["edits"] == 2


def test_pooled_error_rates_weigh_utterances_by_length():
    same = lambda s: s  # noqa: E731
    rates = [error_rates("ab", "abcd", same, words=True), error_rates("x", "y", same, words=True)]
    pooled = pool_error_rates(rates)
    assert pooled["cer"] == 3 / 5 and pooled["wer"] == 2 / 2 and pooled["n"] == 2
    assert pool_error_rates([error_rates("a", "a", same, words=False)])["wer"] is None
    assert pool_error_rates([])["cer"] is None


def test_space_separated_languages():
    assert not any(space_separated(x) for x in ("ja", "zh", "zh-CN", "th", "jpn", "yue", "my"))
    assert all(space_separated(x) for x in ("am", "amh", "ko", "ko-KR", "en", "xx"))


# --- speaker similarity ---------------------------------------------------------------------------------


def test_xvector_loads_offline_self_similarity_is_one_and_cosine_is_symmetric(folders, no_network):
    spk = SpeakerModel(SpeakerConfig(path=str(folders["xvector"])))
    assert spk.sample_rate == 16000 and spk.name == "xvector"
    e = spk.embed(waves(4))
    assert e.shape == (3, 8) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert cosine(e[0], e[0]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(e[0], e[1]) == cosine(e[1], e[0]) and cosine(e[1], e[2]) == cosine(e[2], e[1])
    assert cosine(e[0], e[1]) < 1 - 1e-5  # clips differ beyond rounding (a random model barely tells them apart)
    assert np.array_equal(spk.embed(waves(4)[:1])[0], e[0])


@pytest.mark.parametrize("which", ["xvector", "xvector_layer"])
def test_a_single_clip_gets_the_models_own_embedding(folders, no_network, which):
    from transformers import Wav2Vec2FeatureExtractor, WavLMForXVector

    model = WavLMForXVector.from_pretrained(folders[which], local_files_only=True).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(folders[which], local_files_only=True)
    spk = SpeakerModel(SpeakerConfig(path=str(folders[which])))
    for clip in waves(6):
        with torch.no_grad():
            want = torch.nn.functional.normalize(model(**fe(clip, sampling_rate=16000, return_tensors="pt")).embeddings,
                                                 dim=-1)[0].numpy()
        assert np.allclose(spk.embed([clip])[0], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which, batched", [("xvector", False), ("xvector_layer", True)])
def test_a_clip_gets_the_same_embedding_in_any_batch(folders, no_network, which, batched):
    spk = SpeakerModel(SpeakerConfig(path=str(folders[which]), batch_size=8))
    assert spk._exact_batches == batched  # group norm over time would see the padding
    clips = waves(5, lengths=(3000, 9000, 5000, 4000))
    together = spk.embed(clips)
    alone = np.stack([spk.embed([c])[0] for c in clips])
    assert np.allclose(together, alone, atol=1e-5, rtol=0)


def test_too_short_clips_and_bad_vectors_are_errors(folders, no_network):
    spk = SpeakerModel(SpeakerConfig(path=str(folders["xvector"])))
    # Two frames after the TDNN (span 4 + 4 + 6) of a (10, 3) / (5, 2) feature encoder.
    assert spk.min_samples == ((16 - 1) * 2 + 3 - 1) * 5 + 10 == 170
    assert np.isfinite(spk.embed([waves(7, lengths=(170,))[0]])).all()
    with pytest.raises(ValueError, match=r"audios\[1\]: 169 samples is shorter than the 170 \(0.011 s\) xvector"):
        spk.embed([np.ones(4000, np.float32), np.ones(169, np.float32)])
    with pytest.raises(ValueError, match=r"audios\[0\]: expected a mono 1-D waveform"):
        spk.embed([np.ones((2, 4000), np.float32)])
    with pytest.raises(ValueError, match="zero vector"):
        cosine(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="1-D vectors of one size"):
        cosine(np.ones(3), np.ones(4))


# --- folders that are not the model -----------------------------------------------------------------------


def test_bad_folders_are_errors_naming_the_folder_and_what_to_put_there(folders, tmp_path, no_network):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(EvalModelError, match=rf"eval.asr.path: {nowhere} is not a folder; point it at a local Whisper"):
        AsrModel(AsrConfig(path=str(nowhere)))
    with pytest.raises(EvalModelError, match=rf"eval.asr.path: {tmp_path} has no config.json; .*Wav2Vec2ForCTC folder"):
        AsrModel(AsrConfig(path=str(tmp_path), kind="ctc"))
    with pytest.raises(EvalModelError, match="eval.speaker.path is not set"):
        SpeakerModel(SpeakerConfig())
    with pytest.raises(EvalModelError, match=r"eval.asr.path: .*xvector holds a WavLMForXVector .*not a Wav2Vec2ForCT"):
        AsrModel(AsrConfig(path=str(folders["xvector"]), kind="ctc"))
    with pytest.raises(EvalModelError, match=r"eval.asr.path: .*ctc holds a Wav2Vec2ForCTC .*not a WhisperForCondit"):
        AsrModel(AsrConfig(path=str(folders["ctc"]), kind="whisper"))
    with pytest.raises(EvalModelError, match=r"eval.speaker.path: .*whisper holds a Whisper.*not a WavLMForXVector"):
        SpeakerModel(SpeakerConfig(path=str(folders["whisper"])))
    # Weights that leave the CTC head random, and no weights at all.
    headless = shutil.copytree(folders["ctc"], tmp_path / "headless")
    from safetensors.torch import load_file, save_file

    state = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("lm_head.")}, headless / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(EvalModelError, match=r"headless do not fill the Wav2Vec2ForCTC.*lm_head.bias"):
        AsrModel(AsrConfig(path=str(headless), kind="ctc"))
    (headless / "model.safetensors").unlink()
    with pytest.raises(EvalModelError, match=r"headless has no weights"):
        AsrModel(AsrConfig(path=str(headless), kind="ctc"))
    (folders["ctc"] / "preprocessor_config.json").rename(tmp_path / "kept.json")
    try:
        with pytest.raises(EvalModelError, match=r"ctc has no preprocessor_config.json"):
            AsrModel(AsrConfig(path=str(folders["ctc"]), kind="ctc"))
    finally:
        (tmp_path / "kept.json").rename(folders["ctc"] / "preprocessor_config.json")


# --- linear probes ----------------------------------------------------------------------------------------


def speakers(k: int = 4, per: int = 40, dim: int = 16, *, planted: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat([f"spk{i}" for i in range(k)], per)
    X = rng.standard_normal((k * per, dim))
    if planted:
        X += 3.0 * rng.standard_normal((k, dim))[np.repeat(np.arange(k), per)]
    return X, y


def test_a_probe_reads_planted_speaker_information():
    X, y = speakers(planted=True)
    r = probe_accuracy(X, y, folds=5, seed=0)
    assert r["accuracy"] > 0.95 and r["chance"] == 0.25 and r["majority"] == 0.25
    assert (r["n"], r["k"], r["folds"], r["note"]) == (160, 4, 5, None)
    assert probe_accuracy(X, y, folds=5, seed=0) == r  # seeded folds


def test_a_probe_without_speaker_information_lands_near_chance():
    X, y = speakers(planted=False)
    r = probe_accuracy(X, y, folds=5, seed=0)
    assert abs(r["accuracy"] - r["chance"]) < 0.12 and r["accuracy_std"] >= 0


def test_the_majority_floor_follows_unbalanced_classes():
    rng = np.random.default_rng(1)
    r = probe_accuracy(rng.standard_normal((100, 4)), ["a"] * 60 + ["b"] * 20 + ["c"] * 20, folds=5)
    assert r["majority"] == 0.6 and r["chance"] == pytest.approx(1 / 3)


def test_tiny_classes_reduce_folds_or_drop_and_the_note_says_so():
    rng = np.random.default_rng(2)
    y = ["a"] * 10 + ["b"] * 3 + ["c"]
    r = probe_accuracy(rng.standard_normal((14, 3)), y, folds=5)
    assert (r["n"], r["k"], r["folds"]) == (13, 2, 3) and r["accuracy"] is not None
    assert "dropped 1 class(es) with one member (c)" in r["note"] and "5 folds reduced to 3" in r["note"]
    one = probe_accuracy(rng.standard_normal((5, 3)), ["a"] * 5)
    assert one["accuracy"] is None and one["k"] == 1 and "nothing to predict" in one["note"]
    none = probe_accuracy(rng.standard_normal((2, 3)), ["a", "b"])
    assert none["accuracy"] is None and none["k"] == 0 and none["chance"] is None
    with pytest.raises(ValueError, match="3 rows of X but 2 labels"):
        probe_accuracy(np.zeros((3, 2)), ["a", "b"])
