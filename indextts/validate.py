"""``indextts validate``: check data, vocabulary and model end to end before stage 1 trains.

A training job that dies after an hour on a bad column, a vocabulary that maps half the text to
``<unk>``, a NaN in the first backward or a checkpoint that does not load back wastes a GPU day.
This gate runs the real code paths on the real inputs, in order, each check reported with its
numbers into ``results/validate/report.json``:

1. ``manifest``: clean.parquet has the contract's columns and types, unique utt_ids, train rows.
2. ``vocab``: special ids ``<s>``=0, ``</s>``=1, ``<unk>``=2; UNK ratio of the clean text within
   ``vocab.max_unk_ratio``.
3. ``codes``: the shards of the codes index read back, codes lie inside the codebook, every
   utt_id is in the clean manifest.
4. ``batch``: the model of the ``model`` section (with the pretrained import when configured,
   and ``model.n_codebooks`` resolved against the codebooks the codes hold) runs forward and
   backward on one real batch from the shards; the loss, each codebook's loss and every gradient
   are finite.
5. ``checkpoint``: that model saved and loaded back gives equal tensors.

A check whose inputs failed is reported as skipped. Any failure exits non-zero naming it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from indextts.config import get_section, load_config_arg
from indextts.files import write_json


@dataclass(frozen=True)
class ValidateConfig:
    """The ``validate`` config section."""

    batch_size: int = 4  # utterances in the real batch that goes through forward + backward
    split: Literal["train", "val"] = "train"  # split that batch is drawn from
    seed: int = 0  # batch, reference and initialisation seed
    max_unk_texts: int = 20000  # transcripts tokenised for the UNK ratio (a seeded sample beyond)
    max_ref_seconds: float = 6.0  # reference audio crop for the conditioning features
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available


class ValidationFailed(RuntimeError):
    """One or more checks failed; ``report`` is the full report (also written to disk)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Check:
    name: str
    status: Literal["pass", "fail", "skip"] = "skip"
    numbers: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "message": self.message,
            "numbers": self.numbers,
            "seconds": round(self.seconds, 3),
        }


class _Fail(Exception):
    """A check's own verdict (as opposed to a crash inside it)."""


# Contract of clean.parquet (DESIGN §3): column -> accepted Arrow type family.
_CLEAN_COLUMNS = {
    "utt_id": "string",
    "audio_path": "string",
    "text": "string",
    "raw_text": "string",
    "speaker": "string",
    "language": "string",
    "emotion": "string",
    "duration": "float",
    "sample_rate": "integer",
    "channels": "integer",
    "split": "string",
}


# Columns that may be entirely null (Arrow then types them ``null``).
_NULLABLE = ("emotion",)


def _type_family(t) -> str:
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_dictionary(t):
        return _type_family(t.value_type)
    return str(t)


