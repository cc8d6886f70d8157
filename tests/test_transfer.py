"""Official gpt.pth import/export and vocabulary transfer by piece string.

Size honesty: the lossless import -> export round trip runs on the ``tiny`` preset (every
official key *name pattern*, small shapes). The full ``indextts2`` shapes are checked on the
``meta`` device only (no 6 GB allocation): its export has exactly the reference TSV's keys and
shapes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from indextts.model import build_model, model_config
from indextts.model.transfer import (
    TransferError,
    export_official,
    import_official,
    load_official_state_dict,
    save_official,
    transfer_vocab,
)
from indextts.pretrained import import_checkpoint
from tests.factories import make_bpe

# The released checkpoint's key list (a copy of shared/reference/), shipped with the tests.
REFERENCE = Path(__file__).resolve().parent / "data" / "indextts2_gpt_state_dict.tsv"


def corpus(words: str, seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    vocab = words.split()
    return [" ".join(rng.choice(vocab) for _ in range(8)) for _ in range(n)]


OLD_WORDS = "the quick brown fox jumps over lazy dog and then runs away from home"
# Shares most words with OLD_WORDS, adds new ones, and a script the old vocabulary never saw.
NEW_WORDS = "the quick brown cat sleeps under warm sun and then runs back to home ሰላም ዓለም"


def tiny(seed: int, **kw):
    torch.manual_seed(seed)
    return build_model(model_config("tiny", **kw))


def official_file(tmp_path: Path, model, *, wrapped: bool = False, extras: bool = False, name: str = "gpt.pth") -> Path:
    """A synthetic official-format gpt.pth: our export, optionally wrapped and with the inference
    wrapper's extra keys, as a live IndexTTS2 model would save them."""
    sd = export_official(model)
    if extras:
        for k in ("gpt.h.0.ln_1.weight", "mel_head.weight"):
            sd["inference_model." + k.replace("gpt.", "transformer.")] = sd[k].clone()
        sd["gpt.wte.weight"] = sd["mel_embedding.weight"].clone()
    obj = {"model": sd} if wrapped else sd
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrapped,extras", [(False, False), (True, False), (True, True)])
def test_import_then_export_is_lossless(tmp_path: Path, wrapped: bool, extras: bool) -> None:
    source = tiny(seed=1)
    path = official_file(tmp_path, source, wrapped=wrapped, extras=extras)
    target = tiny(seed=2)
    report = import_official(path, target)
    keys = set(source.state_dict())
    assert report.wrapped is wrapped
    assert set(report.loaded) == keys and not report.reinitialised and not report.transferred
    assert "text tables loaded by id" in report.notes[0]
    assert set(report.transposed) == {k for k in keys if k.startswith("gpt.h.") and k.endswith(
        ("c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight"))}
    if extras:
        assert set(report.unused) == {"inference_model.transformer.h.0.ln_1.weight",
                                      "inference_model.mel_head.weight", "gpt.wte.weight"}
        assert "inference wrapper" in report.unused["gpt.wte.weight"]
    else:
        assert report.unused == {}
    original = load_official_state_dict(official_file(tmp_path, source, name="plain.pth"))[0]
    again = export_official(target)
    assert list(again) == list(original)
    for k in original:
        assert again[k].shape == original[k].shape and torch.equal(again[k], original[k]), k
    # Conv1D layout on disk: [in, out]
    d = source.cfg.model_dim
    assert list(again["gpt.h.0.attn.c_attn.weight"].shape) == [d, 3 * d]
    assert list(again["gpt.h.0.mlp.c_proj.weight"].shape) == [4 * d, d]


