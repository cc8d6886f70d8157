"""indextts.semantic_codec: the MaskGCT semantic codec's names and shapes, strict loading, exact
batched quantization, and the released gpt.pth importing whole onto semantic codes."""

from __future__ import annotations

import struct

import numpy as np
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from indextts.audio.semantic_codec import (
    SemanticCodec,
    SemanticCodecConfig,
    SemanticCodecLoadError,
    load_semantic_codec,
    make_random_semantic_codec,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The released semantic_codec/model.safetensors key list (a copy of shared/reference/).
REFERENCE = Path(__file__).resolve().parent / "data" / "maskgct_semantic_codec_state_dict.tsv"
SMALL = SemanticCodecConfig(codebook_size=64, hidden_size=24, codebook_dim=4, vocos_dim=16, vocos_intermediate_dim=32,
                            vocos_num_layers=3)


def reference_keys() -> list[tuple[str, list[int]]]:
    rows = []
    for line in REFERENCE.read_text().splitlines():
        if not line or line.startswith("#") or line.startswith("key\t"):
            continue
        key, shape, dtype = line.split("\t")
        assert dtype == "float32"
        rows.append((key, [int(x) for x in shape.strip("[]").split(",")]))
    return rows


def test_released_size_codec_matches_the_shipped_key_list_in_order():
    ref = reference_keys()
    assert len(ref) == 239
    with torch.device("meta"):
        model = SemanticCodec()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == ref  # every key, shape and the file's order
    assert SemanticCodecConfig.from_state_dict(dict(model.state_dict())) == SemanticCodecConfig()


def test_random_codec_round_trips_through_safetensors_strictly(tmp_path):
    path = make_random_semantic_codec(tmp_path / "codec.safetensors", SMALL, seed=3)
    again = make_random_semantic_codec(tmp_path / "again.safetensors", SMALL, seed=3)
    assert path.read_bytes() == again.read_bytes()  # same seed, same bytes
    model = load_semantic_codec(path)
    assert model.cfg == SMALL and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    from safetensors.torch import load_file

    state = load_file(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _rewrite(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    edit(state)
    save_file(state, str(dst))
    return dst


def test_strict_load_names_missing_unexpected_and_misshaped_keys(tmp_path):
    good = make_random_semantic_codec(tmp_path / "good.safetensors", SMALL)
    missing = _rewrite(good, tmp_path / "missing.safetensors", lambda s: s.pop("decoder.1.bias"))
    with pytest.raises(SemanticCodecLoadError, match=r"missing keys: decoder\.1\.bias"):
        load_semantic_codec(missing)
    extra = _rewrite(good, tmp_path / "extra.safetensors", lambda s: s.update({"quantizer.extra": torch.zeros(1)}))
    with pytest.raises(SemanticCodecLoadError, match=r"unexpected keys: quantizer\.extra"):
        load_semantic_codec(extra)
    bad = _rewrite(good, tmp_path / "shape.safetensors", lambda s: s.update({"encoder.1.bias": torch.zeros(5)}))
    with pytest.raises(SemanticCodecLoadError, match=r"shape mismatches: encoder\.1\.bias: file \(5,\)"):
        load_semantic_codec(bad)
    foreign = _rewrite(good, tmp_path / "foreign.safetensors", lambda s: s.pop("encoder.0.embed.weight"))
    with pytest.raises(SemanticCodecLoadError, match="not a MaskGCT semantic codec"):
        load_semantic_codec(foreign)
    (tmp_path / "pickle.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(SemanticCodecLoadError, match="not a readable safetensors file"):
        load_semantic_codec(tmp_path / "pickle.safetensors")
    with pytest.raises(SemanticCodecLoadError, match="not found.*semantic_codec/model.safetensors"):
        load_semantic_codec(tmp_path / "nowhere.safetensors")


def _reference_codes(model: SemanticCodec, feats: torch.Tensor) -> torch.Tensor:
    """The released quantize path written out independently: Vocos encoder on (B, hidden, T),
    weight-normed 1x1 projection, argmax cosine similarity against the normalised codebook."""
    enc, proj = model.encoder[0], model.encoder[1]
    x = enc.embed(feats.transpose(1, 2))
    x = enc.norm(x.transpose(1, 2)).transpose(1, 2)
    for b in enc.convnext:
        h = b.norm(b.dwconv(x).transpose(1, 2))
        x = x + (b.gamma * b.pwconv2(F.gelu(b.pwconv1(h)))).transpose(1, 2)
    z = proj(enc.final_layer_norm(x.transpose(1, 2)))  # (B, T, hidden)
    q = model.quantizer.quantizers[0]
    v, g = q.in_project.weight_v, q.in_project.weight_g
    w = g * v / v.flatten(1).norm(dim=1)[:, None, None]
    lat = F.conv1d(z.transpose(1, 2), w, q.in_project.bias).transpose(1, 2)  # (B, T, d)
    cos = F.normalize(lat, dim=-1) @ F.normalize(q.codebook.weight, dim=-1).t()
    return cos.argmax(-1)


def test_quantize_equals_an_independent_computation_and_embed_inverts_the_lookup(tmp_path):
    model = load_semantic_codec(make_random_semantic_codec(tmp_path / "c.safetensors", SMALL, seed=1))
    feats = torch.randn(2, 37, SMALL.hidden_size, generator=torch.Generator().manual_seed(0))
    codes = model.quantize(feats)
    assert codes.shape == (1, 2, 37) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < SMALL.codebook_size
    assert len(torch.unique(codes)) > 8  # random features use many codes
    with torch.no_grad():
        assert torch.equal(codes[0], _reference_codes(model, feats))
        q = model.quantizer.quantizers[0]
        want = F.conv1d(q.codebook.weight[codes[0]].transpose(1, 2), q.out_project.weight(), q.out_project.bias)
    emb = model.embed(codes[0])
    assert emb.shape == (2, 37, SMALL.hidden_size)
    assert torch.allclose(emb, want.transpose(1, 2), atol=1e-6)


def test_padded_batch_quantizes_each_row_exactly_as_alone(tmp_path):
    model = load_semantic_codec(make_random_semantic_codec(tmp_path / "c.safetensors", SMALL, seed=2))
    g = torch.Generator().manual_seed(1)
    lengths = [50, 9, 31]
    rows = [torch.randn(n, SMALL.hidden_size, generator=g) for n in lengths]
    batch = torch.full((3, 50, SMALL.hidden_size), 7.0)  # padding values the mask must hide
    for i, r in enumerate(rows):
        batch[i, : len(r)] = r
    together = model.quantize(batch, torch.tensor(lengths))
    unmasked = model.quantize(batch)
    for i, r in enumerate(rows):
        alone = model.quantize(r[None])
        assert torch.equal(together[:, i, : lengths[i]], alone[:, 0]), f"row {i}"
    # Without the mask the last frames of the short rows see the padding: the mask matters.
    assert not torch.equal(unmasked[:, 1, : lengths[1]], together[:, 1, : lengths[1]])


def test_indextts2_model_imports_the_released_gpt_whole_on_semantic_codes(tmp_path):
    """The released shapes on the meta device: with the semantic codec's 8192 codes and 1024-dim
    w2v-BERT features, importing an official gpt.pth loads every tensor; only the text tables move
    (by piece string) to the new vocabulary, and nothing is re-initialised."""
    from indextts.model import build_model
    from indextts.model.config import ModelSection, mel_vocab_size
    from indextts.model.transfer import export_official, import_official
    from tests.factories import make_bpe

    old_words = "the quick brown fox jumps over lazy dog and then runs away from home".split()
    new_words = old_words[:8] + "ሰላም ዓለም ቤት".split()
    lines = lambda words: [" ".join(words[(i * 7 + j) % len(words)] for j in range(6)) for i in range(200)]  # noqa: E731
    old_bpe = make_bpe(tmp_path / "old.model", lines(old_words), 60)
    new_bpe = make_bpe(tmp_path / "new.model", lines(new_words), 70)
    import sentencepiece as spm

    n_old = spm.SentencePieceProcessor(model_file=str(old_bpe)).get_piece_size()
    n_new = spm.SentencePieceProcessor(model_file=str(new_bpe)).get_piece_size()
    codebook = SemanticCodecConfig().codebook_size  # the released codec: 8192

    def released(n_text: int):
        # What the pipeline builds for codec.kind semantic: indextts2 preset, codes of one stream.
        cfg = ModelSection(preset="indextts2").model_config(
            number_text_tokens=n_text, number_mel_codes=mel_vocab_size(codebook), codes_n_q=1
        )
        assert cfg.features.kind == "w2v_bert" and cfg.cond_feat_dim == 1024 and cfg.number_mel_codes == 8194
        with torch.device("meta"):
            model = build_model(cfg)
        # The text tables hold data (the piece transfer computes means), the rest stays on meta.
        model.text_embedding.to_empty(device="cpu")
        model.text_head.to_empty(device="cpu")
        torch.nn.init.normal_(model.text_embedding.weight)
        torch.nn.init.normal_(model.text_head.weight)
        torch.nn.init.zeros_(model.text_head.bias)
        return model

    official = export_official(released(n_old))
    ref = dict(reference_gpt_keys())
    assert set(official) == set(ref)
    for k, v in official.items():
        if not k.startswith("text_"):
            assert list(v.shape) == ref[k], k  # every non-text tensor has the released shape

    ours = released(n_new)
    report = import_official(official, ours, old_bpe=old_bpe, new_bpe=new_bpe)
    assert report.reinitialised == {}
    assert report.unused == {}
    assert set(report.transferred) == {"text_embedding.weight", "text_head.weight", "text_head.bias"}
    assert set(report.loaded) == set(ours.state_dict()) - set(report.transferred)
    for k in ("conditioning_encoder.embed.out.0.weight", "emo_conditioning_encoder.embed.out.0.weight",
              "mel_embedding.weight", "mel_head.weight", "mel_head.bias"):
        assert k in report.loaded
    assert report.vocab.n_new == n_new and report.vocab.shared > 3


def reference_gpt_keys():
    path = Path(__file__).resolve().parent / "data" / "indextts2_gpt_state_dict.tsv"
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            yield key, [int(x) for x in shape.strip("[]").split(",")]


def test_validation_and_a_short_stage1_run_on_semantic_codes(tmp_path):
    """Semantic codes and stored w2v-BERT prompt features from the tiny models, end to end through
    the pre-training gate and a few stage-1 steps, with the model reading w2v_bert features."""
    import json

    from indextts.codes import CodecConfig, CodesConfig, extract_codes, index_codes, read_shard_codes, shard_file_name
    from indextts.data import CodesDataset, DataError
    from indextts.features import FeatureConfig, PromptFeaturesConfig, features_path_for
    from indextts.audio.semantic_codec import TINY_CODEC, TINY_W2V_BERT, make_tiny_semantic
    from indextts.train import StageInputs, train_stage
    from indextts.validate import validate_pipeline
    from tests.factories import make_train_corpus

    corpus = make_train_corpus(tmp_path / "corpus")  # audio, clean.parquet, bpe.model (its codes are not used)
    codec = make_tiny_semantic(tmp_path / "models")
    codes_cfg = CodesConfig(n_shards=2, batch_seconds_cpu=10.0)
    out = tmp_path / "codes"
    shards, rejects = [], []
    for i in range(2):
        name = shard_file_name(i, 2)
        s, r = extract_codes(CodecConfig(**codec), codes_cfg, corpus["clean"], i, out / name, out / "rejects" / name,
                             progress=False, features_cfg=PromptFeaturesConfig(store=True, max_ref_seconds=1.0))
        shards.append(s)
        rejects.append(r)
    index = index_codes(codes_cfg, corpus["clean"], shards, rejects, out / "index.json",
                        features=[features_path_for(s) for s in shards])
    assert json.loads(index.read_text())["codec"]["kind"] == "semantic"

    features = {"kind": "w2v_bert", "w2v_bert_dim": TINY_W2V_BERT["hidden_size"]}
    config = {"model": {"preset": "tiny", "overrides": {"features": features}}, "codec": codec,
              "validate": {"device": "cpu", "batch_size": 4, "max_ref_seconds": 1.0}, "vocab": {"max_unk_ratio": 0.5}}
    report = json.loads(validate_pipeline(config, clean_path=corpus["clean"], bpe_path=corpus["bpe"], codes_index=index,
                                          out_path=tmp_path / "validate" / "report.json").read_text())
    assert report["ok"], report["failed"]
    batch = next(c for c in report["checks"] if c["name"] == "batch")["numbers"]["batch"]
    assert batch["codes"][1] == 1 and batch["cond_feats"][2] == TINY_W2V_BERT["hidden_size"]
    assert batch["cond_feats"][1] <= 50  # the 1 s crop of the stored 50-frame prompts
    # Codes without stored features: the gate says what to do instead of failing in a worker.
    from indextts.validate import ValidationFailed

    with pytest.raises(ValidationFailed, match="features.store: true"):
        validate_pipeline({**config, "codec": {"weights": "dac.pth"}}, clean_path=corpus["clean"], bpe_path=corpus["bpe"],
                          codes_index=corpus["index"], out_path=tmp_path / "validate" / "bad.json")

    # The data loader's prompts are the stored features of the reference utterance.
    ds = CodesDataset(shards, bpe_path=corpus["bpe"], features=FeatureConfig(**features), clean_path=corpus["clean"],
                      max_ref_seconds=0.5)
    item = ds[0]
    j = ds.reference_index(0)
    from indextts.features import PromptFeatureStore

    stored = torch.from_numpy(PromptFeatureStore.beside(shards).get(ds.meta.at[j, "utt_id"]))
    cond = item["cond_feats"]
    assert cond.shape[0] == min(25, stored.shape[0]) and cond.shape[1] == 32
    assert any(torch.equal(cond, stored[s : s + len(cond)]) for s in range(stored.shape[0] - len(cond) + 1))
    # Crops longer than extraction stored are a configuration error that names both keys, raised
    # when the dataset is made, not prompts silently shorter than train.max_ref_seconds.
    with pytest.raises(DataError, match=r"crops of 2 s .*train.max_ref_seconds.*at most 1 s .*features.max_ref_seconds"):
        CodesDataset(shards, bpe_path=corpus["bpe"], features=FeatureConfig(**features), clean_path=corpus["clean"],
                     max_ref_seconds=2.0)

    train = {"seed": 0, "device": "cpu", "max_tokens": 700, "max_batch_size": 8, "num_workers": 0, "log_every": 1,
             "val_every": 2, "state_every": 2, "progress": "lines", "max_ref_seconds": 1.0,
             "stage1": {"max_steps": 4, "warmup_steps": 1, "lr": 0.003}}
    stage1 = train_stage({**config, "train": train, "text": {"language": "am"}}, 1,
                         StageInputs(codes_index=index, clean=corpus["clean"], bpe=corpus["bpe"], out_dir=tmp_path / "s1"))
    lines = [json.loads(x) for x in (stage1 / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [m["loss"] for m in lines if "loss" in m and m.get("split", "train") == "train"]
    assert losses and all(np.isfinite(losses))
    meta = json.loads((stage1 / "model.json").read_text())
    assert meta["model"]["number_mel_codes"] == TINY_CODEC.codebook_size + 2
    assert read_shard_codes(shards[0]).n_q == 1
