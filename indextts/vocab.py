"""train_vocab: a SentencePiece vocabulary for the new language, and a report that gates it.

Two modes:

* ``fresh``: train on the train split's normalised text.
* ``extend``: keep every piece of a base ``bpe.model`` (the released IndexTTS2 one) at its id and
  append the new language's most useful pieces after them, so pretrained text-embedding rows stay
  where they are.

Special ids follow IndexTTS: ``<s>``=0, ``</s>``=1, ``<unk>``=2. The report measures the UNK ratio
and character coverage on the val split; above ``vocab.max_unk_ratio`` the stage fails and names
the characters responsible.

Extending edits the serialized model directly: a SentencePiece model is a protobuf whose field 1
is the repeated piece list, and protobuf parsers append repeated fields in the order they appear,
so appending encoded pieces to the bytes appends them to the vocabulary. (The package's own
``sentencepiece_model_pb2`` needs protobuf >= 3.20, which descript-audiotools' pin forbids.)
"""

from __future__ import annotations

import argparse
import collections
import struct
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from indextts.config import get_section, load_config_arg
from indextts.files import atomic_path, sha256_file, write_json

BOS_ID, EOS_ID, UNK_ID = 0, 1, 2


@dataclass(frozen=True)
class VocabConfig:
    """The ``vocab`` config section."""

    mode: Literal["fresh", "extend"] = "fresh"  # extend keeps base pieces at their ids
    base_model: str | None = None  # the pretrained bpe.model: required for extend, reported against otherwise
    model_type: Literal["bpe", "unigram", "char"] = "bpe"  # IndexTTS2 ships a BPE model
    vocab_size: int = 12000  # total pieces (base + new in extend mode); IndexTTS2 uses 12000
    character_coverage: float = 1.0  # 1.0 for alphabets/syllabaries; ~0.9995 for CJK ideographs
    input_sentence_size: int = 2000000  # sentences sampled for training (caps memory on big corpora)
    shuffle_input_sentence: bool = True  # sample those sentences at random rather than the first N
    num_threads: int = 4  # trainer threads
    seed: int = 0  # SentencePiece's random seed, for a reproducible model
    max_unk_ratio: float = 0.01  # fail when more than this share of val tokens is <unk>
    byte_fallback: bool = False  # encode unseen characters as bytes instead of <unk>


@dataclass(frozen=True)
class VocabOutputs:
    model: Path
    vocab: Path
    report: Path


class VocabError(ValueError):
    """The vocabulary cannot be trained or fails its quality gate."""


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_piece(piece: str, score: float) -> bytes:
    """Serialize one ``ModelProto.pieces`` entry (type NORMAL, the proto default)."""
    raw = piece.encode("utf-8")
    body = b"\x0a" + _encode_varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score)
    return b"\x0a" + _encode_varint(len(body)) + body


