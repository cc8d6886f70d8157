"""Checkpoint folders: round trip, vocabulary refusal, damaged and foreign files, tied tensors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from indextts.checkpoint import (
    CheckpointError,
    VocabMismatchError,
    checkpoint_sha256,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    tensor_equal,
)
from indextts.files import sha256_file
from tests import factories
from indextts.model import build_model, model_config


def make_bpe(path: Path, words: str, vocab_size: int = 60, seed: int = 0) -> Path:
    """A tiny BPE trained on random strings of ``words``."""
    rng = random.Random(seed)
    vocab = words.split()
    return factories.make_bpe(path, [" ".join(rng.choice(vocab) for _ in range(8)) for _ in range(300)], vocab_size)


@pytest.fixture()
def bpe(tmp_path: Path) -> Path:
    return make_bpe(tmp_path / "bpe.model", "the quick brown fox jumps over the lazy dog again")


def tiny_model(n_text: int = 60, seed: int = 0):
    torch.manual_seed(seed)
    cfg = model_config("tiny", number_text_tokens=n_text)
    return build_model(cfg), cfg


def save(tmp_path: Path, model, cfg, bpe: Path, name: str = "ckpt") -> Path:
    return save_checkpoint(
        tmp_path / name, model, model_cfg=cfg, vocab_path=bpe, text_cfg={"language": "am"},
        codec_cfg={"weights": "dac.pth"}, stage="stage1", training_type="full", parent_sha256="ab" * 32,
        data_index_sha256="cd" * 32, step=17, extra={"seed": 3},
    )


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path: Path, bpe: Path) -> None:
    model, cfg = tiny_model()
    ckpt = save(tmp_path, model, cfg, bpe)
    assert sorted(p.name for p in ckpt.iterdir()) == ["bpe.model", "model.json", "model.safetensors"]
    assert (ckpt / "bpe.model").read_bytes() == bpe.read_bytes()  # the folder's own vocabulary
    loaded, meta = load_checkpoint(ckpt, vocab_path=bpe, verify_sha256=True)
    assert tensor_equal(model.state_dict(), loaded.state_dict()) == []
    assert loaded.cfg == cfg
    assert meta["stage"] == "stage1" and meta["training_type"] == "full" and meta["step"] == 17
    assert meta["parent_sha256"] == "ab" * 32 and meta["data_index_sha256"] == "cd" * 32
    assert meta["vocab"]["sha256"] == sha256_file(bpe) and meta["vocab"]["n_pieces"] == 60
    assert meta["text"] == {"language": "am"} and meta["codec"] == {"weights": "dac.pth"}
    assert {"torch", "torchaudio", "dac", "sentencepiece", "indextts"} <= set(meta["versions"])
    assert meta["extra"] == {"seed": 3}
    assert checkpoint_sha256(ckpt) == meta["weights"]["sha256"] == sha256_file(ckpt / "model.safetensors")


def test_other_vocabulary_is_refused_naming_both_files(tmp_path: Path, bpe: Path) -> None:
    model, cfg = tiny_model()
    ckpt = save(tmp_path, model, cfg, bpe)
    other = make_bpe(tmp_path / "other.model", "a completely different little corpus of words here", seed=1)
    with pytest.raises(VocabMismatchError) as e:
        load_checkpoint(ckpt, vocab_path=other)
    msg = str(e.value)
    assert str(bpe.resolve()) in msg and str(other.resolve()) in msg
    assert sha256_file(bpe)[:16] in msg and sha256_file(other)[:16] in msg


def test_truncated_weights_give_a_clear_error(tmp_path: Path, bpe: Path) -> None:
    model, cfg = tiny_model()
    ckpt = save(tmp_path, model, cfg, bpe)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(ckpt, vocab_path=bpe)
    # Same damage with a model.json that agrees on the size: the safetensors reader catches it.
    meta = json.loads((ckpt / "model.json").read_text())
    meta["weights"]["bytes"] = len(data) // 2
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be read as safetensors"):
        load_checkpoint(ckpt, vocab_path=bpe)


def test_foreign_files_give_a_clear_error(tmp_path: Path, bpe: Path) -> None:
    from safetensors.torch import save_file

    model, cfg = tiny_model()
    ckpt = save(tmp_path, model, cfg, bpe)
    weights = ckpt / "model.safetensors"
    # a safetensors file of someone else's (no indextts tag)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = json.loads((ckpt / "model.json").read_text())
    meta["weights"]["bytes"] = weights.stat().st_size
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not written by indextts"):
        load_checkpoint(ckpt, vocab_path=bpe)
    # not a checkpoint folder at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_meta(tmp_path / "empty")
    (tmp_path / "empty" / "model.json").write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not an indextts checkpoint"):
        read_meta(tmp_path / "empty")


def test_keys_that_do_not_fit_the_config_are_listed(tmp_path: Path, bpe: Path) -> None:
    model, cfg = tiny_model()
    ckpt = save(tmp_path, model, cfg, bpe)
    meta = json.loads((ckpt / "model.json").read_text())
    meta["model"]["layers"] = 3  # the file has two GPT blocks
    meta["model"]["max_text_tokens"] = 10  # and a longer text position table
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, vocab_path=bpe)
    msg = str(e.value)
    assert "missing" in msg and "gpt.h.2.attn.c_attn.weight" in msg
    rows, d = cfg.text_positions, cfg.model_dim
    assert "shape mismatch" in msg and f"text_pos_embedding.emb.weight: file [{rows}, {d}] vs model [12, {d}]" in msg


def test_tied_tensors_are_stored_once_and_restored(tmp_path: Path, bpe: Path) -> None:
    model, cfg = tiny_model()
    model.text_head.weight = model.text_embedding.weight  # same shape [V + 1, D]: tie them
    ckpt = save(tmp_path, model, cfg, bpe)
    meta = read_meta(ckpt)
    assert meta["aliases"] == {"text_head.weight": "text_embedding.weight"}
    loaded, _ = load_checkpoint(ckpt, vocab_path=bpe)
    assert tensor_equal(model.state_dict(), loaded.state_dict()) == []


def test_meta_device_model_cannot_be_saved(tmp_path: Path, bpe: Path) -> None:
    with torch.device("meta"):
        model, cfg = tiny_model()
    with pytest.raises(CheckpointError, match="meta device"):
        save(tmp_path, model, cfg, bpe)


def test_config_sections_are_recorded_with_defaults_and_parse_back() -> None:
    from indextts.checkpoint import section_record
    from indextts.config import get_section
    from indextts.text import TextConfig

    config = {"text": {"language": "ko", "punctuation_map": {"~": "-"}}}
    rec = section_record(config, "text")
    assert rec["punctuation_map"] == {"~": "-"} and rec["unicode_form"] == "NFC"
    assert get_section(TextConfig, {"text": rec}, "text") == get_section(TextConfig, config, "text")
    assert section_record({}, "codec") == {}
