"""The released IndexTTS2 files as a pipeline input: the ``pretrained`` config section and the
``import-gpt`` / ``export-gpt`` commands.

The state-dict mapping itself (key by key, Conv1D transposition, vocabulary transfer by piece
string) lives in :mod:`indextts.model.transfer`; this module adds what a pipeline step needs
around it: building the model from the config, reading the codec's sizes from the codes index or
the codec weights, and writing a checkpoint folder with its transfer report.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--codebook-size", type=int, help="codec codebook size (default: --codes-index, else the codec section's weights)")
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
            info = codec_info_from_config(config)
            size, n_q = info.codebook_size, info.n_q
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


def codec_info_from_config(config: Mapping[str, Any]):
    """The :class:`~indextts.codec.CodecInfo` (codebook size, codebooks kept ...) of the DAC weights
    named in the ``codec`` section."""
    from indextts.codec import CodecConfig, load_codec

    if not config.get("codec"):
        raise TransferError("the config has no codec section: pass --codebook-size, or a config with codec.weights")
    codec = get_section(CodecConfig, config, "codec")
    _, info = load_codec(codec.weights, device="cpu", n_quantizers=codec.n_quantizers)
    return info