def check_manifest(clean_path: Path) -> dict[str, Any]:
    """Columns, types and basic invariants of clean.parquet. Raises _Fail with the problems."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(clean_path)
    problems = []
    for col, fam in _CLEAN_COLUMNS.items():
        if col not in table.column_names:
            problems.append(f"missing column {col!r}")
        elif (got := _type_family(table.schema.field(col).type)) != fam and not (col in _NULLABLE and got == "null"):
            problems.append(f"column {col!r} is {got}, expected {fam}")
    n = table.num_rows
    numbers: dict[str, Any] = {"rows": n, "columns": len(table.column_names)}
    if "utt_id" in table.column_names:
        dup = n - len(pc.unique(table.column("utt_id")))
        numbers["duplicate_utt_ids"] = dup
        if dup:
            problems.append(f"{dup} duplicate utt_id values")
    for col in ("utt_id", "audio_path", "text", "speaker"):
        if col in table.column_names:
            nulls = table.column(col).null_count
            if nulls:
                problems.append(f"{nulls} null values in {col!r}")
    if "text" in table.column_names:
        empty = int(pc.sum(pc.equal(pc.utf8_length(pc.fill_null(table.column("text"), "")), 0)).as_py() or 0)
        numbers["empty_text"] = empty
        if empty:
            problems.append(f"{empty} rows with empty text")
    if "split" in table.column_names:
        counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(table.column("split")).to_pylist()}
        numbers["split_counts"] = counts
        odd = sorted(set(counts) - {"train", "val"})
        if odd:
            problems.append(f"split values other than train/val: {odd}")
        if not counts.get("train"):
            problems.append("no train rows")
    if "duration" in table.column_names and _type_family(table.schema.field("duration").type) == "float":
        numbers["hours"] = round(float(pc.sum(table.column("duration")).as_py() or 0.0) / 3600, 4)
    if "speaker" in table.column_names:
        numbers["speakers"] = len(pc.unique(table.column("speaker")))
    if "audio_path" in table.column_names and n:
        sample = table.column("audio_path").to_pylist()[: min(n, 50)]
        missing = [p for p in sample if p is None or not Path(p).is_file()]
        numbers["audio_checked"] = len(sample)
        if missing:
            problems.append(f"{len(missing)} of the first {len(sample)} audio files are missing (first: {missing[0]})")
    if problems:
        raise _Fail(f"{clean_path}: " + "; ".join(problems), numbers)
    return numbers


def check_vocab(bpe_path: Path, clean_path: Path, *, max_unk_ratio: float, max_texts: int, seed: int) -> dict[str, Any]:
    """Special ids and the UNK ratio of the clean text."""
    import numpy as np
    import pyarrow.parquet as pq
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(bpe_path))
    except Exception as e:
        raise _Fail(f"{bpe_path}: not a SentencePiece model ({e})", {}) from e
    numbers: dict[str, Any] = {"n_pieces": sp.get_piece_size(), "max_unk_ratio": max_unk_ratio}
    problems = []
    for i, want in enumerate(("<s>", "</s>", "<unk>")):
        got = sp.id_to_piece(i) if i < sp.get_piece_size() else None
        if got != want:
            problems.append(f"id {i} is {got!r}, IndexTTS needs {want!r}")
    if sp.unk_id() != 2:
        problems.append(f"unk_id is {sp.unk_id()}, IndexTTS needs 2")
    texts = pq.read_table(clean_path, columns=["text"]).column("text").to_pylist()
    texts = [t for t in texts if t]
    if len(texts) > max_texts:
        pick = np.random.default_rng(seed).choice(len(texts), size=max_texts, replace=False)
        texts = [texts[i] for i in sorted(pick)]
    ids = sp.encode(texts, out_type=int)
    total = sum(len(x) for x in ids)
    unk = sum(x.count(sp.unk_id()) for x in ids)
    ratio = unk / max(total, 1)
    numbers.update(texts=len(texts), tokens=total, unk_tokens=unk, unk_ratio=round(ratio, 6),
                   max_text_tokens=max((len(x) for x in ids), default=0))
    if ratio > max_unk_ratio:
        problems.append(f"UNK ratio {ratio:.4f} exceeds vocab.max_unk_ratio={max_unk_ratio}")
    if problems:
        raise _Fail(f"{bpe_path}: " + "; ".join(problems), numbers)
    return numbers


def check_codes(codes_index: Path, clean_path: Path, *, n_codes: int) -> dict[str, Any]:
    """Every shard of the index reads back; codes within the codebook; utt_ids known."""
    import numpy as np
    import pyarrow.parquet as pq

    from indextts.codes import read_shard_codes, shard_paths

    paths = shard_paths(codes_index)
    known = set(pq.read_table(clean_path, columns=["utt_id"]).column("utt_id").to_pylist())
    rows = frames = 0
    max_code = -1
    problems = []
    n_q = set()
    for p in paths:
        sh = read_shard_codes(p)
        n_q.add(sh.n_q)
        if int(sh.codec.get("codebook_size", n_codes)) != n_codes:
            problems.append(f"{p}: made with codebook size {sh.codec['codebook_size']}, the index says {n_codes}")
        rows += len(sh)
        unknown = [u for u in sh.meta["utt_id"] if u not in known]
        if unknown:
            problems.append(f"{p}: {len(unknown)} utt_ids not in the clean manifest (first {unknown[0]!r}); rerun extract_codes")
        for i in range(len(sh)):
            c = sh.codes(i)
            frames += c.shape[1]
            if c.size:
                max_code = max(max_code, int(np.max(c)))
                if int(np.min(c)) < 0:
                    problems.append(f"{p}: utt {sh.meta['utt_id'].iloc[i]!r} has negative codes")
    numbers = {"shards": len(paths), "rows": rows, "frames": frames, "n_q": sorted(n_q), "max_code": max_code,
               "codebook_size": n_codes}
    if rows == 0:
        problems.append(f"{codes_index}: the shards hold no utterance")
    if max_code >= n_codes:
        problems.append(f"code {max_code} is outside the codebook of {n_codes}; codes and codec config disagree")
    if problems:
        raise _Fail("; ".join(problems), numbers)
    return numbers


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise _Fail("validate.device is 'cuda' but no CUDA device is available", {})
    return torch.device(name)


def check_batch(state: dict[str, Any], config: Mapping[str, Any], vcfg: ValidateConfig, *, bpe_path: Path,
                codes_index: Path, clean_path: Path, n_codes: int, pretrained_gpt: Path | None,
                pretrained_bpe: Path | None, pack: str | Path | None = None,
                tokens: str | Path | None = None) -> dict[str, Any]:
    """One real batch through forward and backward; finite loss and gradients."""
    import sentencepiece as spm
    import torch

    from indextts.codes import codes_n_q, shard_paths
    from indextts.config import ConfigError
    from indextts.data import BucketBatchSampler, collate
    from indextts.dataset import CodesDataset
    from indextts.pack import data_cache
    from indextts.model import build_model
    from indextts.model.config import ModelSection, mel_vocab_size

    sp = spm.SentencePieceProcessor()
    sp.Load(str(bpe_path))
    section = get_section(ModelSection, config, "model")
    n_q = codes_n_q(codes_index)
    try:
        cfg = section.model_config(number_text_tokens=sp.get_piece_size(), number_mel_codes=mel_vocab_size(n_codes),
                                   codes_n_q=n_q)
    except ConfigError as e:
        raise _Fail(f"{codes_index}: {e}", {"codes_n_q": n_q, "n_codebooks": section.n_codebooks}) from e
    numbers: dict[str, Any] = {"preset": cfg.preset, "n_codebooks": cfg.n_codebooks, "codes_n_q": n_q}
    if cfg.features.kind == "w2v_bert":
        # The data loader reads w2v-BERT prompts stored by extract_codes; say so before the batch.
        from indextts.features import features_path_for

        missing = [p for p in map(features_path_for, shard_paths(codes_index)) if not p.is_file()]
        if missing:
            raise _Fail(
                f"model features.kind is 'w2v_bert', read from the prompt features extract_codes stores, but "
                f"{missing[0]} is missing: set features.store: true (with codec.kind: semantic) and rerun "
                "extract_codes, or set model.overrides.features.kind to log_mel", numbers)
    torch.manual_seed(vcfg.seed)
    model = build_model(cfg)
    numbers["params"] = sum(p.numel() for p in model.parameters())
    if pretrained_gpt is not None:
        from indextts.model.transfer import import_official

        rep = import_official(pretrained_gpt, model, old_bpe=pretrained_bpe,
                              new_bpe=bpe_path if pretrained_bpe is not None else None,
                              generator=torch.Generator().manual_seed(vcfg.seed))
        numbers["pretrained"] = rep.to_dict()["counts"]
        if rep.vocab is not None:
            numbers["pretrained"]["vocab_coverage"] = round(rep.vocab.coverage, 6)
        print(rep.summary())
    pack, tokens = data_cache(codes_index, clean_path, bpe_path, pack=pack, tokens=tokens)
    ds = CodesDataset(pack=pack, tokens=tokens, bpe_path=bpe_path, features=cfg.features, split=vcfg.split,
                      seed=vcfg.seed, max_text_tokens=cfg.max_text_tokens,
                      max_code_frames=cfg.max_code_frames, max_ref_seconds=vcfg.max_ref_seconds,
                      n_codebooks=cfg.n_codebooks)
    numbers["dataset"] = {"utterances": len(ds), "dropped": ds.dropped}
    first = next(iter(BucketBatchSampler(ds.lengths, vcfg.batch_size, seed=vcfg.seed)))
    batch = collate([ds[i] for i in first])
    device = _device(vcfg.device)
    model.to(device).train()
    batch = batch.to(device)
    t0 = time.perf_counter()
    out = model(**batch.inputs())
    out.loss.backward()
    numbers["forward_backward_s"] = round(time.perf_counter() - t0, 3)
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, g in grads if g is None]
    bad = [n for n, g in grads if g is not None and not torch.isfinite(g).all()]
    norm = torch.norm(torch.stack([g.detach().float().norm() for _, g in grads if g is not None])).item()
    numbers.update(
        device=str(device),
        batch={"utterances": len(first), "text_ids": list(batch.text_ids.shape), "codes": list(batch.codes.shape),
               "cond_feats": list(batch.cond_feats.shape)},
        loss=float(out.loss.detach()), text_loss=float(out.text_loss.detach()), mel_loss=float(out.mel_loss.detach()),
        mel_losses=[round(float(x), 6) for x in out.mel_losses.detach()],
        grad_norm=norm, params_without_grad=len(no_grad),
    )
    model.zero_grad(set_to_none=True)  # the round trip needs the weights only
    state.update(model=model.cpu(), cfg=cfg)
    problems = []
    if not math.isfinite(numbers["loss"]):
        problems.append(f"loss is {numbers['loss']}")
    bad_cb = [k for k, x in enumerate(numbers["mel_losses"]) if not math.isfinite(x)]
    if bad_cb:
        problems.append(f"the code loss of codebook(s) {bad_cb} is not finite")
    if bad:
        problems.append(f"{len(bad)} parameters have non-finite gradients (first: {bad[0]})")
    if not math.isfinite(norm):
        problems.append(f"gradient norm is {norm}")
    if problems:
        raise _Fail("; ".join(problems), numbers)
    return numbers


def check_checkpoint(state: dict[str, Any], config: Mapping[str, Any], *, bpe_path: Path, work_dir: Path) -> dict[str, Any]:
    """Save the batch check's model and load it back; all tensors equal."""
    from indextts.checkpoint import load_checkpoint, save_checkpoint, section_record, tensor_equal

    model, cfg = state["model"], state["cfg"]
    ckpt = work_dir / ".roundtrip"
    shutil.rmtree(ckpt, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        save_checkpoint(ckpt, model, model_cfg=cfg, vocab_path=bpe_path, text_cfg=section_record(config, "text"),
                        codec_cfg=section_record(config, "codec"), stage="validate", training_type="full",
                        parent_sha256=None, data_index_sha256=None, step=0)
        t1 = time.perf_counter()
        loaded, meta = load_checkpoint(ckpt, vocab_path=bpe_path, verify_sha256=True)
        t2 = time.perf_counter()
        diff = tensor_equal(model.state_dict(), loaded.state_dict())
        numbers = {"bytes": meta["weights"]["bytes"], "tensors": meta["weights"]["n_tensors"],
                   "save_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3), "differing": len(diff)}
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    if diff:
        raise _Fail(f"{len(diff)} tensors differ after the round trip (first: {diff[0]})", numbers)
    return numbers


def validate_pipeline(
    config: Mapping[str, Any],
    *,
    clean_path: str | Path,
    bpe_path: str | Path,
    codes_index: str | Path,
    out_path: str | Path,
    pretrained_gpt: str | Path | None = None,
    pretrained_bpe: str | Path | None = None,
    pack: str | Path | None = None,
    tokens: str | Path | None = None,
) -> Path:
    """Run the checks in order and write the report.

    Args:
        config: the config sections ``text``, ``vocab``, ``codec``, ``codes``, ``model``,
            ``pretrained``, ``validate`` (missing sections take their defaults).
        clean_path, bpe_path, codes_index: the stage inputs.
        out_path: ``report.json`` to write (written whether the checks pass or not).
        pretrained_gpt, pretrained_bpe: override ``pretrained.gpt`` / ``pretrained.bpe``.
        pack, tokens: the training data cache the batch is read from (``pack_codes``,
            ``tokenize_text``); None: made beside ``codes_index``.

    Returns:
        ``out_path``.

    Raises:
        ValidationFailed: a check failed; the message names each failed check.
    """
    from indextts.pretrained import PretrainedConfig
    from indextts.vocab import VocabConfig

    vcfg = get_section(ValidateConfig, config, "validate")
    pcfg = get_section(PretrainedConfig, config, "pretrained")
    max_unk = get_section(VocabConfig, config, "vocab").max_unk_ratio
    clean_path, bpe_path, codes_index, out_path = map(Path, (clean_path, bpe_path, codes_index, out_path))
    gpt = Path(pretrained_gpt) if pretrained_gpt else (Path(pcfg.gpt) if pcfg.gpt else None)
    old_bpe = Path(pretrained_bpe) if pretrained_bpe else (Path(pcfg.bpe) if pcfg.bpe else None)

    state: dict[str, Any] = {}
    checks: list[Check] = []

    def run(name: str, needs: tuple[str, ...], fn: Callable[[], dict[str, Any]]) -> None:
        chk = Check(name)
        checks.append(chk)
        failed = [c.name for c in checks if c.name in needs and c.status != "pass"]
        if failed:
            chk.message = f"skipped: needs {', '.join(failed)}"
            print(f"[skip] {name}: {chk.message}", flush=True)
            return
        t0 = time.perf_counter()
        try:
            chk.numbers = fn()
            chk.status = "pass"
        except _Fail as e:
            chk.status, chk.message = "fail", str(e.args[0])
            chk.numbers = e.args[1] if len(e.args) > 1 else {}
        except Exception as e:  # a crash is a failure of this check, reported with its cause
            chk.status, chk.message = "fail", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        chk.seconds = time.perf_counter() - t0
        print(f"[{chk.status}] {name} ({chk.seconds:.1f}s) {chk.message}".rstrip(), flush=True)
        print(f"       {chk.numbers}", flush=True)

    run("manifest", (), lambda: check_manifest(clean_path))
    run("vocab", ("manifest",), lambda: check_vocab(bpe_path, clean_path, max_unk_ratio=max_unk,
                                                    max_texts=vcfg.max_unk_texts, seed=vcfg.seed))

    def codes() -> dict[str, Any]:
        from indextts.codes import codebook_size

        state["n_codes"] = codebook_size(codes_index)
        return check_codes(codes_index, clean_path, n_codes=state["n_codes"])

    run("codes", ("manifest",), codes)
    run("batch", ("vocab", "codes"), lambda: check_batch(
        state, config, vcfg, bpe_path=bpe_path, codes_index=codes_index, clean_path=clean_path,
        n_codes=state["n_codes"], pretrained_gpt=gpt, pretrained_bpe=old_bpe, pack=pack, tokens=tokens))
    run("checkpoint", ("batch",), lambda: check_checkpoint(state, config, bpe_path=bpe_path, work_dir=out_path.parent))

    failed = [c for c in checks if c.status != "pass"]
    report = {
        "ok": not failed,
        "failed": [c.name for c in failed],
        "inputs": {"clean": str(clean_path), "bpe": str(bpe_path), "codes_index": str(codes_index),
                   "pretrained_gpt": str(gpt) if gpt else None, "pretrained_bpe": str(old_bpe) if old_bpe else None},
        "checks": [c.to_dict() for c in checks],
    }
    write_json(out_path, report)
    if failed:
        raise ValidationFailed(
            "validate failed: " + "; ".join(f"{c.name}: {c.message}" for c in failed), report
        )
    return out_path


def cli_validate(argv: list[str]) -> int:
    """``indextts validate``: the pre-training gate; exit 1 naming the failed checks."""
    p = argparse.ArgumentParser(prog="indextts validate", description=cli_validate.__doc__)
    p.add_argument("--config", required=True, help="config file or inline JSON (sections text, vocab, codec, codes, model, pretrained, validate)")
    p.add_argument("--clean", required=True, help="results/clean/clean.parquet")
    p.add_argument("--bpe", required=True, help="results/vocab/bpe.model")
    p.add_argument("--codes-index", required=True, help="results/codes/index.json")
    p.add_argument("--pretrained-gpt", help="official gpt.pth (default: pretrained.gpt)")
    p.add_argument("--pretrained-bpe", help="official bpe.model (default: pretrained.bpe)")
    p.add_argument("--out", required=True, help="report.json to write")
    p.add_argument("--pack", help="the codes pack folder, results/codes/pack (default: made beside --codes-index)")
    p.add_argument("--tokens", help="its tokens folder for --bpe, results/tokens (default: made beside the pack)")
    a = p.parse_args(argv)
    config = load_config_arg(a.config)
    try:
        out = validate_pipeline(config, clean_path=a.clean, bpe_path=a.bpe, codes_index=a.codes_index,
                                out_path=a.out, pretrained_gpt=a.pretrained_gpt, pretrained_bpe=a.pretrained_bpe,
                                pack=a.pack, tokens=a.tokens)
    except ValidationFailed as e:
        print(f"indextts validate: {e}", file=sys.stderr)
        return 1
    print(f"all checks passed; wrote {out}")
    return 0
