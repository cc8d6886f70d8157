"""``indextts train --stage N``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from indextts.config import load_config_arg, merge_runtime
from indextts.train.preflight import StageInputs
from indextts.train.recipe import train_stage
from indextts.train.settings import STAGES, PreflightError, TrainingDiverged


def cli_train(argv: list[str]) -> int:
    """``indextts train --stage N``: one training stage; resumes by itself from its saved state."""
    p = argparse.ArgumentParser(prog="indextts train", description=cli_train.__doc__)
    p.add_argument("--stage", type=int, required=True, choices=STAGES)
    p.add_argument("--config", required=True, help="config file or inline JSON (sections train, model, text, codec, pretrained)")
    p.add_argument("--runtime", help="inline JSON of runtime knobs laid over --config (what the rules pass)")
    p.add_argument("--codes-index", required=True, help="results/codes/index.json")
    p.add_argument("--clean", required=True, help="results/clean/clean.parquet (train/val split)")
    p.add_argument("--bpe", required=True, help="results/vocab/bpe.model")
    p.add_argument("--parent", help="the previous stage's checkpoint folder (stages 2 and 3)")
    p.add_argument("--speakers", help="results/speakers/speakers.json (stage 2)")
    p.add_argument("--pretrained-gpt", help="official gpt.pth for stage 1 (default: pretrained.gpt)")
    p.add_argument("--pretrained-bpe", help="official bpe.model for stage 1 (default: pretrained.bpe)")
    p.add_argument("--out-dir", required=True, help="checkpoint folder to write, e.g. results/train/stage1")
    p.add_argument("--pack", help="the codes pack folder, results/codes/pack (default: made beside --codes-index)")
    p.add_argument("--tokens", help="its tokens folder for --bpe, results/tokens (default: made beside the pack)")
    a = p.parse_args(argv)
    config = load_config_arg(a.config)
    if a.runtime:
        config = merge_runtime(config, load_config_arg(a.runtime))
    pre = config.get("pretrained") or {}
    gpt = a.pretrained_gpt or pre.get("gpt")
    old_bpe = a.pretrained_bpe or pre.get("bpe")
    inputs = StageInputs(
        codes_index=Path(a.codes_index), clean=Path(a.clean), bpe=Path(a.bpe), out_dir=Path(a.out_dir),
        parent=Path(a.parent) if a.parent else None, speakers=Path(a.speakers) if a.speakers else None,
        pretrained_gpt=Path(gpt) if gpt and a.stage == 1 else None,
        pretrained_bpe=Path(old_bpe) if old_bpe and a.stage == 1 else None,
        pack=Path(a.pack) if a.pack else None, tokens=Path(a.tokens) if a.tokens else None,
    )
    try:
        train_stage(config, a.stage, inputs)
    except (PreflightError, TrainingDiverged) as e:
        print(f"indextts train: {e}", file=sys.stderr)
        return 1
    return 0
