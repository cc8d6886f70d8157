"""Does stage 2 do its job? ``indextts probe``: linear probes on a frozen stage's conditioners.

Stage 2 trains the emotion conditioner against a speaker classifier through a gradient reversal
layer, so that ``emo_vec`` carries emotion and not speaker. The classifier's own training accuracy
(what the trainer logs) is the adversary's, and says little about what is left in ``emo_vec``: a
fresh linear probe, cross-validated on held-out utterances, does. Here every stage's frozen model
embeds held-out utterances (``emo_vec``, and the speaker conditioner's latents averaged over its
positions), and scikit-learn logistic regressions predict the speaker, and the emotion label where
the corpus has one, from each. Stage 2's purpose is that speaker accuracy from ``emo_vec`` falls
toward chance while emotion accuracy holds; the speaker latents are the control, where speaker
accuracy should stay high.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from indextts.config import get_section, load_config_arg
from indextts.evaluation.scoring import EvalConfig, EvaluationError, ProbeConfig, resolve_device


def probe_utterances(clean: Path, cfg: ProbeConfig, seed: int) -> "Any":
    """The utterances the probe embeds: ``cfg.split`` of ``clean.parquet``, a seeded sample of
    ``cfg.max_utterances`` beyond that, in utt_id order."""
    import pandas as pd

    cols = ["utt_id", "audio_path", "speaker", "emotion", "split"]
    table = pd.read_parquet(clean, columns=cols).sort_values("utt_id").reset_index(drop=True)
    if cfg.split != "all":
        table = table[table["split"] == cfg.split].reset_index(drop=True)
    if len(table) > cfg.max_utterances:
        keep = np.sort(np.random.default_rng(seed).choice(len(table), cfg.max_utterances, replace=False))
        table = table.iloc[keep].reset_index(drop=True)
    return table


def embed_utterances(checkpoint: Path, paths: list[str], cfg: ProbeConfig, device: str,
                     batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``(emo_vec [N, D], speaker latents [N, D])`` of a checkpoint for each clip (its first
    ``cfg.seconds``), the latents averaged over the speaker perceiver's positions.

    Raises:
        EvaluationError: the model reads prompt features this command does not compute.
    """
    import torch

    from indextts.checkpoint import checkpoint_vocab, load_checkpoint
    from indextts.features import load_audio, log_mel

    model, _ = load_checkpoint(checkpoint, vocab_path=checkpoint_vocab(checkpoint), device=device)
    fcfg = model.cfg.features
    if fcfg.kind != "log_mel":
        raise EvaluationError(f"{checkpoint}: the model's prompts are {fcfg.kind} features; the probe computes "
                              "log-mel prompt features only (the w2v-BERT path comes with the semantic voice path)")
    emo, spk = [], []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            feats = [log_mel(load_audio(p, fcfg.sample_rate)[: int(cfg.seconds * fcfg.sample_rate)], fcfg)
                     for p in paths[start : start + batch_size]]
            lengths = torch.tensor([f.shape[0] for f in feats])
            batch = torch.zeros(len(feats), int(lengths.max()), feats[0].shape[1])
            for b, f in enumerate(feats):
                batch[b, : f.shape[0]] = f
            batch, lengths = batch.to(device), lengths.to(device)
            emo.append(model.get_emo_vec(batch, lengths).float().cpu())
            spk.append(model.get_conditioning(batch, lengths).float().mean(dim=1).cpu())
    return torch.cat(emo).numpy(), torch.cat(spk).numpy()


def probe_stage(cfg: EvalConfig, checkpoint: Path, clean: Path, *, log=print) -> dict[str, Any]:
    """Embed held-out utterances with a frozen stage and cross-validate the probes.

    Returns:
        ``{"checkpoint", "stage", "n", "split", "probes": {"speaker_from_emo_vec": {...}, ...}}``;
        each probe as :func:`indextts.evaluation.probe.probe_accuracy` returns it (accuracy,
        chance 1/K, the majority class's share, folds, n, k).
    """
    from indextts.checkpoint import read_meta
    from indextts.evaluation.probe import probe_accuracy

    utts = probe_utterances(clean, cfg.probe, cfg.seed)
    if len(utts) < 4:
        raise EvaluationError(f"{clean}: {len(utts)} utterances in eval.probe.split {cfg.probe.split!r}; the probe "
                              "needs a few per speaker (set eval.probe.split to all, or raise clean.val_fraction)")
    device = resolve_device(cfg.device)
    emo, spk = embed_utterances(checkpoint, utts["audio_path"].tolist(), cfg.probe, device)
    labels = {"speaker": utts["speaker"].astype(str).tolist()}
    emotions = utts["emotion"].fillna("").astype(str)
    if (emotions != "").all() and emotions.nunique() > 1:
        labels["emotion"] = emotions.tolist()
    probes = {}
    for target, y in labels.items():
        for name, X in (("emo_vec", emo), ("speaker_latent", spk)):
            probes[f"{target}_from_{name}"] = probe_accuracy(X, y, folds=cfg.probe.folds, seed=cfg.seed)
            r = probes[f"{target}_from_{name}"]
            acc = "n/a" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
            log(f"{target} from {name}: accuracy {acc} (chance {r.get('chance')}, majority {r.get('majority')}, "
                f"n={r.get('n')}, k={r.get('k')}){'; ' + r['note'] if r.get('note') else ''}")
    meta = read_meta(checkpoint)
    return {"checkpoint": str(checkpoint), "stage": meta.get("stage"), "step": meta.get("step"), "n": len(utts),
            "split": cfg.probe.split, "emotion_labels": "emotion" in labels, "probes": probes}


def cli_probe(argv: list[str]) -> int:
    """``indextts probe``: linear probes for speaker and emotion on a stage's emo_vec and speaker latents."""
    from indextts.checkpoint import CheckpointError
    from indextts.files import write_json

    p = argparse.ArgumentParser(prog="indextts probe", description=cli_probe.__doc__)
    p.add_argument("--checkpoint", required=True, help="a stage folder, e.g. results/train/stage2")
    p.add_argument("--clean", required=True, help="clean.parquet (utterances, speakers, emotions, splits)")
    p.add_argument("--out", required=True, help="probe.json to write")
    p.add_argument("--config", help="config file or inline JSON with an eval section")
    a = p.parse_args(argv)
    cfg = get_section(EvalConfig, load_config_arg(a.config) if a.config else {}, "eval")
    try:
        result = probe_stage(cfg, Path(a.checkpoint), Path(a.clean))
    except (EvaluationError, CheckpointError) as e:
        print(f"indextts probe: {e}", file=sys.stderr)
        return 1
    write_json(a.out, result)
    print(f"wrote {a.out}")
    return 0
