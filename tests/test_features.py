"""indextts.features: w2v-BERT 2.0 features from a local folder (equal to a direct
``Wav2Vec2BertModel`` call, no network), their statistics, and the stored prompt features."""

from __future__ import annotations

import io
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from indextts.config import ConfigError
from indextts.audio.w2v_bert import (
    W2VBert,
    W2VBertInputs,
    W2VBertLoadError,
    load_w2v_bert_stats,
    make_random_w2v_bert,
    w2v_bert_frames,
)
from indextts.features import (
    FeatureConfig,
    PromptFeaturesConfig,
    PromptFeatureStore,
    crop_window,
    features_table,
    write_features,
)
from indextts.audio.semantic_codec import TINY_W2V_BERT, TINY_W2V_BERT_LAYER, make_tiny_semantic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return make_tiny_semantic(tmp_path_factory.mktemp("semantic"))


def waves(seed: int = 0, lengths=(16000, 12345, 800, 5000)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = [np.arange(n) / 16000 for n in lengths]
    return [(0.3 * np.sin(2 * np.pi * (150 + 40 * i) * x) + 0.05 * rng.standard_normal(len(x))).astype(np.float32)
            for i, x in enumerate(t)]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.mark.parametrize("layer", [1, TINY_W2V_BERT_LAYER, 3])
def test_features_equal_a_direct_model_call_with_normalisation_and_no_network(tiny, no_network, layer):
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertModel

    w2v = W2VBert.load(tiny["w2v_bert"], tiny["w2v_bert_stats"], layer=layer)
    assert w2v.dim == TINY_W2V_BERT["hidden_size"] and len(w2v.model.encoder.layers) == layer
    # The reference: what IndexTTS2's get_emb does, on the full model, one utterance at a time.
    model = Wav2Vec2BertModel.from_pretrained(tiny["w2v_bert"], local_files_only=True).eval()
    fe = SeamlessM4TFeatureExtractor.from_pretrained(tiny["w2v_bert"], local_files_only=True)
    stats = torch.load(tiny["w2v_bert_stats"], weights_only=True)
    for x in waves():
        inputs = fe(x, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            h = model(**inputs, output_hidden_states=True).hidden_states[layer]
        n = int(inputs["attention_mask"].sum())
        want = (h[0, :n] - stats["mean"]) / torch.sqrt(stats["var"])
        (got,) = w2v.features([x])
        assert got.shape == (w2v_bert_frames(len(x)), w2v.dim) == want.shape
        assert torch.equal(got, want)


def test_a_padded_batch_gives_each_row_its_own_features(tiny):
    w2v = W2VBert.load(tiny["w2v_bert"], tiny["w2v_bert_stats"], layer=TINY_W2V_BERT_LAYER)
    xs = waves(1)
    together = w2v.features(xs)
    for x, t in zip(xs, together):
        alone = w2v.features([x])[0]
        # Attention over a padded batch sums in another order: equal to float rounding.
        assert t.shape == alone.shape and torch.allclose(t, alone, atol=1e-5, rtol=0)


def test_frame_count_matches_the_feature_extractor():
    from transformers import SeamlessM4TFeatureExtractor

    fe = SeamlessM4TFeatureExtractor()
    for n in (560, 561, 719, 720, 799, 800, 12345, 16000, 16001, 48000):
        got = fe(np.zeros(n, np.float32) + 0.01, sampling_rate=16000, return_tensors="np")
        assert int(got["attention_mask"].sum()) == w2v_bert_frames(n), n
    assert w2v_bert_frames(399) == 0 and w2v_bert_frames(559) == 0 and w2v_bert_frames(560) == 1
    assert w2v_bert_frames(16000 * 10) == 499  # 50 per second, less the last partial window


def test_inputs_survive_pickling_for_dataloader_workers(tiny):
    inputs = W2VBertInputs(tiny["w2v_bert"])
    before = inputs(waves()[:2])
    again = pickle.loads(pickle.dumps(inputs))
    after = again(waves()[:2])
    assert before["input_features"].shape[0] == 2 and before["frames"].tolist() == [49, 37]
    for k in before:
        assert np.array_equal(before[k], after[k])


def test_load_errors_name_the_file_and_what_to_do(tiny, tmp_path):
    folder, stats = tiny["w2v_bert"], tiny["w2v_bert_stats"]
    with pytest.raises(W2VBertLoadError, match="no config.json.*facebook/w2v-bert-2.0"):
        W2VBert.load(tmp_path / "nowhere", stats)
    with pytest.raises(W2VBertLoadError, match=r"w2v_bert_layer: 4 is outside 1\.\.3"):
        W2VBert.load(folder, stats, layer=4)
    with pytest.raises(W2VBertLoadError, match="wav2vec2bert_stats.pt"):
        W2VBert.load(folder, tmp_path / "none.pt", layer=2)
    wrong = tmp_path / "wrong.pt"
    torch.save({"mean": torch.zeros(1024), "var": torch.ones(1024)}, wrong)
    with pytest.raises(W2VBertLoadError, match=r"'mean' is \(1024,\), expected a vector of the model's hidden size 32"):
        W2VBert.load(folder, wrong, layer=2)
    # A pickled object is refused by weights_only, never unpickled.
    evil = tmp_path / "evil.pt"
    buf = io.BytesIO()
    torch.save({"mean": torch.zeros(32), "var": torch.ones(32), "x": Path("/")}, buf)
    evil.write_bytes(buf.getvalue())
    with pytest.raises(W2VBertLoadError, match="weights_only"):
        load_w2v_bert_stats(evil)
    # Weights that leave a tensor of the model unfilled are refused (it would be random).
    import shutil

    from safetensors.torch import load_file, save_file

    part = tmp_path / "partial"
    shutil.copytree(folder, part)
    state = load_file(str(part / "model.safetensors"))
    state.pop("encoder.layers.0.ffn1.intermediate_dense.weight")
    save_file(state, str(part / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(W2VBertLoadError, match="missing.*ffn1.intermediate_dense.weight"):
        W2VBert.load(part, stats, layer=2)
    (part / "model.safetensors").unlink()
    with pytest.raises(W2VBertLoadError, match="no .safetensors weights"):
        W2VBert.load(part, stats, layer=2)


def test_feature_config_width_follows_the_w2v_bert_model():
    from indextts.model import model_config

    assert FeatureConfig(kind="w2v_bert").dim == 1024
    cfg = model_config("tiny", features={"kind": "w2v_bert", "w2v_bert_dim": 32})
    assert cfg.features.dim == cfg.cond_feat_dim == 32
    with pytest.raises(ValueError, match="w2v_bert_dim must be at least 3"):
        FeatureConfig(kind="w2v_bert", w2v_bert_dim=2)


def test_a_hash_collision_in_the_prompt_store_is_a_miss_never_another_utterance(tmp_path, monkeypatch):
    import indextts.hashing

    ids = [f"u{i:03d}" for i in range(6)]
    crops = [np.full((3, 8), i, np.float32) for i in range(6)]
    path = write_features(features_table(ids, crops, [0] * 6, [3] * 6, {"dim": 8, "frame_rate": 50.0}),
                          tmp_path / "a.parquet")
    monkeypatch.setattr(indextts.hashing, "xxh64", lambda keys: np.zeros(len(keys), np.uint64))  # all collide
    store = PromptFeatureStore([path])
    assert len(store) == 1 and "u005" in store and "u000" not in store  # the last row holds the one key
    assert np.array_equal(store.get("u005"), crops[5])
    with pytest.raises(KeyError, match="'u000' has no stored prompt features"):
        store.get("u000")


def test_prompt_store_reads_back_fp16_crops_by_utt_id(tmp_path):
    cfg = PromptFeaturesConfig(store=True, max_ref_seconds=0.5)
    assert cfg.max_frames == 25
    rng = np.random.default_rng(0)
    ids = [f"u{i:03d}" for i in range(40)]
    full = [rng.standard_normal((int(rng.integers(5, 60)), 8)).astype(np.float32) for _ in ids]
    crops, starts = [], []
    for u, f in zip(ids, full):
        s, n = crop_window(u, len(f), cfg.max_frames)
        assert 0 <= s and s + n <= len(f) and n == min(len(f), cfg.max_frames)
        assert (s, n) == crop_window(u, len(f), cfg.max_frames)  # stable
        crops.append(f[s : s + n])
        starts.append(s)
    meta = {"dim": 8, "frame_rate": 50.0}
    half = len(ids) // 2
    a = write_features(features_table(ids[:half], crops[:half], starts[:half], [len(f) for f in full[:half]], meta), tmp_path / "a.parquet")
    b = write_features(features_table(ids[half:], crops[half:], starts[half:], [len(f) for f in full[half:]], meta), tmp_path / "b.parquet")
    again = write_features(features_table(ids[:half], crops[:half], starts[:half], [len(f) for f in full[:half]], meta), tmp_path / "c.parquet")
    assert a.read_bytes() == again.read_bytes()
    store = pickle.loads(pickle.dumps(PromptFeatureStore([a, b])))  # as a DataLoader worker gets it
    assert len(store) == len(ids) and store.dim == 8 and "u000" in store and "zzz" not in store
    for k in rng.permutation(len(ids)):
        got = store.get(ids[k])
        assert got.dtype == np.float32 and got.shape == crops[k].shape
        assert np.array_equal(got, crops[k].astype(np.float16).astype(np.float32))
    with pytest.raises(KeyError, match="'zzz' has no stored prompt features"):
        store.get("zzz")
    # a repeated utt_id resolves to its last row (file order); the index holds no Python object per row
    dup = write_features(features_table(ids[:1], [crops[1]], [0], [len(crops[1])], meta), tmp_path / "d.parquet")
    both = PromptFeatureStore([a, b, dup])
    assert len(both) == len(ids) and np.array_equal(both.get(ids[0]), crops[1].astype(np.float16).astype(np.float32))
    assert both._keys.dtype == np.uint64 and both._loc.dtype == np.int32
    with pytest.raises(FileNotFoundError, match="features.store: true"):
        PromptFeatureStore([tmp_path / "missing.parquet"])
    with pytest.raises(ConfigError, match="max_ref_seconds must be positive"):
        PromptFeaturesConfig(max_ref_seconds=0)


def test_random_w2v_bert_is_reproducible(tmp_path):
    a = make_random_w2v_bert(tmp_path / "a", seed=5, stats_path=tmp_path / "a.pt", **TINY_W2V_BERT)
    b = make_random_w2v_bert(tmp_path / "b", seed=5, stats_path=tmp_path / "b.pt", **TINY_W2V_BERT)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
