"""Before any step: the stage's inputs, checked all at once (:func:`preflight`), and its starting
model (from scratch, the released ``gpt.pth`` or the previous stage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from indextts.config import get_section
from indextts.files import sha256_file
from indextts.train.settings import PreflightError, TrainConfig


@dataclass
class StageInputs:
    """Input paths of a stage (what the rule names)."""

    codes_index: Path
    clean: Path
    bpe: Path
    out_dir: Path
    parent: Path | None = None  # stage 2 and 3: the previous stage's folder
    speakers: Path | None = None  # stage 2: speakers.json
    pretrained_gpt: Path | None = None  # stage 1: the official gpt.pth
    pretrained_bpe: Path | None = None  # stage 1: the official bpe.model
    # The training data cache (pack_codes, tokenize_text); None: made beside codes_index.
    pack: Path | None = None
    tokens: Path | None = None


def _codes_codec(index: Path) -> dict[str, Any]:
    rec = json.loads(index.read_text(encoding="utf-8"))["codec"]
    return {k: rec.get(k) for k in ("n_q", "codebook_size", "frame_rate", "sample_rate", "weights_sha256", "kind")
            if k in rec}


def preflight(stage: int, tcfg: TrainConfig, inputs: StageInputs) -> dict[str, Any]:
    """Check what a stage needs before any step; every problem reported at once.

    Returns:
        the parent's ``model.json`` (stage 2/3) under ``parent_meta``, and the codes' codec.

    Raises:
        PreflightError: naming each missing file or mismatch and what to do.
    """
    from indextts.checkpoint import CheckpointError, VocabMismatchError, check_vocab, read_meta

    problems: list[str] = []
    out: dict[str, Any] = {}
    for name, path, fix in (("codes index", inputs.codes_index, "run index_codes"),
                            ("clean manifest", inputs.clean, "run clean_manifest"),
                            ("vocabulary", inputs.bpe, "run train_vocab")):
        if not path.is_file():
            problems.append(f"{path}: the {name} is missing ({fix})")
    if inputs.codes_index.is_file():
        try:
            out["codec"] = _codes_codec(inputs.codes_index)
        except (ValueError, KeyError) as e:
            problems.append(f"{inputs.codes_index}: no codec record ({e}); rerun index_codes")
    if stage > 1:
        if inputs.parent is None:
            problems.append(f"stage {stage} needs the stage-{stage - 1} checkpoint folder (--parent)")
        else:
            try:
                meta = read_meta(inputs.parent)
                out["parent_meta"] = meta
                if inputs.bpe.is_file():
                    check_vocab(meta, inputs.bpe, inputs.parent)
                want = meta.get("extra", {}).get("codes_codec")
                if want and out.get("codec") and any(want.get(k) != out["codec"].get(k)
                                                     for k in ("n_q", "codebook_size", "weights_sha256")):
                    problems.append(
                        f"{inputs.parent}: trained on codes of another codec ({want}) than {inputs.codes_index} "
                        f"({out['codec']}); rerun the earlier stages on these codes")
                if meta.get("stage") != f"stage{stage - 1}":
                    problems.append(f"{inputs.parent}: is a {meta.get('stage')!r} checkpoint, stage {stage} starts "
                                    f"from stage{stage - 1}")
            except VocabMismatchError as e:
                problems.append(str(e))
            except CheckpointError as e:
                problems.append(f"{e} (run train_stage{stage - 1} first)")
    if stage == 2:
        if inputs.speakers is None or not inputs.speakers.is_file():
            problems.append(f"{inputs.speakers}: speakers.json is missing (run select_speakers)")
        else:
            mapping = json.loads(inputs.speakers.read_text(encoding="utf-8"))
            mapping = mapping.get("speakers", mapping)
            out["speakers"] = {str(k): int(v) for k, v in mapping.items()}
            if len(out["speakers"]) < 2:
                problems.append(f"{inputs.speakers}: {len(out['speakers'])} speaker(s) mapped; the stage-2 classifier "
                                "needs at least 2 (lower speakers.min_utterances or add speakers)")
    if tcfg.device == "cuda" and not torch.cuda.is_available():
        problems.append("train.device is 'cuda' but torch sees no CUDA device (run on a GPU node or set train.device: auto)")
    if problems:
        raise PreflightError(f"train stage {stage}: cannot start:\n  " + "\n  ".join(problems))
    return out


def build_stage_model(stage: int, config: Mapping[str, Any], inputs: StageInputs, pre: Mapping[str, Any],
                 seed: int, log) -> tuple[nn.Module, Any, str | None, dict[str, Any] | None]:
    """The stage's starting model, its config, the parent's sha256 and (stage 1 import) the transfer report."""
    import sentencepiece as spm

    from indextts.checkpoint import checkpoint_sha256, load_checkpoint
    from indextts.model import build_model
    from indextts.model.config import ModelSection, mel_vocab_size

    if stage > 1:
        model, meta = load_checkpoint(inputs.parent, vocab_path=inputs.bpe)
        log(f"starting from {inputs.parent} ({meta.get('stage')}, step {meta.get('step')})")
        return model, model.cfg, checkpoint_sha256(inputs.parent), None
    sp = spm.SentencePieceProcessor()
    sp.Load(str(inputs.bpe))
    section = get_section(ModelSection, config, "model")
    codec = pre["codec"]
    cfg = section.model_config(number_text_tokens=sp.get_piece_size(),
                               number_mel_codes=mel_vocab_size(int(codec["codebook_size"])),
                               codes_n_q=int(codec["n_q"]))
    torch.manual_seed(seed)
    model = build_model(cfg)
    if inputs.pretrained_gpt is None:
        log(f"stage 1 from scratch: preset {cfg.preset}")
        return model, cfg, None, None
    from indextts.model.transfer import import_official

    report = import_official(inputs.pretrained_gpt, model, old_bpe=inputs.pretrained_bpe,
                             new_bpe=inputs.bpe if inputs.pretrained_bpe is not None else None,
                             generator=torch.Generator().manual_seed(seed))
    log(report.summary())
    return model, cfg, sha256_file(inputs.pretrained_gpt), report.to_dict()

