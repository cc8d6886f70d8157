"""The released IndexTTS2 files as a pipeline input and output: the ``pretrained`` config section,
the ``import-gpt`` / ``export-gpt`` commands and ``export`` (the final stage for other tooling).

The state-dict mapping itself (key by key, Conv1D transposition, vocabulary transfer by piece
string) lives in :mod:`indextts.model.transfer`; this module adds what a pipeline step needs
around it: building the model from the config, reading the codec's sizes from the codes index or
the codec weights, and writing a checkpoint folder with its transfer report.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from indextts.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, section_record
from indextts.config import ConfigError, get_section, load_config_arg
from indextts.files import atomic_path, sha256_file, write_json
from indextts.model import build_model
from indextts.model.config import ModelSection, mel_vocab_size
from indextts.model.transfer import TransferError, TransferReport, export_official, import_official


@dataclass(frozen=True)
class PretrainedConfig:
    """The ``pretrained`` config section: the released IndexTTS2 files to start from."""

    gpt: str | None = None  # the official gpt.pth; null trains from scratch
    bpe: str | None = None  # the official bpe.model, so text rows move by piece string
    # The released config.yaml: the export keeps its other sections (s2mel, vocoder, emotion
    # matrices ...) and replaces the gpt section's sizes. Read by the export only.
    config: str | None = None
    # The released files after the GPT, with which semantic-code stages are heard (samples and
    # evaluation; read by synthesis only): s2mel.pth, campplus_cn_common.bin and the
    # bigvgan_v2_22khz_80band_256x folder (config.json + bigvgan_generator.pt).
    s2mel: str | None = None
    campplus: str | None = None
    bigvgan: str | None = None


def import_checkpoint(
    gpt_pth: str | Path,
    out_dir: str | Path,
    *,
    config: Mapping[str, Any],
    bpe_path: str | Path,
    codebook_size: int,
    codes_n_q: int | None = None,
    old_bpe: str | Path | None = None,
    seed: int = 0,
) -> tuple[Path, TransferReport]:
    """Build our model from ``config``, import ``gpt_pth`` into it and save a checkpoint folder.

    The folder gets ``model.safetensors``, ``model.json`` (stage ``pretrained``, parent = the
    sha256 of ``gpt_pth``) and ``transfer_report.json``.

    Args:
        gpt_pth: the official file.
        out_dir: checkpoint folder to write.
        config: config sections ``model`` (required), ``text`` and ``codec`` (recorded).
        bpe_path: our vocabulary.
        codebook_size: the codec's codebook size (mel vocabulary = size + 2).
        codes_n_q: codebooks the codes hold, what ``model.n_codebooks: null`` resolves to (None:
            one codebook unless the section sets it). With more than one, the extra codebooks'
            tables and heads start fresh and the report lists them.
        old_bpe: the official ``bpe.model``, for transfer by piece string.
        seed: initialisation seed of the parts that do not load.

    Returns:
        (folder, report).
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.Load(str(bpe_path))
    section = get_section(ModelSection, config, "model")
    cfg = section.model_config(number_text_tokens=sp.get_piece_size(), number_mel_codes=mel_vocab_size(codebook_size),
                               codes_n_q=codes_n_q)
    torch.manual_seed(seed)
    model = build_model(cfg)
    report = import_official(
        gpt_pth, model, old_bpe=old_bpe, new_bpe=bpe_path if old_bpe is not None else None,
        generator=torch.Generator().manual_seed(seed),
    )
    out_dir = Path(out_dir)
    save_checkpoint(
        out_dir,
        model,
        model_cfg=cfg,
        vocab_path=bpe_path,
        text_cfg=section_record(config, "text"),
        codec_cfg=section_record(config, "codec"),
        stage="pretrained",
        training_type="full",
        parent_sha256=sha256_file(gpt_pth),
        data_index_sha256=None,
        step=0,
        extra={"source": str(Path(gpt_pth).resolve()), "transfer": report.to_dict()["counts"]},
    )
    write_json(out_dir / "transfer_report.json", report.to_dict())
    return out_dir, report