def _processor(model_bytes: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


def read_texts(clean_parquet: str | Path, split: str) -> list[str]:
    """The normalised transcripts of one split of ``clean.parquet``, the new language's only:
    base-language rows (``replay``) neither train the vocabulary nor enter its report."""
    names = pq.read_schema(clean_parquet).names
    table = pq.read_table(clean_parquet, columns=["text", "split", *(["replay"] if "replay" in names else [])])
    texts = table.column("text").to_pylist()
    splits = table.column("split").to_pylist()
    replay = table.column("replay").to_pylist() if "replay" in names else [False] * len(texts)
    return [t for t, s, r in zip(texts, splits, replay) if s == split and t and not r]


def _train(texts: list[str], cfg: VocabConfig, vocab_size: int) -> bytes:
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(cfg.seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            model_type=cfg.model_type,
            vocab_size=vocab_size,
            character_coverage=cfg.character_coverage,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=cfg.shuffle_input_sentence,
            num_threads=cfg.num_threads,
            byte_fallback=cfg.byte_fallback,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            pad_id=-1,
            # Text is already normalised by indextts.text; SentencePiece must not re-normalise
            # (its default NFKC would undo choices such as keeping NFC for Hangul).
            normalization_rule_name="identity",
            max_sentence_length=16384,
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise VocabError(f"vocab.vocab_size={vocab_size} is too large for this corpus ({msg.strip()}); lower vocab.vocab_size") from e
        raise VocabError(f"SentencePiece training failed: {msg}") from e
    return buf.getvalue()


def _extend(base_bytes: bytes, texts: list[str], cfg: VocabConfig) -> tuple[bytes, int]:
    base = _processor(base_bytes)
    base_size = base.get_piece_size()
    n_new = cfg.vocab_size - base_size
    if n_new <= 0:
        raise VocabError(f"vocab.vocab_size={cfg.vocab_size} must exceed the base model's {base_size} pieces in extend mode")
    base_pieces = {base.id_to_piece(i) for i in range(base_size)}
    lowest = min(base.get_score(i) for i in range(base_size))

    def new_pieces(size: int) -> tuple[list[str], int]:
        trained = _processor(_train(texts, cfg, size))
        fresh = [
            trained.id_to_piece(i)
            for i in range(trained.get_piece_size())
            if not (trained.is_control(i) or trained.is_unknown(i) or trained.is_byte(i))
        ]
        # The trainer's order is its order of usefulness (BPE: merge order).
        return [p for p in fresh if p not in base_pieces], sum(p in base_pieces for p in fresh)

    # Pieces the base already has do not count, so a second, larger training makes up for them;
    # if the corpus cannot support that size, keep what the first gave (the report says so).
    added, overlap = new_pieces(n_new + 3)
    if len(added) < n_new and overlap:
        try:
            added, _ = new_pieces(n_new + 3 + overlap)
        except VocabError:
            pass
    added = added[:n_new]
    # New BPE pieces merge after every base piece: scores continue below the base's lowest.
    extra = b"".join(encode_piece(p, lowest - 1.0 - k) for k, p in enumerate(added))
    return base_bytes + extra, len(added)


def vocab_report(model_bytes: bytes, val_texts: list[str], train_texts: list[str], cfg: VocabConfig, base_bytes: bytes | None) -> dict:
    """UNK ratio and character coverage on val, tokens per utterance, pieces shared with base."""
    sp = _processor(model_bytes)
    ids_val = sp.encode(val_texts) if val_texts else []
    n_tok = sum(len(x) for x in ids_val)
    n_unk = sum(x.count(UNK_ID) for x in ids_val)
    chars = collections.Counter(c for t in val_texts for c in t if not c.isspace())
    uncovered = {c: n for c, n in chars.items() if UNK_ID in sp.encode(c)}
    total_chars = sum(chars.values())
    worst = sorted(uncovered.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    report = {
        "mode": cfg.mode,
        "model_type": cfg.model_type,
        "vocab_size": sp.get_piece_size(),
        "special_ids": {"<s>": sp.piece_to_id("<s>"), "</s>": sp.piece_to_id("</s>"), "<unk>": sp.unk_id()},
        "val_utterances": len(val_texts),
        "val_tokens": n_tok,
        "val_unk_tokens": n_unk,
        "unk_ratio": (n_unk / n_tok) if n_tok else 0.0,
        "max_unk_ratio": cfg.max_unk_ratio,
        "val_char_coverage": (1.0 - sum(uncovered.values()) / total_chars) if total_chars else 1.0,
        "val_distinct_chars": len(chars),
        "worst_chars": [{"char": c, "codepoint": f"U+{ord(c):04X}", "name": unicodedata.name(c, "?"), "count": n} for c, n in worst],
        "mean_tokens_per_utterance": {
            "train": float(np.mean([len(x) for x in sp.encode(train_texts[:20000])])) if train_texts else 0.0,
            "val": (n_tok / len(val_texts)) if val_texts else 0.0,
        },
    }
    if base_bytes is not None:
        base = _processor(base_bytes)
        ours = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
        theirs = {base.id_to_piece(i) for i in range(base.get_piece_size())}
        same_id = sum(1 for i in range(min(sp.get_piece_size(), base.get_piece_size())) if sp.id_to_piece(i) == base.id_to_piece(i))
        report["base"] = {
            "path": cfg.base_model,
            "size": base.get_piece_size(),
            "shared_pieces": len(ours & theirs),
            "shared_same_id": same_id,
            "new_pieces": len(ours - theirs),
        }
    return report


def train_vocab(cfg: VocabConfig, clean_parquet: str | Path, out_dir: str | Path) -> VocabOutputs:
    """Train (or extend) the vocabulary and write ``bpe.model``, ``bpe.vocab`` and ``vocab_report.json``.

    Args:
        cfg: the ``vocab`` section.
        clean_parquet: the cleaned manifest; the train split trains, the val split is reported on.
        out_dir: output folder.

    Returns:
        The output paths.

    Raises:
        VocabError: no training text, a bad base model or vocab size, or an UNK ratio above
            ``vocab.max_unk_ratio`` (the message names the worst characters).
    """
    out_dir = Path(out_dir)
    train_texts = read_texts(clean_parquet, "train")
    val_texts = read_texts(clean_parquet, "val")
    if not train_texts:
        raise VocabError(f"{clean_parquet}: the train split has no text to learn a vocabulary from")
    base_bytes = None
    if cfg.base_model:
        path = Path(cfg.base_model)
        if not path.exists():
            raise VocabError(f"vocab.base_model: {path} does not exist; point it at the released bpe.model or set it to null")
        base_bytes = path.read_bytes()
        try:
            _processor(base_bytes)
        except Exception as e:
            raise VocabError(f"vocab.base_model: {path} is not a SentencePiece model ({e})") from e
    if cfg.mode == "extend":
        if base_bytes is None:
            raise VocabError("vocab.mode is 'extend' but vocab.base_model is not set; give the released bpe.model")
        model_bytes, n_added = _extend(base_bytes, train_texts, cfg)
    else:
        model_bytes, n_added = _train(train_texts, cfg, cfg.vocab_size), None

    report = vocab_report(model_bytes, val_texts, train_texts, cfg, base_bytes)
    if n_added is not None:
        report["base"]["appended_pieces"] = n_added
    sp = _processor(model_bytes)
    outs = VocabOutputs(out_dir / "bpe.model", out_dir / "bpe.vocab", out_dir / "vocab_report.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(outs.model) as tmp:
        tmp.write_bytes(model_bytes)
    with atomic_path(outs.vocab) as tmp:
        tmp.write_text("".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())), encoding="utf-8")
    report["sha256"] = sha256_file(outs.model)
    write_json(outs.report, report)
    if report["unk_ratio"] > cfg.max_unk_ratio:
        worst = ", ".join(f"{w['char']!r} {w['codepoint']} {w['name']} x{w['count']}" for w in report["worst_chars"][:10])
        raise VocabError(
            f"UNK ratio {report['unk_ratio']:.4f} on the val split exceeds vocab.max_unk_ratio={cfg.max_unk_ratio}; "
            f"worst characters: {worst}. Raise vocab.character_coverage, enable vocab.byte_fallback, "
            f"or map these characters in text.punctuation_map"
        )
    return outs


def cli_train_vocab(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="indextts train-vocab", description="Train the SentencePiece vocabulary.")
    p.add_argument("--config", required=True, help="inline JSON or a YAML file with a vocab section")
    p.add_argument("--clean", required=True, type=Path, help="clean.parquet")
    p.add_argument("--out-dir", required=True, type=Path)
    args = p.parse_args(argv)
    cfg = get_section(VocabConfig, load_config_arg(args.config), "vocab")
    try:
        outs = train_vocab(cfg, args.clean, args.out_dir)
    except VocabError as e:
        print(f"train-vocab: {e}", file=sys.stderr)
        return 1
    import json

    r = json.loads(outs.report.read_text())
    print(f"train-vocab: {r['vocab_size']} pieces ({cfg.mode}), val UNK ratio {r['unk_ratio']:.5f}, char coverage {r['val_char_coverage']:.5f}")
    return 0
