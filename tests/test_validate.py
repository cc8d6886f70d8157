"""The validate gate and the training dataset, on a tiny synthetic corpus built with the project's
own writers: ``train_vocab`` for the vocabulary, the codes shard schema + ``index_codes`` for codes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from indextts.validate import ValidationFailed, cli_validate, validate_pipeline
from indextts.vocab import VocabConfig, train_vocab
from tests.factories import write_clean, write_codes

SR = 16000
FRAME_RATE = 50.0
N_Q = 2
CODEBOOK = 64
WORDS = "selam new dehna alem bet sew wuha mengist tsehay lij".split()


def make_corpus(root: Path, *, seed: int = 0) -> dict[str, Path]:
    """Audio + clean.parquet + bpe.model + one codes shard with its index.

    Speakers: s0 and s1 have three train utterances each, s2 one val utterance (its reference is
    itself).
    """
    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True)
    rows = []
    speakers = ["s0"] * 3 + ["s1"] * 3 + ["s2"]
    for k, spk in enumerate(speakers):
        dur = round(0.6 + 0.1 * k, 3)
        t = np.arange(int(dur * SR)) / SR
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * k) * t) + 0.01 * rng.standard_normal(t.shape)
        path = audio / f"u{k}.wav"
        sf.write(path, wave.astype(np.float32), SR)
        text = " ".join(rng.choice(WORDS, size=4 + k % 3))
        rows.append({
            "utt_id": f"u{k}", "audio_path": str(path), "text": text, "raw_text": text.upper(), "speaker": spk,
            "language": "am", "emotion": None, "duration": dur, "sample_rate": SR, "channels": 1,
            "split": "val" if k == 6 else "train",
        })
    clean = write_clean(root / "clean.parquet", rows)
    vocab = train_vocab(VocabConfig(vocab_size=40, max_unk_ratio=0.5, num_threads=1), clean, root / "vocab")

    codes_by_id = {r["utt_id"]: rng.integers(0, CODEBOOK, size=(N_Q, math.ceil(r["duration"] * FRAME_RATE)), dtype=np.int16)
                   for r in sorted(rows, key=lambda r: r["utt_id"])}
    shard, index = write_codes(root / "codes", clean, rows, codes_by_id, codebook=CODEBOOK, sample_rate=SR,
                               frame_rate=FRAME_RATE)
    return {"clean": clean, "bpe": vocab.model, "index": index, "shard": shard}


CONFIG = {
    "model": {"preset": "tiny"},
    "vocab": {"max_unk_ratio": 0.5},
    "validate": {"batch_size": 3, "device": "cpu", "max_ref_seconds": 1.0},
    "text": {"language": "am"},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def run(corpus: dict[str, Path], out: Path, config=CONFIG, **kw) -> Path:
    return validate_pipeline(config, clean_path=corpus["clean"], bpe_path=corpus["bpe"], codes_index=corpus["index"],
                             out_path=out, **kw)


def test_validate_passes_on_a_good_corpus(corpus, tmp_path: Path) -> None:
    out = run(corpus, tmp_path / "validate" / "report.json")
    report = json.loads(out.read_text())
    assert report["ok"] and report["failed"] == []
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["manifest", "vocab", "codes", "batch", "checkpoint"]
    assert all(c["status"] == "pass" for c in checks.values())
    assert checks["manifest"]["numbers"]["rows"] == 7
    assert checks["manifest"]["numbers"]["split_counts"] == {"train": 6, "val": 1}
    assert checks["vocab"]["numbers"]["unk_ratio"] == 0.0
    assert checks["codes"]["numbers"]["rows"] == 7 and checks["codes"]["numbers"]["codebook_size"] == CODEBOOK
    batch = checks["batch"]["numbers"]
    assert math.isfinite(batch["loss"]) and batch["loss"] > 0 and math.isfinite(batch["grad_norm"])
    assert batch["batch"]["utterances"] == 3 and batch["dataset"]["utterances"] == 6
    assert checks["checkpoint"]["numbers"]["differing"] == 0
    assert not (tmp_path / "validate" / ".roundtrip").exists()


def test_validate_imports_a_pretrained_gpt(corpus, tmp_path: Path) -> None:
    import sentencepiece as spm

    from indextts.model import build_model, model_config
    from indextts.model.transfer import save_official

    n_text = spm.SentencePieceProcessor(model_file=str(corpus["bpe"])).get_piece_size()
    torch.manual_seed(5)
    # made for another codec (128 codes) than ours (64): its two tables are re-initialised
    cfg = model_config("tiny", number_text_tokens=n_text, number_mel_codes=130)
    official = save_official(build_model(cfg), tmp_path / "gpt.pth")
    out = run(corpus, tmp_path / "report.json", pretrained_gpt=official)
    batch = {c["name"]: c for c in json.loads(out.read_text())["checks"]}["batch"]["numbers"]
    # 3: mel_embedding/mel_head of another codec; 3 more: codebook 1's table and head (the corpus
    # holds N_Q = 2 codebooks and model.n_codebooks is null: all of them)
    assert batch["pretrained"]["reinitialised"] == 3 + 3 and batch["pretrained"]["loaded"] > 50


def test_a_failing_check_is_named_and_dependents_are_skipped(corpus, tmp_path: Path, capsys) -> None:
    config = {**CONFIG, "vocab": {"max_unk_ratio": 0.0}}
    other = tmp_path / "other"
    other.mkdir()
    # a vocabulary that never saw these characters: high UNK ratio
    table = pq.read_table(corpus["clean"]).to_pylist()
    for r in table:
        r["text"] = "ሰላም ዓለም"
    foreign_clean = other / "clean.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(corpus["clean"])), foreign_clean)
    with pytest.raises(ValidationFailed) as e:
        validate_pipeline(config, clean_path=foreign_clean, bpe_path=corpus["bpe"], codes_index=corpus["index"],
                          out_path=tmp_path / "report.json")
    assert "vocab: " in str(e.value) and "UNK ratio" in str(e.value)
    report = json.loads((tmp_path / "report.json").read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"manifest": "pass", "vocab": "fail", "codes": "pass", "batch": "skip", "checkpoint": "skip"}
    # the CLI exits non-zero and names the check
    rc = cli_validate(["--config", json.dumps(config), "--clean", str(foreign_clean), "--bpe", str(corpus["bpe"]),
                       "--codes-index", str(corpus["index"]), "--out", str(tmp_path / "r2.json")])
    assert rc == 1 and "vocab: " in capsys.readouterr().err


def test_manifest_contract_violations_are_listed(corpus, tmp_path: Path) -> None:
    t = pq.read_table(corpus["clean"]).drop_columns(["raw_text"])
    t = t.set_column(t.column_names.index("duration"), "duration", pa.array(["1"] * t.num_rows))
    bad = tmp_path / "clean.parquet"
    pq.write_table(t, bad)
    with pytest.raises(ValidationFailed, match=r"manifest: .*missing column 'raw_text'.*column 'duration' is string"):
        validate_pipeline(CONFIG, clean_path=bad, bpe_path=corpus["bpe"], codes_index=corpus["index"],
                          out_path=tmp_path / "report.json")


# --- the dataset ------------------------------------------------------------------------------


def test_dataset_references_batches_and_collate(corpus) -> None:
    from indextts.codes import shard_paths
    from indextts.data import BucketBatchSampler, CodesDataset, collate
    from indextts.features import FeatureConfig

    feats = FeatureConfig(n_mels=32)
    ds = CodesDataset(shard_paths(corpus["index"]), bpe_path=corpus["bpe"], features=feats, split="train",
                      clean_path=corpus["clean"], seed=1, max_ref_seconds=0.5)
    assert len(ds) == 6 and ds.dropped["other_split"] == 1
    speakers = ds.meta["speaker"].tolist()
    for i in range(len(ds)):
        j = ds.reference_index(i)
        # s2's only utterance is in val; in train every speaker has others, so never itself
        assert j != i and speakers[j] == speakers[i]
    assert [ds.reference_index(i) for i in range(6)] == [ds.reference_index(i) for i in range(6)]
    picks = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        picks.add(ds.reference_index(0))
    assert len(picks) == 2  # both other utterances of s0 are used across epochs

    single = CodesDataset(shard_paths(corpus["index"]), bpe_path=corpus["bpe"], features=feats, split=None)
    k = single.meta.index[single.meta["speaker"] == "s2"][0]
    assert single.reference_index(k) == k

    sampler = BucketBatchSampler(ds.lengths, 4, seed=0)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(6)) and len(sampler) == 2
    assert batches == BucketBatchSampler(ds.lengths, 4, seed=0).batches()
    batch = collate([ds[i] for i in batches[0]])
    B = len(batches[0])
    assert batch.text_ids.shape[0] == B and batch.text_ids.dtype == torch.long
    assert batch.codes.shape == (B, 1, int(batch.code_lengths.max()))
    assert batch.cond_feats.shape == (B, int(batch.cond_lengths.max()), 32)
    assert int(batch.cond_lengths.max()) <= 0.5 * SR // feats.hop_length + 1  # cropped to 0.5 s
    item = ds[0]
    shard_codes = pq.read_table(corpus["shard"]).to_pylist()
    row = next(r for r in shard_codes if r["utt_id"] == item["utt_id"])
    assert item["codes"].tolist() == [row["codes"][: row["n_frames"]]]  # first codebook, (1, T)
    ranks = [BucketBatchSampler(ds.lengths, 1, seed=0, rank=r, world_size=2).batches() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3 and not {b[0] for b in ranks[0]} & {b[0] for b in ranks[1]}


def test_codes_index_sizes_are_read_from_the_index(corpus, tmp_path: Path) -> None:
    from indextts.codes import codebook_size, codes_n_q

    assert (codebook_size(corpus["index"]), codes_n_q(corpus["index"])) == (CODEBOOK, N_Q)
    broken = tmp_path / "index.json"
    broken.write_text(json.dumps({"codec": {"codebook_size": CODEBOOK}}))
    with pytest.raises(ValueError, match=r"index.json: cannot read codec.n_q .*rerun index_codes"):
        codes_n_q(broken)


def test_validate_trains_every_codebook_the_codes_hold(corpus, tmp_path: Path) -> None:
    out = run(corpus, tmp_path / "report.json")  # CONFIG leaves model.n_codebooks null
    batch = {c["name"]: c for c in json.loads(out.read_text())["checks"]}["batch"]["numbers"]
    assert (batch["n_codebooks"], batch["codes_n_q"]) == (N_Q, N_Q)
    assert batch["batch"]["codes"][:2] == [3, N_Q] and len(batch["mel_losses"]) == N_Q
    assert batch["mel_loss"] == pytest.approx(sum(batch["mel_losses"]) / N_Q, abs=1e-5)
    one = run(corpus, tmp_path / "one.json", config={**CONFIG, "model": {"preset": "tiny", "n_codebooks": 1}})
    batch = {c["name"]: c for c in json.loads(one.read_text())["checks"]}["batch"]["numbers"]
    assert batch["n_codebooks"] == 1 and batch["batch"]["codes"][:2] == [3, 1] and len(batch["mel_losses"]) == 1


def test_more_codebooks_than_the_shards_hold_fail_naming_them(corpus, tmp_path: Path) -> None:
    from indextts.codes import shard_paths
    from indextts.data import CodesDataset, DataError
    from indextts.features import FeatureConfig

    config = {**CONFIG, "model": {"preset": "tiny", "n_codebooks": N_Q + 1}}
    with pytest.raises(ValidationFailed, match=rf"batch: .*index.json: model.n_codebooks: {N_Q + 1} asked for, "
                                               rf"but the codes hold {N_Q} codebooks"):
        run(corpus, tmp_path / "report.json", config=config)
    # the dataset refuses too, naming the shard
    with pytest.raises(DataError, match=rf"shard-00000-of-00001.parquet: holds {N_Q} codebooks"):
        CodesDataset(shard_paths(corpus["index"]), bpe_path=corpus["bpe"], features=FeatureConfig(n_mels=32),
                     split="train", clean_path=corpus["clean"], n_codebooks=N_Q + 1)
