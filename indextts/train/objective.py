"""The stage objective (the model plus, in stage 2, the gradient reversal and the speaker
classifier), its loss over the effective batch, the GRL schedule and the optimiser's groups and
learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from indextts.train.settings import PreflightError, Stage2Settings, TrainConfig
from indextts.train.trainable import apply_lora, set_stage_trainable


def grl_lambda(settings: Stage2Settings, progress: float) -> float:
    """The reversal strength at ``progress`` in [0, 1] through the stage."""
    p = min(max(progress, 0.0), 1.0)
    if settings.grl_schedule == "constant":
        return settings.grl_lambda
    if settings.grl_schedule == "linear":
        return settings.grl_lambda * p
    return settings.grl_lambda * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


class StageObjective(nn.Module):
    """The model plus, in stage 2, the gradient reversal and speaker classifier, as one module
    (so DDP and the optimiser see one parameter set). ``forward`` returns the model output and
    the classifier's logits (None outside stage 2)."""

    def __init__(self, model: nn.Module, classifier: nn.Module | None = None) -> None:
        super().__init__()
        from indextts.model import GradientReversal

        self.model = model
        self.classifier = classifier
        self.grl = GradientReversal(0.0) if classifier is not None else None

    def forward(self, inputs: dict[str, torch.Tensor], lambda_: float = 0.0):
        out = self.model(**inputs)
        logits = None
        if self.classifier is not None:
            self.grl.lambda_ = float(lambda_)
            logits = self.classifier(self.grl(out.emo_vec))  # reversed gradient reaches emo_vec
        return out, logits


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; decay on matrices (ndim >= 2), none on biases and norms."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    p = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def loss_terms(out, logits, batch, counts: torch.Tensor, cfg, alpha: float, world: int):
    """This micro-batch's share of the effective batch's loss (see :mod:`indextts.train`) and its
    detached parts. ``counts`` = global [text targets, code targets, utterances]."""
    n_text, n_code, n_utt = batch.n_text_targets, batch.n_code_targets, len(batch)
    loss = (cfg.text_loss_weight * out.text_loss * (n_text / counts[0])
            + cfg.mel_loss_weight * out.mel_loss * (n_code / counts[1]))
    spk_loss = spk_correct = None
    if logits is not None:
        spk_loss = nn.functional.cross_entropy(logits.float(), batch.speaker_ids)
        loss = loss + alpha * spk_loss * (n_utt / counts[2])
        spk_correct = (logits.argmax(-1) == batch.speaker_ids).sum()
    return loss * world, spk_loss, spk_correct



def stage_objective(model: nn.Module, stage: int, tcfg: TrainConfig, cfg, train_ds, speakers: Mapping[str, int] | None,
                    speakers_path, log) -> tuple[StageObjective, dict[str, int]]:
    """The stage's objective over ``model``: stage 2's speaker classifier (over the mapped
    speakers, seeded), LoRA adapters for ``training_type: lora``, the stage's trainable set.
    Returns it and the parameter counts (:func:`set_stage_trainable`, plus ``classifier``)."""
    from indextts.model import SpeakerClassifier

    settings = tcfg.stage(stage)
    classifier = None
    if stage == 2:
        present = train_ds.speakers_present()
        if len(present) < 2:
            raise PreflightError(f"{speakers_path}: only {present} of the mapped speakers have train utterances; "
                                 "the stage-2 classifier needs at least 2")
        torch.manual_seed(tcfg.seed + 2)
        classifier = SpeakerClassifier(cfg.emo_dim, max(speakers.values()) + 1, tcfg.stage2.classifier_hidden,
                                       tcfg.stage2.classifier_dropout)
    if settings.training_type == "lora":
        torch.manual_seed(tcfg.seed + 3)
        model = apply_lora(model, settings.lora)
    counts = set_stage_trainable(model, stage, settings)
    objective = StageObjective(model, classifier)
    if classifier is not None:
        counts["classifier"] = sum(p.numel() for p in classifier.parameters())
    log(f"stage {stage} ({settings.training_type}): {counts['trainable']:,} of {counts['total']:,} model "
        "parameters trainable" + (f" (adapters included: {counts['adapter']:,})" if counts["adapter"] else "")
        + (f", plus the speaker classifier's {counts['classifier']:,}" if classifier is not None else ""))
    return objective, counts
