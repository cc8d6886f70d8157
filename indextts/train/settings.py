"""The ``train`` config section (shared settings plus one subsection per stage) and the errors a
stage stops with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from indextts.config import ConfigError

STAGES = (1, 2, 3)
STATE_DIR = "state"
METRICS = "metrics.jsonl"
CLASSIFIER = "speaker_classifier.safetensors"

# Parameter groups by module prefix (the released names).
SPEAKER_CONDITIONER = ("conditioning_encoder.*", "perceiver_encoder.*")
EMOTION_CONDITIONER = ("emo_conditioning_encoder.*", "emo_perceiver_encoder.*", "emo_layer.*", "emovec_layer.*")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (through ``peft``) for ``training_type: lora``."""

    rank: int = 16  # adapter rank r
    alpha: float = 32.0  # scaling alpha (the update is scaled by alpha / r)
    dropout: float = 0.05  # dropout on the adapter input
    # Globs over module names; the GPT-2 trunk's linear layers by default.
    targets: tuple[str, ...] = ("gpt.h.*.attn.c_attn", "gpt.h.*.attn.c_proj", "gpt.h.*.mlp.c_fc", "gpt.h.*.mlp.c_proj")
    # Parameter globs that stay fully trainable beside the adapters (peft's modules_to_save):
    # the text table (its new-language rows are new), the code tables and heads (new when the
    # codec differs from the released one; extra_mel_* are those of codebooks 1..K-1).
    fully_trainable: tuple[str, ...] = ("text_embedding.*", "text_head.*", "mel_embedding.*", "mel_head.*", "extra_mel_*")


@dataclass(frozen=True)
class StageSettings:
    """What differs between stages: length, learning rate, training type."""

    max_steps: int | None = None  # optimiser steps; null: run ``epochs`` epochs
    epochs: float = 1.0  # passes over the stage's training data when max_steps is null
    lr: float = 2e-4  # peak learning rate (AdamW)
    warmup_steps: int = 100  # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0  # floor of the cosine decay as a share of lr
    training_type: Literal["full", "lora"] = "full"  # full: all trainable weights; lora: adapters
    lora: LoraSettings = field(default_factory=LoraSettings)
    # Share of each epoch's tokens drawn from the base-language rows of data.replay (0: none;
    # 0.1 keeps ~10% of the tokens in the languages the pretrained model already speaks).
    replay_ratio: float = 0.0


@dataclass(frozen=True)
class Stage2Settings(StageSettings):
    """Stage 2 adds the gradient-reversed speaker classifier on ``emo_vec``."""

    speaker_loss_weight: float = 0.1  # alpha: loss = TTS + alpha * speaker CE
    grl_lambda: float = 1.0  # the reversal's final strength
    # constant: lambda; linear: lambda * p; exponential: lambda * (2 / (1 + exp(-10 p)) - 1)
    grl_schedule: Literal["constant", "linear", "exponential"] = "exponential"
    classifier_hidden: int = 512  # MLP emo_dim -> hidden -> hidden -> speakers
    classifier_dropout: float = 0.3
    require_emotion: bool = False  # use only utterances with an emotion label
    # Healthy train speaker accuracy: below, the classifier is not learning; above, the GRL is
    # not removing speaker information from emo_vec. A warning is logged outside it.
    healthy_acc: tuple[float, float] = (0.2, 0.8)


@dataclass(frozen=True)
class Stage3Settings(StageSettings):
    """Stage 3: conditioners frozen, a lower learning rate."""

    lr: float = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` config section: settings shared by the stages plus one subsection each."""

    seed: int = 0  # initialisation, data order, references, dropout
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    gpus: int = 1  # processes (GPUs) per training job; > 1 launches torchrun
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model (dynamic shapes)
    max_tokens: int = 8000  # padded GPT positions per micro-batch per GPU (prefix + text + codes)
    max_batch_size: int = 64  # utterances per micro-batch at most
    bucket_size: int = 2000  # utterances sorted together by length before packing
    grad_accum: int = 1  # micro-batches per optimiser step
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    weight_decay: float = 0.01  # AdamW decay, on matrices only
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_ref_seconds: float = 6.0  # crop of the speaker / emotion prompt
    # reference: the emotion prompt is the speaker prompt; target: a crop of the target itself
    emo_prompt: Literal["reference", "target"] = "target"
    val_every: int = 100  # steps between evaluations on the val split (and at the end)
    val_max_batches: int = 50  # val batches per evaluation (0: all); per language with several
    # The forgetting guard: a base (replay) language whose val code loss rises more than this
    # share above its value at the stage's first validation is a warning in the log and
    # metrics.jsonl; with forgetting: stop the stage also ends there, keeping its best weights
    # (lowest main-language val loss among the validations before the breach).
    forgetting_tolerance: float = 0.1
    forgetting: Literal["warn", "stop"] = "warn"
    state_every: int = 100  # steps between resumable states (and at the end)
    keep_states: int = 2  # newest states kept
    # Runtime knobs: cannot change a result, so they are kept out of the rules' params.
    num_workers: int = 2  # DataLoader worker processes (features are computed there)
    log_every: int = 10  # steps between metric lines
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a terminal, lines in logs
    stage1: StageSettings = field(default_factory=StageSettings)
    stage2: Stage2Settings = field(default_factory=Stage2Settings)
    stage3: Stage3Settings = field(default_factory=Stage3Settings)

    def __post_init__(self) -> None:
        p = []
        for name in ("gpus", "max_tokens", "max_batch_size", "bucket_size", "grad_accum", "state_every",
                     "keep_states", "log_every", "val_every"):
            if getattr(self, name) < 1:
                p.append(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.val_max_batches < 0:
            p.append("train.num_workers and train.val_max_batches must not be negative")
        if self.forgetting_tolerance < 0:
            p.append(f"train.forgetting_tolerance must not be negative, got {self.forgetting_tolerance}")
        for k in STAGES:
            st = self.stage(k)
            if st.lr <= 0:
                p.append(f"train.stage{k}.lr must be positive, got {st.lr}")
            if st.max_steps is not None and st.max_steps < 1:
                p.append(f"train.stage{k}.max_steps must be at least 1 (or null), got {st.max_steps}")
            if st.max_steps is None and st.epochs <= 0:
                p.append(f"train.stage{k}.epochs must be positive, got {st.epochs}")
            if not 0 <= st.replay_ratio < 1:
                p.append(f"train.stage{k}.replay_ratio must be in [0, 1), got {st.replay_ratio}")
        lo, hi = self.stage2.healthy_acc
        if not 0 <= lo < hi <= 1:
            p.append(f"train.stage2.healthy_acc must be [low, high] within [0, 1], got {list(self.stage2.healthy_acc)}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))

    def stage(self, k: int) -> StageSettings:
        return {1: self.stage1, 2: self.stage2, 3: self.stage3}[k]


RUNTIME_FIELDS = ("num_workers", "log_every", "progress")


class PreflightError(RuntimeError):
    """A stage cannot start; the message lists every problem and what to do about it."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the last good state is kept."""

