"""``indextts train --stage {1,2,3}``: the three IndexTTS2 training stages, one code path.

Stages (IndexTTS2, arXiv 2506.21619; DESIGN §5):

1. *basic*: from the released ``gpt.pth`` (``pretrained.gpt``, imported with the vocabulary
   transfer) or from scratch; everything trainable.
2. *disentangle*: from stage 1; the speaker conditioner is frozen; ``emo_vec`` (computed in the
   forward pass from the emotion prompt) goes through a gradient reversal layer into a speaker
   classifier over ``speakers.json``; loss = TTS + alpha * speaker CE. Only utterances of mapped
   speakers are used. The classifier is saved beside the stage-2 weights, never exported.
3. *fine-tune*: from stage 2; every conditioner frozen, no classifier; a lower learning rate.

A stage is composed of plain functions (build, freeze, data, optimiser, step, evaluate, save),
configured by :class:`TrainConfig`; there is no trainer class hierarchy.

Restartability: a *state* (model incl. adapters and classifier, optimiser, scheduler, the RNG
state of every rank, step, data position, and a fingerprint of the config and inputs) is saved
atomically every ``state_every`` steps under ``<out_dir>/state/``, which is not a rule output,
so Snakemake never deletes it. A restarted job resumes from the newest state whose fingerprint
matches and replays exactly the batches it had not seen, so a run killed and resumed ends with
the same weights as one that never stopped (CPU, fp32: bit for bit; see the tests). A state
whose fingerprint differs (the user changed the learning rate) is moved aside and training
starts fresh, saying so.

Losses are normalised by non-padding targets over the whole effective batch (every micro-batch
of the gradient accumulation, on every rank), so accumulation and data parallelism change how
a step is computed, not what it computes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from indextts.config import ConfigError, get_section, load_config_arg, merge_runtime, section_dict
from indextts.files import atomic_path, sha256_file, write_json

STAGES = (1, 2, 3)
STATE_DIR = "state"
METRICS = "metrics.jsonl"
CLASSIFIER = "speaker_classifier.safetensors"

# Parameter groups by module prefix (the released names).
SPEAKER_CONDITIONER = ("conditioning_encoder.*", "perceiver_encoder.*")
EMOTION_CONDITIONER = ("emo_conditioning_encoder.*", "emo_perceiver_encoder.*", "emo_layer.*", "emovec_layer.*")


# --------------------------------------------------------------------------------------------
# Config


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


# --------------------------------------------------------------------------------------------
# Distributed and device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> Dist:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def resolve_device(name: str, dist: Dist) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PreflightError("train.device is 'cuda' but torch sees no CUDA device: set train.device to auto or cpu, "
                                 "or run on a GPU node")
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(t)
    return t


def _barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


# --------------------------------------------------------------------------------------------
# Model pieces: trainable sets, LoRA, the stage objective


def frozen_patterns(stage: int) -> tuple[str, ...]:
    """Parameter globs a stage freezes: stage 2 the speaker conditioner, stage 3 both conditioners."""
    return {1: (), 2: SPEAKER_CONDITIONER, 3: SPEAKER_CONDITIONER + EMOTION_CONDITIONER}[stage]


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Inject peft LoRA adapters into the modules matching ``lora.targets`` (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _match(n, lora.targets)]
    if not names:
        raise ConfigError(f"train.stageN.lora.targets: {list(lora.targets)} match no linear layer of the model")
    pattern = "^(" + "|".join(map(re.escape, names)) + ")$"
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                     init_lora_weights=True)
    return inject_adapter_in_model(cfg, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back, so the state
    dict has the plain model's names (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def set_stage_trainable(model: nn.Module, stage: int, settings: StageSettings) -> dict[str, int]:
    """``requires_grad`` for a stage: everything but the stage's frozen conditioners (full), or
    the adapters plus ``lora.fully_trainable`` (lora). Returns parameter counts: ``trainable``
    (adapters included), ``total`` (the model without adapters) and ``adapter``.

    Raises:
        ConfigError: a ``fully_trainable`` glob matches no parameter.
    """
    frozen = frozen_patterns(stage)
    lora = settings.training_type == "lora"
    names = [n for n, _ in model.named_parameters()]
    if lora:
        unmatched = [g for g in settings.lora.fully_trainable if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if unmatched:
            raise ConfigError(f"train.stage{stage}.lora.fully_trainable: {unmatched} match no parameter")
    trainable = total = 0
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer.", ".")
        if _match(plain, frozen):
            on = False
        elif lora:
            on = "lora_" in name or _match(plain, settings.lora.fully_trainable)
        else:
            on = True
        p.requires_grad_(on)
        total += p.numel() if "lora_" not in name else 0
        trainable += p.numel() if on else 0
    return {"trainable": trainable, "total": total, "adapter": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}


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


# --------------------------------------------------------------------------------------------
# State checkpoints


def fingerprint(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _state_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file())


def _rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(root: Path, *, step: int, objective: nn.Module, optimizer, scheduler, position: tuple[int, int],
               fp: str, extra: Mapping[str, Any], dist: Dist, keep: int) -> Path:
    """Write ``root/step-NNNNNNNN/`` atomically (a temporary folder renamed into place): weights
    (safetensors), optimiser and scheduler (``torch.save`` of tensors and numbers, read back with
    ``weights_only=True``), one RNG file per rank, and ``state.json``. Keeps the newest ``keep``."""
    from safetensors.torch import save_file

    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist)
    torch.save(_rng_state(), tmp / f"rng-rank{dist.rank:03d}.pt")
    _barrier(dist)
    if dist.main:
        sd = {k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items()}
        save_file(sd, str(tmp / "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        info = {"step": step, "epoch": position[0], "batch": position[1], "fingerprint": fp,
                "world_size": dist.world_size, "saved_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **extra}
        (tmp / "state.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _state_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(dist)
    return final


def load_state(path: Path, *, objective: nn.Module, optimizer, scheduler, dist: Dist) -> dict[str, Any]:
    """Restore a state written by :func:`save_state` (safetensors / ``weights_only=True`` only)."""
    from safetensors.torch import load_file

    info = json.loads((path / "state.json").read_text(encoding="utf-8"))
    objective.load_state_dict(load_file(str(path / "weights.safetensors")), strict=True)
    opt = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = path / f"rng-rank{dist.rank:03d}.pt"
    _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return info


def find_resumable(root: Path, fp: str, log) -> Path | None:
    """The newest state of ``root`` with fingerprint ``fp``. States of another fingerprint are
    moved aside (``state.stale-<utc>``), with a log line: the config or an input changed."""
    states = _state_dirs(root)
    if not states:
        return None
    newest = states[-1]
    info = json.loads((newest / "state.json").read_text(encoding="utf-8"))
    if info.get("fingerprint") == fp:
        return newest
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside = root.with_name(f"{root.name}.stale-{stamp}")
    os.replace(root, aside)
    log(f"found a saved state at step {info.get('step')} from another config or other inputs "
        f"(fingerprint {str(info.get('fingerprint'))[:12]} != {fp[:12]}): moved it to {aside} and starting fresh")
    return None


# --------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) plus TensorBoard scalars, rank 0 only.

    The live file lives in ``state/`` (which survives a killed job); on resume the lines after the
    resumed step are dropped, so a resumed run's log equals an uninterrupted one's.
    """

    def __init__(self, path: Path, tb_dir: Path, *, resume_step: int | None, enabled: bool) -> None:
        self.path, self.enabled, self.writer = path, enabled, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("", encoding="utf-8")
            shutil.rmtree(tb_dir, ignore_errors=True)
        elif path.is_file():
            kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tb_dir), purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:  # tensorboard is pinned; a library user without it still gets the JSONL
            self.writer = None

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        if self.writer is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"{split}/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar on rank 0 when stderr is a terminal, else a line every ``log_every`` steps."""

    def __init__(self, total: int, start: int, mode: str, enabled: bool, desc: str) -> None:
        self.bar = None
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, step: int, record: Mapping[str, Any] | None, eta_s: float | None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if record:
                self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        elif record:
            eta = f", eta {eta_s / 60:.1f} min" if eta_s is not None else ""
            extra = ""
            if "speaker_acc" in record:
                extra = f", speaker_acc {record['speaker_acc']:.3f}, grl {record['grl_lambda']:.3f}"
            print(f"step {step}: loss {record['loss']:.4f} (text {record['text_loss']:.4f}, mel {record['mel_loss']:.4f})"
                  f"{extra}, lr {record['lr']:.2e}, grad_norm {record['grad_norm']:.3f}, "
                  f"{record['tokens_per_s']:.0f} tok/s, data wait {100 * record['data_wait']:.1f}%{eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _peak_flops(device: torch.device) -> float | None:
    from indextts.model.flops import PEAK_FLOPS

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in ("H200", "H100", "A100", "L40S", "4090"):
        if key in name:
            return next(v for k, v in PEAK_FLOPS.items() if key in k)
    return None


# --------------------------------------------------------------------------------------------
# Data


def _worker_init(_: int) -> None:
    # Feature extraction in a worker is small convolutions: one thread each, no oversubscription.
    torch.set_num_threads(1)


def make_loader(ds, sampler, *, num_workers: int, pin: bool, seed: int):
    from indextts.data import collate

    return torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers, pin_memory=pin,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # its own generator, so creating an iterator never draws from the global RNG
        generator=torch.Generator().manual_seed(seed),
    )