def test_save_official_writes_a_plain_state_dict(tmp_path: Path) -> None:
    model = tiny(seed=3)
    path = save_official(model, tmp_path / "out" / "gpt.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict) and set(sd) == set(export_official(model))


def test_indextts2_export_has_exactly_the_official_keys_and_shapes() -> None:
    ref = {}
    for line in REFERENCE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            ref[key] = [int(x) for x in shape.strip("[]").split(",")]
    assert len(ref) == 665
    with torch.device("meta"):
        model = build_model(model_config("indextts2"))
    sd = export_official(model)
    assert set(sd) == set(ref)
    assert {k: list(v.shape) for k, v in sd.items()} == ref


def test_shape_mismatches_are_reinitialised_with_a_reason(tmp_path: Path) -> None:
    source = tiny(seed=1)
    path = official_file(tmp_path, source)
    n_pos = source.cfg.mel_positions
    # other conditioning features (40 mels), another codec (130 codes), a longer code table
    target = tiny(seed=2, number_mel_codes=130, features={"n_mels": 40}, max_mel_tokens=source.cfg.max_mel_tokens + 20)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = import_official(path, target)
    re = report.reinitialised
    assert "feature size" in re["conditioning_encoder.embed.out.0.weight"]
    assert "feature size" in re["emo_conditioning_encoder.embed.out.0.weight"]
    n_mel, d = source.cfg.number_mel_codes, source.cfg.model_dim
    assert "codec vocabulary" in re["mel_embedding.weight"]
    assert f"[{n_mel}, {d}] vs ours [130, {d}]" in re["mel_embedding.weight"]
    assert "codec vocabulary" in re["mel_head.bias"]
    for k in re:
        assert torch.equal(target.state_dict()[k], before[k]), f"{k} should keep its fresh initialisation"
    # the position table keeps the official rows it has room for
    assert f"first {n_pos} positions" in report.transferred["mel_pos_embedding.emb.weight"]
    src = load_official_state_dict(path)[0]
    mel_pos = target.state_dict()["mel_pos_embedding.emb.weight"]
    assert torch.equal(mel_pos[:n_pos], src["mel_pos_embedding.emb.weight"])
    assert torch.equal(mel_pos[n_pos:], before["mel_pos_embedding.emb.weight"][n_pos:])
    # every key on both sides is accounted for exactly once
    ours = set(target.state_dict())
    assert set(report.loaded) | set(report.transferred) | set(re) == ours
    assert not set(report.loaded) & set(re)
    assert "re-initialised conditioning_encoder.embed.out.0.weight" in report.summary()


def test_fewer_layers_leave_official_keys_unused(tmp_path: Path) -> None:
    path = official_file(tmp_path, tiny(seed=1))
    report = import_official(path, tiny(seed=2, layers=1))
    assert "gpt.h.1.attn.c_attn.weight" in report.unused
    assert "no such parameter" in report.unused["gpt.h.1.attn.c_attn.weight"]


def test_files_that_are_not_state_dicts_are_refused(tmp_path: Path) -> None:
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(TransferError, match="not a state dict"):
        load_official_state_dict(tmp_path / "list.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, tmp_path / "ok.pth")
    loaded = load_official_state_dict(tmp_path / "ok.pth")
    assert loaded.wrapped is True and loaded.other_keys == ["step"]
    with pytest.raises(TransferError, match="none of its 1 tensors fits our model"):
        import_official(tmp_path / "ok.pth", tiny(seed=0))  # e.g. another model's checkpoint
    sd = export_official(tiny(seed=0))
    torch.save({"model": sd, "step": 3, "optimizer": {}}, tmp_path / "trainer.pth")
    report = import_official(tmp_path / "trainer.pth", tiny(seed=1))
    assert "besides 'model' were not used: optimizer, step" in report.notes[0]
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(TransferError, match="weights-only"):
        load_official_state_dict(tmp_path / "junk.pth")
    torch.save({"opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, tmp_path / "pickle.pth")
    with pytest.raises(TransferError, match="weights-only"):
        load_official_state_dict(tmp_path / "pickle.pth")
    with pytest.raises(TransferError, match="not found"):
        load_official_state_dict(tmp_path / "missing.pth")


# --- vocabulary transfer ----------------------------------------------------------------------


@pytest.fixture()
def vocabs(tmp_path: Path):
    import sentencepiece as spm

    old = make_bpe(tmp_path / "old.model", corpus(OLD_WORDS, 0), 60)
    new = make_bpe(tmp_path / "new.model", corpus(NEW_WORDS, 1), 80)
    return old, new, spm.SentencePieceProcessor(model_file=str(old)), spm.SentencePieceProcessor(model_file=str(new))


def test_shared_pieces_keep_their_rows_while_ids_move(vocabs) -> None:
    _, _, old_sp, new_sp = vocabs
    n_old, n_new, D = old_sp.get_piece_size(), new_sp.get_piece_size(), 8
    g = torch.Generator().manual_seed(0)
    oe, ohw, ohb = torch.randn(n_old + 1, D, generator=g), torch.randn(n_old + 1, D, generator=g), torch.randn(n_old + 1, generator=g)
    ne, nhw, nhb = torch.zeros(n_new + 1, D), torch.zeros(n_new + 1, D), torch.zeros(n_new + 1)
    rep = transfer_vocab(old_sp, new_sp, oe, ohw, ohb, ne, nhw, nhb)

    old_ids = {old_sp.id_to_piece(i): i for i in range(n_old)}
    shared = [(i, old_ids[new_sp.id_to_piece(i)]) for i in range(3, n_new) if new_sp.id_to_piece(i) in old_ids]
    assert rep.shared == len(shared) > 5
    assert rep.moved == sum(i != j for i, j in shared) > 0
    for i, j in shared + [(0, 0), (1, 1), (2, 2), (n_new, n_old)]:  # specials and the spare row too
        assert torch.equal(ne[i], oe[j]) and torch.equal(nhw[i], ohw[j]) and nhb[i] == ohb[j], (i, j)
    assert rep.special == 3 and rep.extra_rows == 1
    assert rep.shared + rep.special + rep.decomposed + rep.fallback == n_new
    assert rep.coverage == pytest.approx((rep.shared + 3) / n_new)

    # A new word-start piece made of old pieces: the mean of what the old tokenizer makes of it.
    piece = "▁sleeps" if new_sp.piece_to_id("▁sleeps") != new_sp.unk_id() else "▁sun"
    i = new_sp.piece_to_id(piece)
    assert piece not in old_ids
    parts = old_sp.encode(piece[1:], out_type=int)
    assert torch.allclose(ne[i], oe[parts].mean(0)) and torch.allclose(nhb[i], ohb[parts].mean())
    # Ge'ez pieces cannot be split into old pieces: mean of all old rows plus small noise.
    fresh = [i for i in range(n_new) if any("\u1200" <= c <= "\u137f" for c in new_sp.id_to_piece(i))]
    assert fresh and rep.fallback >= len(fresh)
    mean = oe[:n_old].mean(0)
    for i in fresh:
        assert not torch.equal(ne[i], mean)
        assert (ne[i] - mean).abs().max() < 1.0  # noise is 0.1 std of the old rows
    assert rep.to_dict()["coverage"] == round(rep.coverage, 6)


def test_word_internal_piece_drops_the_dummy_word_start(vocabs) -> None:
    from indextts.model.transfer import _decompose

    _, _, old_sp, _ = vocabs
    index = {old_sp.id_to_piece(i): i for i in range(old_sp.get_piece_size())}
    for piece in ("rown", "azy", "uns"):
        parts = _decompose(old_sp, index, piece)
        assert parts and "".join(old_sp.id_to_piece(p) for p in parts) == piece, piece
    parts = _decompose(old_sp, index, "▁runs")
    assert "".join(old_sp.id_to_piece(p) for p in parts) == "▁runs"


def test_import_with_both_vocabularies_moves_text_rows_by_piece(tmp_path: Path, vocabs) -> None:
    old_path, new_path, old_sp, new_sp = vocabs
    source = tiny(seed=1, number_text_tokens=old_sp.get_piece_size())
    path = official_file(tmp_path, source)
    target = tiny(seed=2, number_text_tokens=new_sp.get_piece_size())
    report = import_official(path, target, old_bpe=old_path, new_bpe=new_path)
    assert set(report.transferred) == {"text_embedding.weight", "text_head.weight", "text_head.bias"}
    assert "by piece string" in report.transferred["text_head.bias"]
    assert report.vocab is not None and report.vocab.shared > 5
    src = source.state_dict()["text_embedding.weight"]
    dst = target.state_dict()["text_embedding.weight"]
    for new_id, old_id in report.vocab.id_map.items():
        assert torch.equal(dst[new_id], src[old_id])
    assert not report.reinitialised
    # a different-size text table without the old vocabulary: re-initialised and told why
    report = import_official(path, tiny(seed=2, number_text_tokens=new_sp.get_piece_size()))
    assert "text vocabulary differs" in report.reinitialised["text_embedding.weight"]
    with pytest.raises(TransferError, match="both"):
        import_official(path, target, old_bpe=old_path)


def test_vocab_that_does_not_fit_the_table_is_refused(vocabs) -> None:
    _, _, old_sp, new_sp = vocabs
    n = new_sp.get_piece_size()
    with pytest.raises(TransferError, match="must be the bpe.model released with"):
        transfer_vocab(old_sp, new_sp, torch.zeros(7, 4), torch.zeros(7, 4), torch.zeros(7),
                       torch.zeros(n + 1, 4), torch.zeros(n + 1, 4), torch.zeros(n + 1))


def test_import_gpt_cli_writes_a_checkpoint_and_report(tmp_path: Path, vocabs) -> None:
    import json

    from indextts.checkpoint import load_checkpoint
    from indextts.pretrained import cli_export_gpt, cli_import_gpt

    old_path, new_path, old_sp, _ = vocabs
    path = official_file(tmp_path, tiny(seed=1, number_text_tokens=old_sp.get_piece_size()))
    cfg = json.dumps({"model": {"preset": "tiny"}, "text": {"language": "am"}})
    out = tmp_path / "ckpt"
    rc = cli_import_gpt(["--gpt", str(path), "--old-bpe", str(old_path), "--bpe", str(new_path), "--config", cfg,
                         "--codebook-size", "64", "--out-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["counts"]["transferred"] == 3 and report["vocab"]["shared"] > 5
    model, meta = load_checkpoint(out, vocab_path=new_path)
    assert meta["stage"] == "pretrained" and meta["parent_sha256"]
    rc = cli_export_gpt(["--checkpoint", str(out), "--bpe", str(new_path), "--out", str(tmp_path / "back.pth")])
    assert rc == 0
    back = torch.load(tmp_path / "back.pth", map_location="cpu", weights_only=True)
    assert set(back) == set(export_official(model))
    # the checkpoint's vocabulary is checked on export too
    assert cli_export_gpt(["--checkpoint", str(out), "--bpe", str(old_path), "--out", str(tmp_path / "x.pth")]) == 1
    assert import_checkpoint  # the library entry the CLI wraps


def test_model_package_reaches_no_pipeline_module() -> None:
    """indextts/model/ holds modules and the state-dict mapping; commands, checkpoints, codecs and
    the validate gate import it, never the other way round (no import circle)."""
    import ast

    allowed = ("indextts.model", "indextts.config", "indextts.features", "indextts.files")
    found = {}
    for path in sorted((REFERENCE.parents[2] / "indextts" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.startswith("indextts") and not name.startswith(allowed):
                    found.setdefault(path.name, []).append(name)
    assert found == {}


def test_import_into_a_delay_pattern_model_reinitialises_only_the_extra_codebooks(tmp_path: Path) -> None:
    source = tiny(seed=1)
    path = official_file(tmp_path, source)
    target = tiny(seed=2, n_codebooks=3)
    report = import_official(path, target)
    assert set(report.loaded) == set(source.state_dict())  # everything shared, codebook 0 included
    assert sorted(report.reinitialised) == sorted(k for k in target.state_dict() if k.startswith("extra_mel_"))
    assert len(report.reinitialised) == 6
    assert "codebook 2 of the delay pattern" in report.reinitialised["extra_mel_head.cb2.weight"]
    assert "re-initialised extra_mel_embedding.cb1.weight: codebook 1" in report.summary()
    assert torch.equal(target.mel_head.weight, source.mel_head.weight)


def test_export_of_a_delay_pattern_model_is_refused_with_the_alternative(tmp_path: Path) -> None:
    model = tiny(seed=1, n_codebooks=3)
    with pytest.raises(TransferError, match=r"predicts 3 codebooks.*reads one code stream.*checkpoint folder"):
        export_official(model)
    with pytest.raises(TransferError, match="predicts 3 codebooks"):
        save_official(model, tmp_path / "gpt.pth")
    assert not (tmp_path / "gpt.pth").exists()


def test_import_gpt_cli_takes_the_codebook_count_from_the_codes_index(tmp_path: Path, vocabs) -> None:
    import json

    from indextts.checkpoint import read_meta
    from indextts.pretrained import cli_export_gpt, cli_import_gpt

    _, new_path, _, new_sp = vocabs
    path = official_file(tmp_path, tiny(seed=1, number_text_tokens=new_sp.get_piece_size()))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"codec": {"codebook_size": 64, "n_q": 3}}))
    cfg = json.dumps({"model": {"preset": "tiny", "n_codebooks": None}})
    out = tmp_path / "ckpt"
    assert cli_import_gpt(["--gpt", str(path), "--bpe", str(new_path), "--config", cfg, "--codes-index", str(index),
                           "--out-dir", str(out)]) == 0
    assert read_meta(out)["model"]["n_codebooks"] == 3  # recorded in model.json
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["counts"]["reinitialised"] == 6 and all(k.startswith("extra_mel_") for k in report["reinitialised"])
    assert cli_export_gpt(["--checkpoint", str(out), "--bpe", str(new_path), "--out", str(tmp_path / "x.pth")]) == 1
    assert not (tmp_path / "x.pth").exists()


def test_import_gpt_cli_reads_a_semantic_codec_s_sizes_from_its_weights(tmp_path: Path, vocabs) -> None:
    # Without --codes-index or --codebook-size, the sizes come from the codec section's weights:
    # for codec.kind semantic, the MaskGCT semantic codec (one stream), not a DAC file.
    import json

    from indextts.checkpoint import read_meta
    from indextts.model.config import mel_vocab_size
    from indextts.pretrained import cli_import_gpt
    from indextts.audio.semantic_codec import TINY_CODEC, make_tiny_semantic

    _, new_path, _, new_sp = vocabs
    path = official_file(tmp_path, tiny(seed=1, number_text_tokens=new_sp.get_piece_size()))
    codec = make_tiny_semantic(tmp_path / "models")
    cfg = json.dumps({"model": {"preset": "tiny", "n_codebooks": None}, "codec": codec})
    out = tmp_path / "ckpt"
    assert cli_import_gpt(["--gpt", str(path), "--bpe", str(new_path), "--config", cfg, "--out-dir", str(out)]) == 0
    model = read_meta(out)["model"]
    assert model["number_mel_codes"] == mel_vocab_size(TINY_CODEC.codebook_size) and model["n_codebooks"] == 1
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["reinitialised"] == {}  # the tiny official file has the same code table: all of it loads
    bad = json.dumps({"model": {"preset": "tiny"}, "codec": {**codec, "weights": str(tmp_path / "missing.safetensors")}})
    assert cli_import_gpt(["--gpt", str(path), "--bpe", str(new_path), "--config", bad, "--out-dir", str(tmp_path / "x")]) == 1
