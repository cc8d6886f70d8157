import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from indextts.vocab import VocabConfig, VocabError, encode_piece, train_vocab

GEEZ = [chr(c) for c in range(0x1200, 0x1240)]


def corpus(path, texts, val_every=10):
    pq.write_table(pa.table({"text": texts, "split": ["val" if i % val_every == 0 else "train" for i in range(len(texts))]}), path)
    return path


def sentences(alphabet, n, seed=0):
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5))) for _ in range(6)) for _ in range(n)]


def test_fresh_model_has_indextts_special_ids_and_report(tmp_path):
    clean = corpus(tmp_path / "c.parquet", sentences(GEEZ, 300))
    out = train_vocab(VocabConfig(vocab_size=150, num_threads=1), clean, tmp_path / "v")
    sp = spm.SentencePieceProcessor(model_file=str(out.model))
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<s>", "</s>", "<unk>")
    assert sp.get_piece_size() == 150
    report = json.loads(out.report.read_text())
    assert report["unk_ratio"] == 0.0 and report["val_char_coverage"] == 1.0 and report["val_utterances"] == 30


def test_same_seed_same_model(tmp_path):
    clean = corpus(tmp_path / "c.parquet", sentences(GEEZ, 200))
    a = train_vocab(VocabConfig(vocab_size=120, num_threads=1), clean, tmp_path / "a").model.read_bytes()
    b = train_vocab(VocabConfig(vocab_size=120, num_threads=1), clean, tmp_path / "b").model.read_bytes()
    assert a == b


def test_extend_keeps_every_base_piece_at_its_id(tmp_path):
    base = train_vocab(VocabConfig(vocab_size=40, num_threads=1), corpus(tmp_path / "l.parquet", sentences("abcdefgh", 200)), tmp_path / "base").model
    clean = corpus(tmp_path / "c.parquet", sentences(GEEZ, 300))
    out = train_vocab(VocabConfig(mode="extend", base_model=str(base), vocab_size=190, num_threads=1), clean, tmp_path / "ext")
    old = spm.SentencePieceProcessor(model_file=str(base))
    new = spm.SentencePieceProcessor(model_file=str(out.model))
    assert new.get_piece_size() == 190
    assert all(old.id_to_piece(i) == new.id_to_piece(i) for i in range(old.get_piece_size()))
    assert new.encode("abcd") == old.encode("abcd")  # base text tokenises as before
    assert 2 not in new.encode(sentences(GEEZ, 5, seed=9)[0])  # and the new script is covered
    report = json.loads(out.report.read_text())
    assert report["base"]["shared_same_id"] == 40 and report["base"]["appended_pieces"] == 150


def test_unk_gate_fails_naming_the_worst_characters(tmp_path):
    train = sentences(GEEZ[:20], 200)
    val = ["ሀሁ " + "ጀጀጀ ፀፀ"] * 20  # characters never seen in training
    texts = []
    for i in range(220):
        texts.append(val[0] if i % 10 == 0 else train[i % 200])
    clean = corpus(tmp_path / "c.parquet", texts)
    with pytest.raises(VocabError, match=r"U\+1300.*ETHIOPIC SYLLABLE JA"):
        train_vocab(VocabConfig(vocab_size=60, num_threads=1, max_unk_ratio=0.01), clean, tmp_path / "v")


def test_extend_needs_a_base_model(tmp_path):
    clean = corpus(tmp_path / "c.parquet", sentences(GEEZ, 50))
    with pytest.raises(VocabError, match="vocab.base_model"):
        train_vocab(VocabConfig(mode="extend", vocab_size=100), clean, tmp_path / "v")


def test_too_large_vocab_is_a_clear_error(tmp_path):
    clean = corpus(tmp_path / "c.parquet", sentences("ab", 30))
    with pytest.raises(VocabError, match="vocab.vocab_size"):
        train_vocab(VocabConfig(vocab_size=5000, num_threads=1), clean, tmp_path / "v")


def test_encoded_piece_round_trips_through_sentencepiece(tmp_path):
    base = train_vocab(VocabConfig(vocab_size=30, num_threads=1), corpus(tmp_path / "l.parquet", sentences("abcdef", 100)), tmp_path / "b").model
    extended = base.read_bytes() + encode_piece("▁ሰላም", -1000.0)
    sp = spm.SentencePieceProcessor(model_proto=extended)
    assert sp.id_to_piece(30) == "▁ሰላም" and sp.get_score(30) == -1000.0


def test_replay_rows_train_no_piece_and_tokenise_as_with_the_base_model(tmp_path):
    # Base-language rows of data.replay sit in clean.parquet beside the new language's: they do not
    # train the vocabulary, and extend mode keeps every base piece, so they tokenise as before.
    base = train_vocab(VocabConfig(vocab_size=40, num_threads=1), corpus(tmp_path / "l.parquet", sentences("abcdefgh", 200)), tmp_path / "base").model
    main, replay = sentences(GEEZ, 300), sentences("abcdefgh", 100, seed=5)
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": main + replay, "split": ["val" if i % 10 == 0 else "train" for i in range(400)],
                             "replay": [False] * 300 + [True] * 100}), mixed)
    cfg = VocabConfig(mode="extend", base_model=str(base), vocab_size=190, num_threads=1)
    out = train_vocab(cfg, mixed, tmp_path / "ext")
    alone = train_vocab(cfg, corpus(tmp_path / "main.parquet", main), tmp_path / "alone")
    assert out.model.read_bytes() == alone.model.read_bytes()  # the replay rows changed nothing
    old = spm.SentencePieceProcessor(model_file=str(base))
    new = spm.SentencePieceProcessor(model_file=str(out.model))
    assert all(old.id_to_piece(i) == new.id_to_piece(i) for i in range(old.get_piece_size()))
    assert all(new.encode(t) == old.encode(t) for t in replay)
    assert json.loads(out.report.read_text())["val_utterances"] == 30  # the main val rows only
