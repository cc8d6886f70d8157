"""What a stage reports: ``metrics.jsonl`` and TensorBoard, the progress bar or log lines, and the
sums of a log interval (losses, tokens/s, data wait, MFU on CUDA)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from indextts.train.distributed import Dist, all_reduce


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


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (:data:`indextts.model.flops.PEAK_BF16`); None off CUDA or unknown."""
    from indextts.model.flops import peak_bf16

    return peak_bf16(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def last_val(path: Path, step: int | None = None) -> dict[str, float] | None:
    """The last val record of ``metrics.jsonl`` (the one of ``step`` when given)."""
    if not path.is_file():
        return None
    vals = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    vals = [v for v in vals if v.get("split") == "val" and (step is None or v.get("step") == step)]
    return {k: v for k, v in vals[-1].items() if k not in ("step", "split")} if vals else None


class Window:
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
        sums = all_reduce(sums, dist).tolist()
        text, mel, spk, correct, gn, nt, nc, nu, seq = sums
        text_loss, mel_loss = text / nt, mel / nc
        rec: dict[str, Any] = {
            "step": step, "split": "train", "epoch": epoch,
            "loss": round(cfg.text_loss_weight * text_loss + cfg.mel_loss_weight * mel_loss, 6),
            "text_loss": round(text_loss, 6), "mel_loss": round(mel_loss, 6),
        }
        if self.per_cb is not None:
            cb = all_reduce(self.per_cb.clone(), dist).tolist()
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

