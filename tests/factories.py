"""Small test inputs built on the spot (lhotse-style factories), shared by several test modules."""

from __future__ import annotations

import io
from pathlib import Path


def make_bpe(path: Path, lines: list[str], vocab_size: int) -> Path:
    """A tiny SentencePiece BPE with IndexTTS's special ids (<s>=0, </s>=1, <unk>=2)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        bos_id=0, eos_id=1, unk_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return path


def make_train_corpus(root: Path, *, n_speakers: int = 3, per_speaker: int = 8, n_q: int = 2, codebook: int = 32,
                      seed: int = 0, durations: tuple[float, float] = (0.5, 1.0), words_per_second: float = 0.0,
                      replay_speakers: int = 0) -> dict[str, Path]:
    """A small training corpus written with the project's own writers: audio (tones + noise, a
    pitch per speaker), ``clean.parquet`` (one val utterance per speaker), a ``train_vocab``
    vocabulary, one codes shard whose codes follow the audio (frame energy and pitch bins, so a
    model has something to learn) with its ``index_codes`` index, and ``speakers.json``.

    ``durations`` spans the clip lengths (s); ``words_per_second`` > 0 makes transcripts that long
    (else 3-5 words). ``replay_speakers`` adds that many speakers of a base language ``"en"``
    (rows flagged ``replay``, other words, codebook 0 inverted: what training on the main rows
    teaches makes them worse). Returns paths under keys clean, bpe, index, shard, speakers.
    """
    import json
    import math

    import numpy as np
    import soundfile as sf

    from indextts.vocab import VocabConfig, train_vocab

    sr, frame_rate = 16000, 50.0
    words = "selam new dehna alem bet sew wuha mengist tsehay lij".split()
    base_words = "the house is a good day for all of us".split()
    emotions = ["neutral", "happy", "sad"]
    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True)
    rows, codes_by_id = [], {}
    for s in range(n_speakers + replay_speakers):
        base = s >= n_speakers
        for j in range(per_speaker):
            k = s * per_speaker + j
            dur = round(durations[0] + (durations[1] - durations[0]) * ((k * 7) % 11) / 10, 3)
            n = int(dur * sr)
            t = np.arange(n) / sr
            f0 = 120 + 60 * s + 10 * (j % 3)
            env = 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 + 0.3 * j) * t)
            wave = 0.3 * env * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(n)
            path = audio / f"s{s}_u{j}.wav"
            sf.write(path, wave.astype(np.float32), sr)
            n_words = max(3 + j % 3, int(words_per_second * dur))
            text = " ".join(rng.choice(base_words if base else words, size=n_words))
            utt = f"s{s}_u{j:02d}"
            frames = math.ceil(dur * frame_rate)
            fe = np.array([env[min(n - 1, int(i * sr / frame_rate))] for i in range(frames)])
            cb0 = np.minimum((fe * (codebook - 1)).astype(np.int64), codebook - 1)
            if base:
                cb0 = codebook - 1 - cb0
            rest = [(cb0 * (q + 3) + s + q) % codebook for q in range(1, n_q)]
            codes_by_id[utt] = np.stack([cb0, *rest]).astype(np.int16)
            rows.append({
                "utt_id": utt, "audio_path": str(path), "text": text, "raw_text": text, "speaker": f"spk{s}",
                "language": "am", "emotion": emotions[j % 3], "duration": dur, "sample_rate": sr, "channels": 1,
                "split": "val" if j == per_speaker - 1 else "train",
                **({"language": "en", "replay": True} if base else {}),
            })
    clean = write_clean(root / "clean.parquet", rows)
    vocab = train_vocab(VocabConfig(vocab_size=40, max_unk_ratio=0.5, num_threads=1), clean, root / "vocab")
    shard, index = write_codes(root / "codes", clean, rows, codes_by_id, codebook=codebook)
    speakers = root / "speakers.json"
    speakers.write_text(json.dumps({"speakers": {f"spk{s}": s for s in range(n_speakers)}, "stats": {}}))
    return {"clean": clean, "bpe": vocab.model, "index": index, "shard": shard, "speakers": speakers}


def write_codes(codes_dir: Path, clean: Path, rows: list[dict], codes_by_id: dict, *, codebook: int,
                sample_rate: int = 16000, frame_rate: float = 50.0) -> tuple[Path, Path]:
    """One codes shard (the project's shard schema) of ``codes_by_id[utt_id]`` (``int16 [n_q, T]``)
    for the clean ``rows``, an empty rejects shard, and their ``index_codes`` index.

    Returns (shard, index).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indextts.codes import REJECTS_SCHEMA, CodesConfig, index_codes, shard_schema

    n_q = next(iter(codes_by_id.values())).shape[0]
    codes_dir.mkdir(parents=True)
    meta = {"format": 1, "n_q": n_q, "sample_rate": sample_rate, "hop_length": int(sample_rate / frame_rate),
            "frame_rate": frame_rate, "codebook_size": codebook, "weights_sha256": "0" * 64, "shard": 0, "n_shards": 1}
    shard_rows = []
    for r in sorted(rows, key=lambda r: r["utt_id"]):
        c = codes_by_id[r["utt_id"]]
        shard_rows.append({k: r[k] for k in ("utt_id", "speaker", "text", "language", "emotion", "audio_path", "duration")}
                          | {"n_frames": c.shape[1], "codes": c.reshape(-1).tolist()})
    shard = codes_dir / "shard-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(shard_rows, schema=shard_schema(meta)), shard)
    rejects = codes_dir / "rejects" / "shard-00000-of-00001.parquet"
    rejects.parent.mkdir()
    pq.write_table(REJECTS_SCHEMA.empty_table(), rejects)
    index = index_codes(CodesConfig(n_shards=1), clean, [shard], [rejects], codes_dir / "index.json")
    return shard, index


def write_clean(path: Path, rows: list[dict]) -> Path:
    """``clean.parquet`` of ``rows`` with the data contract's column types (DESIGN 3)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("utt_id", pa.string()), ("audio_path", pa.string()), ("text", pa.string()), ("raw_text", pa.string()),
        ("speaker", pa.string()), ("language", pa.string()), ("emotion", pa.string()), ("duration", pa.float64()),
        ("sample_rate", pa.int32()), ("channels", pa.int8()), ("split", pa.string())])
    if any("replay" in r for r in rows):
        schema = schema.append(pa.field("replay", pa.bool_()))
        rows = [{"replay": False, **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def make_synthetic_shards(root: Path, n_rows: int, *, n_shards: int = 4, n_q: int = 1, seed: int = 0,
                          frames: tuple[int, int] = (50, 1000)) -> dict[str, Path]:
    """``n_rows`` synthetic utterances in the codes shard schema, written as extraction writes them
    (zstd, dictionary codes), for memory and speed measurements: random codes of 1-20 s at 50
    frames/s (``frames``), 2-10 word texts, one speaker per 100 rows, 2% val, no audio files.
    Also a ``clean.parquet`` with the splits and a vocabulary. Vectorised: 1M rows in about a
    minute. Returns paths under keys shards (a list), clean, bpe.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indextts.codes import shard_file_name, shard_of, shard_schema
    from indextts.files import write_parquet

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = np.array("selam new dehna alem bet sew wuha mengist tsehay lij".split())
    utt = [f"u{i:08d}" for i in range(n_rows)]
    n_frames = rng.integers(frames[0], frames[1], size=n_rows).astype(np.int32)
    n_words = rng.integers(2, 11, size=n_rows)
    picks = words[rng.integers(0, len(words), size=int(n_words.sum()))].tolist()
    ends = np.cumsum(n_words).tolist()
    texts = [" ".join(picks[e - n : e]) for e, n in zip(ends, n_words.tolist())]
    split = np.where(rng.random(n_rows) < 0.02, "val", "train")
    which = np.fromiter((shard_of(u, n_shards) for u in utt), dtype=np.int64, count=n_rows)
    meta = {"format": 1, "n_q": n_q, "sample_rate": 16000, "hop_length": 320, "frame_rate": 50.0,
            "codebook_size": 1024, "weights_sha256": "0" * 64, "n_shards": n_shards}
    shards = []
    for k in range(n_shards):
        rows = np.flatnonzero(which == k)  # utt ids are zero-padded: index order is utt_id order
        sizes = n_frames[rows].astype(np.int64) * n_q
        off = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(sizes, out=off[1:])
        values = rng.integers(0, 1024, size=int(off[-1]), dtype=np.int16)
        ids = [utt[r] for r in rows]
        cols = {"utt_id": ids, "speaker": [f"spk{r // 100:06d}" for r in rows], "text": [texts[r] for r in rows],
                "language": ["am"] * len(rows), "emotion": [None] * len(rows),
                "audio_path": [f"/corpus/audio/{u}.wav" for u in ids], "duration": n_frames[rows] / 50.0,
                "n_frames": n_frames[rows]}
        schema = shard_schema({**meta, "shard": k})
        arrays = [pa.array(cols[f.name], type=f.type) for f in schema if f.name != "codes"]
        arrays.append(pa.ListArray.from_arrays(pa.array(off), pa.array(values)))
        path = root / shard_file_name(k, n_shards)
        write_parquet(pa.table(arrays, schema=schema), path, row_group_size=1 << 20)
        shards.append(path)
        del values, arrays
    clean = root / "clean.parquet"
    pq.write_table(pa.table({"utt_id": utt, "split": split.tolist()}), clean)
    bpe = make_bpe(root / "bpe.model", [" ".join(words[rng.integers(0, len(words), 8)]) for _ in range(200)], 40)
    return {"shards": shards, "clean": clean, "bpe": bpe}
