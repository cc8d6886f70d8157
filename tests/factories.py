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
