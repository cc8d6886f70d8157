"""The stage recipe: :func:`train_stage` reads top to bottom as what a stage does (settings and
processes, preflight, model and data, objective, optimiser, resume, the step loop, the checkpoint
folder); every piece it composes lives in its own module of :mod:`indextts.train`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from indextts.config import ConfigError, get_section, section_dict
from indextts.files import atomic_path, sha256_file, write_json
from indextts.train.distributed import all_reduce, barrier, init_distributed, resolve_device
from indextts.train.loading import budget_indices, make_loader, micro_batches, stage_datasets, train_sampler, val_loaders
from indextts.train.metrics import MetricsLog, Progress, Window, last_val, peak_flops
from indextts.train.objective import grl_lambda, loss_terms, lr_lambda, param_groups, stage_objective
from indextts.train.preflight import StageInputs, build_stage_model, preflight
from indextts.train.settings import (
    CLASSIFIER,
    METRICS,
    RUNTIME_FIELDS,
    STATE_DIR,
    STAGES,
    PreflightError,
    TrainConfig,
    TrainingDiverged,
)
from indextts.train.state import find_resumable, fingerprint, load_state, save_state, state_dirs
from indextts.train.trainable import merge_lora
from indextts.train.validation import ForgettingGuard, validate


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

    # Settings, processes, inputs, precision.
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

    # The model, the data, the objective (stage 2: with the GRL and the speaker classifier).
    model, cfg, parent_sha, transfer = build_stage_model(stage, config, inputs, pre, tcfg.seed, log)
    speakers = pre.get("speakers")
    train_ds, val_ds = stage_datasets(stage, tcfg, cfg, inputs, speakers, log)
    objective, counts = stage_objective(model, stage, tcfg, cfg, train_ds, speakers, inputs.speakers, log)
    model, classifier = objective.model, objective.classifier
    objective.to(device)

    longest = cfg.seq_len(cfg.max_text_tokens, cfg.max_code_frames)
    if tcfg.max_tokens < longest:
        log(f"note: train.max_tokens={tcfg.max_tokens} is below the longest sequence the model takes ({longest}); "
            "longer utterances are dropped (counted below)")
    train_idx = budget_indices(train_ds, tcfg, cfg, "train", log)
    sampler = train_sampler(train_ds, train_idx, stage, tcfg, settings, cfg, dist, log)
    per_epoch = sampler.n_batches(0)
    if per_epoch == 0:
        raise PreflightError(f"train: {len(train_idx)} utterances make fewer batches than {dist.world_size} GPUs")
    total = settings.max_steps or max(1, math.ceil(settings.epochs * per_epoch / tcfg.grad_accum))
    log(f"train: {per_epoch} micro-batches per epoch per rank, padding efficiency "
        f"{sampler.padding_efficiency(0):.3f}; {total} steps x {tcfg.grad_accum} micro-batches x {dist.world_size} rank(s)")
    loader = make_loader(train_ds, sampler, num_workers=tcfg.num_workers, pin=device.type == "cuda", seed=tcfg.seed)
    val_sets, base_languages = val_loaders(val_ds, tcfg, cfg, dist, device.type == "cuda", log)
    has_val = "" in val_sets  # validation runs when there are main-language val rows

    # The optimiser, and the run's identity: what a saved state may be resumed into.
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(objective, tcfg.weight_decay), lr=settings.lr, betas=tcfg.betas,
                                  eps=tcfg.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=settings.warmup_steps, total=total, min_ratio=settings.min_lr_ratio))
    train_params = [p for p in objective.parameters() if p.requires_grad]
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
    guard = ForgettingGuard(base_languages, tcfg.forgetting_tolerance, tcfg.forgetting, state_root, dist.main)
    resume = find_resumable(state_root, fp, log, dist)

    step, epoch, batch_pos, last_val_step, first_val = 0, 0, 0, -1, None
    if resume is not None:
        info = load_state(resume, objective=objective, optimizer=optimizer, scheduler=scheduler, dist=dist)
        step, epoch, batch_pos = info["step"], info["epoch"], info["batch"]
        last_val_step, first_val = info.get("last_val_step", -1), info.get("first_val")
        guard.resumed(objective, step)
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

    peak = peak_flops(device)
    alpha = tcfg.stage2.speaker_loss_weight if stage == 2 else 0.0
    # For the resume tests: the process SIGKILLs itself right after this step (a real kill,
    # at a known point mid-epoch). Unset in normal use.
    stop_after = int(os.environ.get("INDEXTTS_TRAIN_KILL_AFTER_STEP", "0"))
    progress = Progress(total, step, tcfg.progress, dist.main, f"stage {stage}")
    stream = micro_batches(loader, sampler, epoch, batch_pos)
    window = Window(device)
    t_start = time.perf_counter()
    steps_done = 0

    def run_val() -> dict[str, float]:
        res = validate(objective, val_sets, device, autocast, dist)
        if res:
            metrics.write({"step": step, "split": "val", **{k: round(v, 6) for k, v in res.items()}})
            log(f"val @ step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        guard.check(res, first_val, step, objective, metrics, log)
        return res

    # The steps: accumulate, clip, step; log, validate, save a state.
    try:
        if step == 0 and has_val and last_val_step < 0:
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
            counts_t = all_reduce(counts_t.to(device), dist).to(torch.float32)
            lam = grl_lambda(tcfg.stage2, step / total) if stage == 2 else 0.0
            for j, (_, _, batch) in enumerate(group):
                batch = batch.to(device, non_blocking=True)
                sync = ddp.no_sync() if ddp is not None and j < len(group) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast():
                        out, logits = objective_fwd(batch.inputs(), lam)
                    loss, spk_loss, spk_correct = loss_terms(out, logits, batch, counts_t, cfg, alpha, dist.world_size)
                    loss.backward()
                window.add(out, batch, spk_loss, spk_correct)
            if tcfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(train_params, tcfg.grad_clip)
            else:
                grad_norm = torch.norm(torch.stack([p.grad.norm() for p in train_params if p.grad is not None]))
            if not torch.isfinite(grad_norm):
                last = state_dirs(state_root)
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
            if has_val and (step % tcfg.val_every == 0 or step == total) and last_val_step != step:
                run_val()
                last_val_step = step
            if guard.stopped is not None:
                break
            if step % tcfg.state_every == 0 or step == total:
                save_state(state_root, step=step, objective=objective, optimizer=optimizer, scheduler=scheduler,
                           position=position, fp=fp, dist=dist, keep=tcfg.keep_states,
                           extra={"last_val_step": last_val_step, "first_val": first_val})
            if stop_after and step == stop_after:
                os.kill(os.getpid(), signal.SIGKILL)
        stopped = guard.stopped
        if stopped is None:
            final_val = run_val() if has_val and last_val_step != step else last_val(state_root / METRICS)
        else:
            log(f"forgetting: stage {stage} stopped at step {stopped['step']} ({', '.join(stopped['languages'])} "
                f"degraded); keeping the weights of step {stopped['best_step']}, the lowest main-language val loss "
                "before the breach (train.forgetting: stop)")
            guard.restore(objective)
            final_val = last_val(state_root / METRICS, stopped["best_step"])
    finally:
        progress.close()
        metrics.close()

    # The stage's checkpoint folder (rank 0).
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
    barrier(dist)
    return out_dir