def cli_import_gpt(argv: list[str]) -> int:
    """``indextts import-gpt``: official gpt.pth -> our checkpoint folder + transfer report."""
    p = argparse.ArgumentParser(prog="indextts import-gpt", description=cli_import_gpt.__doc__)
    p.add_argument("--gpt", help="the official IndexTTS2 gpt.pth (default: pretrained.gpt)")
    p.add_argument("--old-bpe", help="the official bpe.model, so text rows move by piece string (default: pretrained.bpe)")
    p.add_argument("--bpe", required=True, help="our bpe.model")
    p.add_argument("--config", required=True, help="config file or inline JSON with the model/text/codec sections")
    p.add_argument("--codebook-size", type=int, help="codec codebook size (default: --codes-index, else the codec section's weights, DAC or semantic)")
    p.add_argument("--codes-index", help="results/codes/index.json, to take the codebook size and count the codes were made with")
    p.add_argument("--out-dir", required=True, help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of what does not load")
    a = p.parse_args(argv)
    config = load_config_arg(a.config)
    pre = get_section(PretrainedConfig, config, "pretrained")
    gpt, old_bpe = a.gpt or pre.gpt, a.old_bpe or pre.bpe
    if not gpt:
        raise ConfigError("pretrained.gpt: no official gpt.pth given (use --gpt or set pretrained.gpt)")
    try:
        if a.codes_index:
            from indextts.codes import codebook_size, codes_n_q

            size, n_q = codebook_size(a.codes_index), codes_n_q(a.codes_index)
        elif config.get("codec"):
            size, n_q = codec_sizes_from_config(config)
        else:
            size, n_q = None, None  # model.n_codebooks null then means one codebook
        size = a.codebook_size if a.codebook_size is not None else size
        if size is None:
            raise TransferError("nothing gives the codec's codebook size: pass --codes-index or --codebook-size, "
                                "or a config with codec.weights")
        out, report = import_checkpoint(
            gpt, a.out_dir, config=config, bpe_path=a.bpe, codebook_size=size, codes_n_q=n_q, old_bpe=old_bpe,
            seed=a.seed,
        )
    except ConfigError:
        raise  # the CLI reports config errors itself (exit 2)
    except (TransferError, CheckpointError, ValueError) as e:  # ValueError: codec weights, index
        print(f"indextts import-gpt: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {out}")
    return 0


def cli_export_gpt(argv: list[str]) -> int:
    """``indextts export-gpt``: our checkpoint folder -> a gpt.pth in the official layout."""
    p = argparse.ArgumentParser(prog="indextts export-gpt", description=cli_export_gpt.__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (model.safetensors + model.json)")
    p.add_argument("--bpe", required=True, help="the bpe.model the checkpoint was trained with")
    p.add_argument("--out", required=True, help="gpt.pth to write")
    a = p.parse_args(argv)
    try:
        model, meta = load_checkpoint(a.checkpoint, vocab_path=a.bpe)
        sd = export_official(model)
        with atomic_path(a.out) as tmp:
            torch.save(sd, tmp)
    except (TransferError, CheckpointError) as e:
        print(f"indextts export-gpt: {e}", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {a.out}: {len(sd)} tensors, {n / 1e6:.1f}M parameters (stage {meta.get('stage')}, step {meta.get('step')})")
    return 0


def codec_sizes_from_config(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(codebook size, codebooks kept)`` of the codec weights named in the ``codec`` section:
    a DAC file (``codec.n_quantizers`` applied), or for ``codec.kind: semantic`` the MaskGCT
    semantic codec (one stream)."""
    from indextts.audio.dac import load_codec
    from indextts.codes import CodecConfig

    if not config.get("codec"):
        raise TransferError("the config has no codec section: pass --codebook-size, or a config with codec.weights")
    codec = get_section(CodecConfig, config, "codec")
    if codec.kind == "semantic":
        from indextts.audio.semantic_codec import load_semantic_codec

        cfg = load_semantic_codec(codec.weights).cfg
        return cfg.codebook_size, cfg.num_quantizers
    _, info = load_codec(codec.weights, device="cpu", n_quantizers=codec.n_quantizers)
    return info.codebook_size, info.n_q


# --- export of the final stage ------------------------------------------------------------------

# Our ModelConfig field -> key of the released config.yaml's gpt section.
GPT_SECTION_KEYS = {
    "model_dim": "model_dim", "max_mel_tokens": "max_mel_tokens", "max_text_tokens": "max_text_tokens",
    "heads": "heads", "layers": "layers", "number_text_tokens": "number_text_tokens",
    "number_mel_codes": "number_mel_codes", "start_mel_token": "start_mel_token", "stop_mel_token": "stop_mel_token",
    "start_text_token": "start_text_token", "stop_text_token": "stop_text_token",
}
# condition_module / emo_condition_module keys, from the cond_ / emo_ prefixed fields.
CONDITION_KEYS = ("output_size", "linear_units", "attention_heads", "num_blocks", "perceiver_mult")
# What IndexTTS2's UnifiedVoice fixes in code rather than in config.yaml: the conformers read
# 1024-dim w2v-BERT features, the emotion perceiver is 1024 wide, 32 speaker latents by default.
OFFICIAL_FIXED = {"cond_feat_dim": 1024, "emo_perceiver_dim": 1024}
EXPORT_REPORT = "export_report.json"


def official_gpt_config(cfg: Any, released: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.yaml for an exported ``gpt.pth``: the released file's sections kept (when
    given), its ``gpt`` section carrying our sizes, vocabularies and start/stop ids.

    Args:
        cfg: the model's :class:`~indextts.model.ModelConfig`.
        released: the released config.yaml, parsed (None: a gpt section of our own with the
            released defaults for the keys we do not model).
    """
    out = {k: v for k, v in (released or {}).items()}
    gpt = dict(out.get("gpt") or {})
    gpt.setdefault("use_mel_codes_as_input", True)
    gpt.setdefault("mel_length_compression", 1024)
    gpt.setdefault("train_solo_embeddings", False)
    gpt.setdefault("condition_type", "conformer_perceiver")
    for ours, theirs in GPT_SECTION_KEYS.items():
        gpt[theirs] = getattr(cfg, ours)
    if cfg.condition_num_latent != 32 or "condition_num_latent" in gpt:
        gpt["condition_num_latent"] = cfg.condition_num_latent
    for section, prefix in (("condition_module", "cond_"), ("emo_condition_module", "emo_")):
        mod = dict(gpt.get(section) or {})
        mod.setdefault("input_layer", "conv2d2")
        mod.update({k: getattr(cfg, prefix + k) for k in CONDITION_KEYS})
        gpt[section] = mod
    out["gpt"] = gpt
    out["gpt_checkpoint"] = "gpt.pth"
    out["dataset"] = {**dict(out.get("dataset") or {}), "bpe_model": "bpe.model"}
    return out


def _probe_batch(cfg: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random batch (two rows of different lengths) that exercises every part of the model."""
    g = torch.Generator().manual_seed(seed)
    K = cfg.n_codebooks
    return dict(
        text_ids=torch.randint(2, cfg.text_vocab_size, (2, 9), generator=g), text_lengths=torch.tensor([9, 5]),
        codes=torch.randint(0, cfg.number_mel_codes - 2, (2, K, 20), generator=g), code_lengths=torch.tensor([20, 12]),
        cond_feats=torch.randn(2, 40, cfg.cond_feat_dim, generator=g), cond_lengths=torch.tensor([40, 31]),
    )


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, Any]:
    """Both models (eval mode) on one probe batch: whether every output is bitwise equal, and the
    largest absolute difference of the losses and logits."""
    batch = _probe_batch(a.cfg)
    with torch.no_grad():
        oa, ob = a.eval()(**batch), b.eval()(**batch)
    diffs = {name: float((getattr(oa, name) - getattr(ob, name)).abs().max())
             for name in ("loss", "text_logits", "mel_logits", "emo_vec")}
    return {"identical": all(d == 0.0 for d in diffs.values()), "max_abs_diff": max(diffs.values()), "by_output": diffs}


def _capabilities(cfg: Any, codec: Mapping[str, Any], official: bool, refused: str | None) -> dict[str, Any]:
    """What IndexTTS2's own inference can and cannot do with the export, stated plainly."""
    kind = codec.get("kind", "dac")
    fixed = {k: (getattr(cfg, k), v) for k, v in OFFICIAL_FIXED.items() if getattr(cfg, k) != v}
    can, cannot = [], []
    decode = (f"turn its codes into audio: its s2mel stage decodes only its MaskGCT semantic codes, and this model "
              f"predicts {kind.upper()} codes ({cfg.n_codebooks} codebook(s) of {cfg.number_mel_codes - 2}); decode "
              "them with the DAC the codes were made with, as `indextts synthesize` does")
    if not official:
        cannot.append(f"load it: {refused}")
        if kind != "semantic":
            cannot.append(decode)
        can.append("nothing directly; the export is our checkpoint folder (model.safetensors + model.json + bpe.model), "
                   "which indextts.checkpoint.load_checkpoint loads and `indextts synthesize --checkpoint` speaks")
        return {"official_layout": False, "drop_in": False, "can": can, "cannot": cannot}
    if fixed:
        cannot.append("load it with its UnifiedVoice as released: that class fixes "
                      + ", ".join(f"{k} = {v[1]} (this model has {v[0]})" for k, v in fixed.items())
                      + " in code, not in config.yaml, so its strict load refuses these shapes; the key names and "
                        "the layout are the official ones")
    else:
        can.append("load gpt.pth with the exported config.yaml (its gpt section carries this model's sizes, "
                   "vocabulary and start/stop ids) and bpe.model")
    if kind == "semantic":
        if not fixed:
            can.append("run it whole: the codes are its own MaskGCT semantic codes, so its s2mel stage, vocoder and "
                       "emotion machinery work unchanged. Replace gpt.pth, bpe.model and config.yaml in the released "
                       "checkpoint folder (the w2v-BERT stats, s2mel, BigVGAN, campplus, emotion matrices stay)")
    else:
        cannot.append(decode)
    return {"official_layout": True, "drop_in": kind == "semantic" and not fixed, "can": can, "cannot": cannot}


def export_stage(checkpoint: str | Path, out_dir: str | Path, *, released_config: str | Path | None = None
                 ) -> dict[str, Any]:
    """Export a stage folder (the final one, stage 3) for other tooling, with a re-import check.

    One code stream: ``gpt.pth`` in the official layout (merged weights, Conv1D transposed back),
    ``config.yaml`` (:func:`official_gpt_config`), ``bpe.model`` and ``model.json``; the check
    imports ``gpt.pth`` back into a freshly built model of ours and requires every tensor and
    every output on a probe batch to be identical. Several codebooks: the official layout has no
    place for them (the report says why), so our checkpoint folder is exported instead and
    loaded back from the export for the same check.

    Returns:
        The report (also written as ``export_report.json``): files, the check, and what
        IndexTTS2's own inference can and cannot do with the export.

    Raises:
        CheckpointError: an unusable checkpoint folder.
        TransferError: the re-import check fails (nothing is left that claims to be good).
    """
    import yaml

    from indextts.checkpoint import META, WEIGHTS, checkpoint_vocab, tensor_equal

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    vocab = checkpoint_vocab(checkpoint)
    model, meta = load_checkpoint(checkpoint, vocab_path=vocab)
    cfg = model.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    for src, name in ((vocab, "bpe.model"), (checkpoint / META, META)):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(src, tmp)
    try:
        state = export_official(model)
        refused = None
    except TransferError as e:
        state, refused = None, str(e)
    files = ["bpe.model", META]
    if state is not None:
        with atomic_path(out_dir / "gpt.pth") as tmp:
            torch.save({k: v.cpu() for k, v in state.items()}, tmp)
        released = None
        if released_config:
            released = yaml.safe_load(Path(released_config).read_text(encoding="utf-8")) or {}
        with atomic_path(out_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(official_gpt_config(cfg, released), sort_keys=False, allow_unicode=True),
                           encoding="utf-8")
        files += ["gpt.pth", "config.yaml"]
        torch.manual_seed(12345)  # any other initialisation: the import must overwrite all of it
        back = build_model(cfg)
        transfer = import_official(out_dir / "gpt.pth", back)
        check = {"how": "gpt.pth imported into a fresh model of the same config", "reinitialised": len(transfer.reinitialised),
                 "unused": len(transfer.unused)}
    else:
        for name in (WEIGHTS,):
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(checkpoint / name, tmp)
        files.append(WEIGHTS)
        back, _ = load_checkpoint(out_dir, vocab_path=out_dir / "bpe.model", verify_sha256=True)
        check = {"how": "the exported checkpoint folder loaded back with load_checkpoint"}
    check["differing_tensors"] = tensor_equal(model.state_dict(), back.state_dict())
    check.update(same_outputs(model, back))
    check["ok"] = not check["differing_tensors"] and check["identical"] and not check.get("reinitialised")
    report = {
        "checkpoint": str(checkpoint), "stage": meta.get("stage"), "step": meta.get("step"),
        "n_codebooks": cfg.n_codebooks, "codec": {k: (meta.get("codec") or {}).get(k) for k in ("kind", "weights")},
        "released_config": str(released_config) if released_config else None,
        "files": sorted(files + [EXPORT_REPORT]), "official_refused": refused, "reimport": check,
        "indextts2": _capabilities(cfg, meta.get("codec") or {}, state is not None, refused),
        "positions": ("Our generation feeds frame t of codebook 0 at mel position t + 1, as training does; "
                      "IndexTTS2's HF-based inference reads the mel position table one entry further. On equal weights "
                      "with the positions aligned, greedy codes agree; this pipeline keeps training's positions."),
    }
    write_json(out_dir / EXPORT_REPORT, report)
    if not check["ok"]:
        raise TransferError(f"{out_dir}: the export does not re-import identically: {check}")
    return report


def cli_export(argv: list[str]) -> int:
    """``indextts export``: the final stage folder -> the official layout (or our folder), with a re-import check."""
    p = argparse.ArgumentParser(prog="indextts export", description=cli_export.__doc__)
    p.add_argument("--checkpoint", required=True, help="the stage folder, e.g. results/train/stage3")
    p.add_argument("--out-dir", required=True, help="export folder, e.g. results/export")
    p.add_argument("--config", help="config file or inline JSON with the pretrained section (its config: the released config.yaml)")
    a = p.parse_args(argv)
    pre = get_section(PretrainedConfig, load_config_arg(a.config), "pretrained") if a.config else PretrainedConfig()
    try:
        report = export_stage(a.checkpoint, a.out_dir, released_config=pre.config)
    except (TransferError, CheckpointError) as e:
        print(f"indextts export: {e}", file=sys.stderr)
        return 1
    check = report["reimport"]
    layout = "official gpt.pth layout" if report["indextts2"]["official_layout"] else "our checkpoint folder"
    print(f"wrote {a.out_dir} ({layout}): {', '.join(report['files'])}; re-import identical: {check['ok']}")
    if report["official_refused"]:
        print(f"official layout refused: {report['official_refused']}")
    for line in report["indextts2"]["cannot"]:
        print(f"IndexTTS2 cannot {line}")
    return 0