def micro_batches(loader, sampler, epoch: int, start: int) -> Iterator[tuple[int, int, Any]]:
    """Endless ``(epoch, batch index, batch)`` from ``(epoch, start)`` on, epoch after epoch."""
    while True:
        sampler.set_epoch(epoch, start)
        if len(sampler) == 0 and start == 0:
            raise PreflightError("the training data yields no batch for this rank: fewer batches than GPUs")
        for k, batch in enumerate(loader, start):
            yield epoch, k, batch
        epoch, start = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# The stage


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


def _build_model(stage: int, config: Mapping[str, Any], inputs: StageInputs, pre: Mapping[str, Any],
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


def _datasets(stage: int, tcfg: TrainConfig, cfg, inputs: StageInputs, speakers: Mapping[str, int] | None, log):
    from indextts.dataset import CodesDataset
    from indextts.pack import CodesPack, DataError, TokenPack, data_cache

    pack, tokens = data_cache(inputs.codes_index, inputs.clean, inputs.bpe, pack=inputs.pack, tokens=inputs.tokens)
    common = dict(pack=pack, tokens=tokens, bpe_path=inputs.bpe, features=cfg.features, seed=tcfg.seed,
                  max_text_tokens=cfg.max_text_tokens, max_code_frames=cfg.max_code_frames,
                  max_ref_seconds=tcfg.max_ref_seconds, n_codebooks=cfg.n_codebooks,
                  speakers=speakers, require_emotion=stage == 2 and tcfg.stage2.require_emotion,
                  emo_prompt=tcfg.emo_prompt)
    pack, tokens = CodesPack(pack), TokenPack(tokens)
    common.update(pack=pack, tokens=tokens)
    log(f"data: {pack.rows} utterances in {pack.folder} ({pack.meta['codes_bytes'] / 1e9:.2f} GB of codes), "
        f"text ids in {tokens.folder}")
    train = CodesDataset(split="train", **common)
    try:
        val = CodesDataset(split="val", **common)
    except DataError as e:
        log(f"no val data ({e}); val losses are not computed")
        val = None
    return train, val


def _budget_indices(ds, tcfg: TrainConfig, cfg, name: str, log) -> np.ndarray:
    tokens = cfg.seq_len(ds.text_lengths, ds.lengths)
    keep = np.flatnonzero(tokens <= tcfg.max_tokens)
    dropped = len(tokens) - len(keep)
    log(f"{name}: {len(ds)} utterances of {ds.n_input} in the shards (dropped {ds.dropped}); "
        f"{dropped} longer than train.max_tokens={tcfg.max_tokens} dropped")
    ds.dropped["over_token_budget"] = dropped
    if not len(keep):
        raise PreflightError(f"{name}: no utterance fits train.max_tokens={tcfg.max_tokens} "
                             f"(shortest needs {int(tokens.min())}); raise train.max_tokens")
    return keep


def _val_sampler(val_ds, idx: np.ndarray, tcfg: TrainConfig, cfg, dist: Dist):
    """Fixed val batches over ``idx`` (at most ``val_max_batches``), None when they make none."""
    from indextts.data import TokenBatchSampler

    lengths = cfg.seq_len(val_ds.text_lengths, val_ds.lengths)
    make = lambda keep: TokenBatchSampler(lengths, tcfg.max_tokens, max_batch_size=tcfg.max_batch_size,  # noqa: E731
                                          shuffle=False, rank=dist.rank, world_size=dist.world_size, indices=keep)
    sampler = make(idx)
    vb = sampler.plan(0)
    if tcfg.val_max_batches and len(vb) > tcfg.val_max_batches:
        sampler = make(np.unique(vb.items[: vb.bounds[tcfg.val_max_batches]]))
    return sampler if sampler.n_batches(0) else None


def _val_groups(val_ds, val_idx: np.ndarray, tcfg: TrainConfig, cfg, dist: Dist) -> dict[str, tuple[Any, bool]]:
    """The val samplers: ``""`` the main (non-replay) rows, whose losses are the headline ones,
    and, when the val rows hold several languages, one per language: ``{name: (sampler, is a
    base language)}``."""
    replay = val_ds.replay[val_idx]
    groups = {"": (_val_sampler(val_ds, val_idx[~replay], tcfg, cfg, dist) if (~replay).any() else None, False)}
    codes = val_ds.language[val_idx]
    if len(np.unique(codes)) > 1 or replay.any():
        for code in np.unique(codes):
            mine = codes == code
            groups[val_ds.language_name(int(code))] = (_val_sampler(val_ds, val_idx[mine], tcfg, cfg, dist),
                                                       bool(replay[mine].any()))
    return {k: v for k, v in groups.items() if v[0] is not None}


def forgetting_breaches(res: Mapping[str, float], start: Mapping[str, float] | None, base: Sequence[str],
                        tolerance: float) -> list[tuple[str, float, float]]:
    """The base languages whose val code loss rose more than ``tolerance`` (a share) above its
    value at the stage's first validation: ``[(language, start loss, now)]``."""
    out = []
    for lang in base:
        key = f"lang/{lang}/mel_loss"
        if start and key in start and key in res and res[key] > start[key] * (1 + tolerance):
            out.append((lang, float(start[key]), float(res[key])))
    return out


def _loss_terms(out, logits, batch, counts: torch.Tensor, cfg, alpha: float, world: int):
    """This micro-batch's share of the effective batch's loss (see the module doc) and its
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


@torch.no_grad()
def evaluate(objective: StageObjective, loader, sampler, device, autocast, dist: Dist) -> dict[str, float]:
    """Token-weighted val losses over the fixed val batches (all ranks, summed)."""
    was = objective.training
    objective.eval()
    sums = None
    sampler.set_epoch(0, 0)
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        with autocast():
            out, logits = objective(batch.inputs(), 0.0)
        nt, nc = batch.n_text_targets, batch.n_code_targets
        per_cb = getattr(out, "mel_losses", None)
        per_cb = per_cb if per_cb is not None else out.mel_loss.reshape(1)
        row = [out.text_loss.float() * nt, out.mel_loss.float() * nc, *(per_cb.float() * nc)]
        row += [torch.tensor(float(nt), device=device), torch.tensor(float(nc), device=device)]
        if logits is not None:
            row += [nn.functional.cross_entropy(logits.float(), batch.speaker_ids, reduction="sum"),
                    (logits.argmax(-1) == batch.speaker_ids).sum().float(),
                    torch.tensor(float(len(batch)), device=device)]
        t = torch.stack([torch.as_tensor(x, device=device).float() for x in row])
        sums = t if sums is None else sums + t
    objective.train(was)
    if sums is None:
        return {}
    sums = _all_reduce(sums, dist).tolist()
    spk = sums[-3:] if objective.classifier is not None else None
    body = sums[:-3] if spk else sums
    nt, nc = body[-2], body[-1]
    res = {"text_loss": body[0] / nt, "mel_loss": body[1] / nc}
    k = len(body) - 4
    if k > 1:
        res.update({f"mel_loss/cb{i}": body[2 + i] / nc for i in range(k)})
    res["loss"] = objective.model.cfg.text_loss_weight * res["text_loss"] + objective.model.cfg.mel_loss_weight * res["mel_loss"]
    if spk:
        res["speaker_loss"], res["speaker_acc"] = spk[0] / spk[2], spk[1] / spk[2]
    return res


def train_stage(config: Mapping[str, Any], stage: int, inputs: StageInputs) -> Path:
    """Train one stage and write its checkpoint folder.

    Args:
        config: config sections ``train``, ``model``, ``text``, ``codec`` (the last two are
            recorded in the checkpoint).
        stage: 1, 2 or 3.
        inputs: the stage's input and output paths.

    Returns:
        ``inputs.out_dir`` with ``model.safetensors``, ``model.json``, ``metrics.jsonl`` (and
        ``speaker_classifier.safetensors`` for stage 2, ``transfer_report.json`` for an import).

    Raises:
        PreflightError: a missing or mismatched input, before any step.
        TrainingDiverged: a non-finite loss or gradient norm (the last good state is kept).
        ConfigError: an invalid ``train`` section.
    """
    from indextts.checkpoint import save_checkpoint, section_record, vocab_info
    from indextts.model import SpeakerClassifier

    if stage not in STAGES:
        raise ConfigError(f"--stage must be one of {STAGES}, got {stage}")
    tcfg = get_section(TrainConfig, config, "train")
    settings = tcfg.stage(stage)
    out_dir = inputs.out_dir
    dist = init_distributed("cuda" if tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available()) else "cpu")

    def log(msg: str) -> None:
        if dist.main:
            print(msg, flush=True)

    pre = preflight(stage, tcfg, inputs)
    device = resolve_device(tcfg.device, dist)
    bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")
    if bf16 and device.type != "cuda":
        raise PreflightError("train.precision is bf16, which this trainer uses on CUDA only; set train.precision: auto")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    model, cfg, parent_sha, transfer = _build_model(stage, config, inputs, pre, tcfg.seed, log)
    speakers = pre.get("speakers")
    train_ds, val_ds = _datasets(stage, tcfg, cfg, inputs, speakers, log)
    classifier = None
    if stage == 2:
        present = train_ds.speakers_present()
        if len(present) < 2:
            raise PreflightError(f"{inputs.speakers}: only {present} of the mapped speakers have train utterances; "
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
    objective.to(device)

    longest = cfg.seq_len(cfg.max_text_tokens, cfg.max_code_frames)
    if tcfg.max_tokens < longest:
        log(f"note: train.max_tokens={tcfg.max_tokens} is below the longest sequence the model takes ({longest}); "
            "longer utterances are dropped (counted below)")
    train_idx = _budget_indices(train_ds, tcfg, cfg, "train", log)
    from indextts.data import TokenBatchSampler

    lengths = cfg.seq_len(train_ds.text_lengths, train_ds.lengths)
    sampler = TokenBatchSampler(lengths, tcfg.max_tokens, max_batch_size=tcfg.max_batch_size, seed=tcfg.seed,
                                bucket_size=tcfg.bucket_size, rank=dist.rank, world_size=dist.world_size,
                                indices=train_idx, replay=train_ds.replay, replay_ratio=settings.replay_ratio)
    n_replay = int(train_ds.replay[train_idx].sum())
    if n_replay:
        log(f"replay: {n_replay} base-language train utterances; replay_ratio {settings.replay_ratio} "
            + (f"(measured share of epoch 0's tokens {sampler.replay_share(0):.3f})" if settings.replay_ratio
               else "(left out of training)"))
    elif settings.replay_ratio:
        log(f"note: train.stage{stage}.replay_ratio is {settings.replay_ratio}, but there are no base-language "
            "(data.replay) train utterances: nothing is replayed")
    per_epoch = sampler.n_batches(0)
    if per_epoch == 0:
        raise PreflightError(f"train: {len(train_idx)} utterances make fewer batches than {dist.world_size} GPUs")
    total = settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch / tcfg.grad_accum))
    log(f"train: {per_epoch} micro-batches per epoch per rank, padding efficiency "
        f"{sampler.padding_efficiency(0):.3f}; {total} steps x {tcfg.grad_accum} micro-batches x {dist.world_size} rank(s)")
    loader = make_loader(train_ds, sampler, num_workers=tcfg.num_workers, pin=device.type == "cuda", seed=tcfg.seed)
    # Val loaders: "" the main rows (the headline losses), and one per language when there are
    # several; base (replay) languages are watched by the forgetting guard.
    val_sets: dict[str, tuple[Any, Any]] = {}
    base_languages: list[str] = []
    if val_ds is not None:
        val_idx = _budget_indices(val_ds, tcfg, cfg, "val", log)
        for name, (vs, is_base) in _val_groups(val_ds, val_idx, tcfg, cfg, dist).items():
            val_sets[name] = (make_loader(val_ds, vs, num_workers=tcfg.num_workers, pin=device.type == "cuda",
                                          seed=tcfg.seed), vs)
            if is_base:
                base_languages.append(name)
    val_loader = val_sets[""][0] if "" in val_sets else None

    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(objective, tcfg.weight_decay), lr=settings.lr, betas=tcfg.betas,
                                  eps=tcfg.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=settings.warmup_steps, total=total, min_ratio=settings.min_lr_ratio))
    train_params = [p for p in objective.parameters() if p.requires_grad]

    # Identity of this run: what a state may be resumed into.
    codes_sha = sha256_file(inputs.codes_index)
    spk_sha = sha256_file(inputs.speakers) if stage == 2 and inputs.speakers else None
    train_record = {k: v for k, v in section_dict(tcfg).items() if k not in RUNTIME_FIELDS and not k.startswith("stage")}
    fp_record = {
        "stage": stage, "train": train_record, "settings": section_dict(settings),
        "model": section_dict(cfg), "parent": parent_sha, "vocab": sha256_file(inputs.bpe), "codes": codes_sha,
        "speakers": spk_sha, "world_size": dist.world_size,
    }
    fp = fingerprint(fp_record)
    state_root = out_dir / STATE_DIR
    resume = find_resumable(state_root, fp, log) if dist.main else None
    if dist.enabled:
        import torch.distributed as tdist

        box = [str(resume) if resume else None]
        tdist.broadcast_object_list(box, src=0)
        resume = Path(box[0]) if box[0] else None

    step, epoch, batch_pos, last_val_step, first_val = 0, 0, 0, -1, None
    # The forgetting guard's best state (forgetting: stop): the lowest main val loss so far, its
    # step and (in memory, on the CPU) its weights. A resumed run starts from the resumed weights.
    best_val, best_weights, stopped = None, None, None
    if resume is not None:
        info = load_state(resume, objective=objective, optimizer=optimizer, scheduler=scheduler, dist=dist)
        step, epoch, batch_pos = info["step"], info["epoch"], info["batch"]
        last_val_step, first_val = info.get("last_val_step", -1), info.get("first_val")
        if tcfg.forgetting == "stop":  # the resumed weights stand until a validation beats them
            best_val = {"step": step, "loss": math.inf}
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in objective.state_dict().items()}
        log(f"resuming from {resume} at step {step} (epoch {epoch}, batch {batch_pos})")
    else:
        torch.manual_seed(tcfg.seed + 100 * stage + dist.rank)  # dropout stream, per rank
    metrics = MetricsLog(state_root / METRICS, out_dir / "tb", resume_step=step if resume else None, enabled=dist.main)

    if tcfg.compile:
        # In place (state-dict names unchanged), the model only: the GRL's lambda changes every
        # step and would force a recompile inside a compiled objective.
        objective.model.compile(dynamic=True)
    objective_fwd: nn.Module = objective
    ddp = None
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
        objective_fwd = ddp
    objective.train()
    for name, module in objective.model.named_children():  # frozen conditioners stay in eval mode
        if not any(p.requires_grad for p in module.parameters()) and any(True for _ in module.parameters()):
            module.eval()

    peak = _peak_flops(device)
    alpha = tcfg.stage2.speaker_loss_weight if stage == 2 else 0.0
    # For the resume tests: the process SIGKILLs itself right after this step (a real kill,
    # at a known point mid-epoch). Unset in normal use.
    stop_after = int(os.environ.get("INDEXTTS_TRAIN_KILL_AFTER_STEP", "0"))
    progress = Progress(total, step, tcfg.progress, dist.main, f"stage {stage}")
    stream = micro_batches(loader, sampler, epoch, batch_pos)
    window = _Window(device)
    t_start = time.perf_counter()
    steps_done = 0

    def run_val() -> dict[str, float]:
        nonlocal best_val, best_weights, stopped
        res = {}
        for name, (vl, vs) in val_sets.items():
            got = evaluate(objective, vl, vs, device, autocast, dist)
            if name == "":
                res.update(got)
            else:
                res.update({f"lang/{name}/{k}": got[k] for k in ("text_loss", "mel_loss") if k in got})
        if res:
            metrics.write({"step": step, "split": "val", **{k: round(v, 6) for k, v in res.items()}})
            log(f"val @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        if not base_languages or "loss" not in res:
            return res
        breaches = forgetting_breaches(res, first_val, base_languages, tcfg.forgetting_tolerance)
        for lang, was, now in breaches:
            warning = (f"forgetting: the base language {lang!r} val code loss rose {100 * (now / was - 1):.1f}% "
                       f"({was:.4f} -> {now:.4f}), above train.forgetting_tolerance={tcfg.forgetting_tolerance}")
            metrics.write({"step": step, "split": "guard", "language": lang, "start_mel_loss": round(was, 6),
                           "mel_loss": round(now, 6), "warning": warning})
            log(f"WARNING step {step}: {warning}")
        if tcfg.forgetting == "stop":
            if breaches:
                stopped = {"step": step, "best_step": best_val["step"] if best_val else step,
                           "languages": [b[0] for b in breaches]}
            elif best_val is None or res["loss"] < best_val["loss"]:
                best_val = {"step": step, "loss": res["loss"]}
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in objective.state_dict().items()}
        return res

    try:
        if step == 0 and val_loader is not None and last_val_step < 0:
            first_val = run_val()
            last_val_step = 0
        while step < total:
            t0 = time.perf_counter()
            group = []
            wait = 0.0
            for _ in range(tcfg.grad_accum):
                tw = time.perf_counter()
                e, k, b = next(stream)
                wait += time.perf_counter() - tw
                group.append((e, k, b))
            position = (group[-1][0], group[-1][1] + 1)
            counts_t = torch.tensor([sum(b.n_text_targets for _, _, b in group), sum(b.n_code_targets for _, _, b in group),
                                     sum(len(b) for _, _, b in group)], dtype=torch.float64)
            counts_t = _all_reduce(counts_t.to(device), dist).to(torch.float32)
            lam = grl_lambda(tcfg.stage2, step / total) if stage == 2 else 0.0
            for j, (_, _, batch) in enumerate(group):
                batch = batch.to(device, non_blocking=True)
                sync = ddp.no_sync() if ddp is not None and j < len(group) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        out, logits = objective_fwd(batch.inputs(), lam)
                    loss, spk_loss, spk_correct = _loss_terms(out, logits, batch, counts_t, cfg, alpha, dist.world_size)
                    loss.backward()
                window.add(out, batch, spk_loss, spk_correct)
            if tcfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(train_params, tcfg.grad_clip)
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in train_params if p.grad is not None]))
            if not torch.isfinite(grad_norm):
                last = _state_dirs(state_root)
                raise TrainingDiverged(
                    f"stage {stage}: non-finite gradient norm at step {step + 1} (loss "
                    f"{float(window.last_loss):.4g}); the last good state is "
                    f"{last[-1] if last else 'none (no state saved yet)'}. Lower train.stage{stage}.lr, "
                    "raise warmup_steps, or check the data of this step")
            window.grad_norm_sum += grad_norm.detach().float()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_done += 1
            window.wait += wait
            window.time += time.perf_counter() - t0
            window.steps += 1
            record = None
            if step % tcfg.log_every == 0 or step == total:
                record = window.flush(step, position[0], scheduler.get_last_lr()[0], dist, cfg, peak, lam if stage == 2 else None)
                if stage == 2:
                    lo, hi = tcfg.stage2.healthy_acc
                    acc = record["speaker_acc"]
                    if step >= settings.warmup_steps and not lo <= acc <= hi:
                        why = ("the classifier is not learning speakers from emo_vec" if acc < lo
                               else "the GRL is not removing speaker information from emo_vec")
                        record["warning"] = (f"speaker_acc {acc:.3f} outside the healthy band [{lo}, {hi}]: {why}")
                        log(f"WARNING step {step}: {record['warning']}")
                metrics.write(record)
            elapsed = time.perf_counter() - t_start
            progress.update(step, record, elapsed / steps_done * (total - step) if steps_done else None)
            if val_loader is not None and (step % tcfg.val_every == 0 or step == total) and last_val_step != step:
                run_val()
                last_val_step = step
            if stopped is not None:
                break
            if step % tcfg.state_every == 0 or step == total:
                save_state(state_root, step=step, objective=objective, optimizer=optimizer, scheduler=scheduler,
                           position=position, fp=fp, dist=dist, keep=tcfg.keep_states,
                           extra={"last_val_step": last_val_step, "first_val": first_val})
            if stop_after and step == stop_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if stopped is None:
            final_val = run_val() if val_loader is not None and last_val_step != step else _last_val(state_root / METRICS)
        if stopped is not None:
            log(f"forgetting: stage {stage} stopped at step {stopped['step']} ({', '.join(stopped['languages'])} "
                f"degraded); keeping the weights of step {stopped['best_step']}, the lowest main-language val loss "
                "before the breach (train.forgetting: stop)")
            if best_weights is not None:
                objective.load_state_dict(best_weights)
            final_val = _last_val(state_root / METRICS, stopped["best_step"])
    finally:
        progress.close()
        metrics.close()

    if dist.main:
        if settings.training_type == "lora":
            merge_lora(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        if classifier is not None:
            from safetensors.torch import save_file

            with atomic_path(out_dir / CLASSIFIER) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}, str(tmp),
                          metadata={"speakers": json.dumps(speakers)})
        if transfer is not None:
            write_json(out_dir / "transfer_report.json", transfer)
        extra = {
            "seed": tcfg.seed, "params": counts, "codes_codec": pre["codec"], "codes_index_sha256": codes_sha,
            "speakers_sha256": spk_sha, "fingerprint": fp, "world_size": dist.world_size, "steps": total,
            "settings": section_dict(settings), "train": train_record,
            "data": {"train_utterances": int(len(train_idx)), "dropped": train_ds.dropped,
                     "padding_efficiency": round(sampler.padding_efficiency(0), 4)},
            "first_val": first_val, "final_val": final_val,
        }
        if stopped is not None:
            extra["forgetting_stop"] = stopped
        if classifier is not None:
            extra["classifier"] = {"file": CLASSIFIER, "n_speakers": max(speakers.values()) + 1}
        # The released files a semantic-code stage speaks through (pretrained.s2mel, campplus,
        # bigvgan; passed as runtime values, so they never retrain), for indextts synthesize.
        voice = {k: (config.get("pretrained") or {}).get(k) for k in ("s2mel", "campplus", "bigvgan")}
        if pre["codec"].get("kind") == "semantic" and all(voice.values()):
            extra["voice"] = voice
        if first_val and final_val and first_val.get("mel_loss"):
            drop = 1 - final_val["mel_loss"] / first_val["mel_loss"]
            extra["val_mel_loss_drop"] = round(drop, 4)
            log(f"val mel loss {first_val['mel_loss']:.4f} -> {final_val['mel_loss']:.4f} ({100 * drop:.1f}% lower)")
        with atomic_path(out_dir / METRICS) as tmp:
            shutil.copyfile(state_root / METRICS, tmp)
        save_checkpoint(out_dir, model, model_cfg=cfg, vocab_path=inputs.bpe, text_cfg=section_record(config, "text"),
                        codec_cfg=section_record(config, "codec"), stage=f"stage{stage}",
                        training_type=settings.training_type, parent_sha256=parent_sha, data_index_sha256=codes_sha,
                        step=stopped["best_step"] if stopped else total, extra=extra)
        log(f"wrote {out_dir} (vocab {vocab_info(inputs.bpe)['n_pieces']} pieces)")
    _barrier(dist)
    return out_dir


def _last_val(path: Path, step: int | None = None) -> dict[str, float] | None:
    """The last val record of ``metrics.jsonl`` (the one of ``step`` when given)."""
    if not path.is_file():
        return None
    vals = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    vals = [v for v in vals if v.get("split") == "val" and (step is None or v.get("step") == step)]
    return {k: v for k, v in vals[-1].items() if k not in ("step", "split")} if vals else None


class _Window:
    """Sums over a log interval, kept on the device; ``.item()`` happens only in :meth:`flush`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        z = lambda: torch.zeros((), device=self.device)  # noqa: E731
        self.text, self.mel, self.spk, self.correct = z(), z(), z(), z()
        self.per_cb = None
        self.n_text = self.n_code = self.n_utt = self.n_padded = self.seq = 0
        self.grad_norm_sum = z()
        self.wait = self.time = 0.0
        self.steps = 0
        self.has_spk = False
        self.last_loss = torch.zeros(())

    def add(self, out, batch, spk_loss, spk_correct) -> None:
        nt, nc = batch.n_text_targets, batch.n_code_targets
        self.text += out.text_loss.detach().float() * nt
        self.mel += out.mel_loss.detach().float() * nc
        cb = getattr(out, "mel_losses", None)
        if cb is not None and cb.numel() > 1:
            v = cb.detach().float() * nc
            self.per_cb = v if self.per_cb is None else self.per_cb + v
        self.n_text += nt
        self.n_code += nc
        self.n_utt += len(batch)
        self.seq += int(batch.text_ids.shape[1] + batch.codes.shape[-1]) * len(batch)
        self.last_loss = out.loss.detach()
        if spk_loss is not None:
            self.has_spk = True
            self.spk += spk_loss.detach().float() * len(batch)
            self.correct += spk_correct.detach().float()

    def flush(self, step: int, epoch: int, lr: float, dist: Dist, cfg, peak: float | None, lam: float | None) -> dict[str, Any]:
        sums = torch.stack([self.text, self.mel, self.spk, self.correct, self.grad_norm_sum,
                            torch.tensor(float(self.n_text), device=self.device),
                            torch.tensor(float(self.n_code), device=self.device),
                            torch.tensor(float(self.n_utt), device=self.device),
                            torch.tensor(float(self.seq), device=self.device)])
        sums = _all_reduce(sums, dist).tolist()
        text, mel, spk, correct, gn, nt, nc, nu, seq = sums
        text_loss, mel_loss = text / nt, mel / nc
        rec: dict[str, Any] = {
            "step": step, "split": "train", "epoch": epoch,
            "loss": round(cfg.text_loss_weight * text_loss + cfg.mel_loss_weight * mel_loss, 6),
            "text_loss": round(text_loss, 6), "mel_loss": round(mel_loss, 6),
        }
        if self.per_cb is not None:
            cb = _all_reduce(self.per_cb.clone(), dist).tolist()
            rec.update({f"mel_loss/cb{i}": round(v / nc, 6) for i, v in enumerate(cb)})
        tok_s = (nt + nc) / max(self.time, 1e-9)
        rec.update(lr=lr, grad_norm=round(gn / dist.world_size / max(self.steps, 1), 6), tokens_per_s=round(tok_s, 1),
                   data_wait=round(self.wait / max(self.time, 1e-9), 4))
        if self.has_spk:
            rec.update(speaker_loss=round(spk / nu, 6), speaker_acc=round(correct / nu, 6), grl_lambda=round(lam, 6))
        if self.device.type == "cuda":
            rec["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            if peak:
                from indextts.model.flops import mfu

                # all positions the GPU computed, per second, against the peak of all ranks
                pos_s = (seq + nu * cfg.prefix_len) / max(self.time, 1e-9)
                rec["mfu"] = round(mfu(pos_s, cfg, max(1, int((seq + nu * cfg.prefix_len) / max(nu, 1))),
                                       peak * dist.world_size), 4)
        self.reset()
        return rec


# --------------------------------------------------------------------------------------------
# CLI


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
