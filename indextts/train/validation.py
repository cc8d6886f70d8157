"""Validation: token-weighted val losses, per language when the val rows hold several, and the
forgetting guard that watches the base (replay) languages."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from indextts.train.distributed import Dist, all_reduce
from indextts.train.objective import StageObjective


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
    sums = all_reduce(sums, dist).tolist()
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



def validate(objective: StageObjective, val_sets: Mapping[str, tuple[Any, Any]], device, autocast,
             dist: Dist) -> dict[str, float]:
    """One validation: the main rows' losses (``val_sets[""]``, the headline ones) and each
    language's text and code loss as ``lang/<language>/...``."""
    res: dict[str, float] = {}
    for name, (loader, sampler) in val_sets.items():
        got = evaluate(objective, loader, sampler, device, autocast, dist)
        if name == "":
            res.update(got)
        else:
            res.update({f"lang/{name}/{k}": got[k] for k in ("text_loss", "mel_loss") if k in got})
    return res


class ForgettingGuard:
    """Watches the base (replay) languages' val code loss against the stage's first validation.

    A rise above ``tolerance`` is a warning (log and a ``split: guard`` record); with
    ``mode == "stop"`` it also marks the stage :attr:`stopped`, and the guard keeps the weights of
    the lowest main-language val loss before it. Rank 0 keeps them on disk beside the resumable
    states (``best.safetensors`` and ``best.json`` in ``root``, written atomically), not in
    memory, so a resumed stage still knows its best and no rank holds a second copy of the model.
    """

    def __init__(self, base_languages: Sequence[str], tolerance: float, mode: str, root: Path, main: bool) -> None:
        self.base, self.tolerance, self.mode = list(base_languages), tolerance, mode
        self.root, self.main = Path(root), main
        self.best: dict[str, Any] | None = None  # {"step", "loss"} of the kept weights
        self.stopped: dict[str, Any] | None = None  # {"step", "best_step", "languages"} once breached

    @property
    def _file(self) -> Path:
        return self.root / "best.safetensors"

    def resumed(self, objective: nn.Module, step: int) -> None:
        """A resumed run at ``step``: the best kept before it stands; without one (or one from
        after ``step``, which the resumed run recomputes), the resumed weights stand until a
        validation beats them."""
        if self.mode != "stop":
            return
        record = self.root / "best.json"
        saved = json.loads(record.read_text(encoding="utf-8")) if record.is_file() and self._file.is_file() else None
        if saved is not None and saved["step"] <= step:
            loss = float("inf") if saved["loss"] is None else float(saved["loss"])
            self.best = {"step": int(saved["step"]), "loss": loss}
        else:
            self._keep(objective, step, float("inf"))

    def check(self, res: Mapping[str, float], first: Mapping[str, float] | None, step: int, objective: nn.Module,
              metrics, log) -> None:
        """Compare validation ``res`` at ``step`` with the stage's ``first``; record any breach."""
        if not self.base or "loss" not in res:
            return
        breaches = forgetting_breaches(res, first, self.base, self.tolerance)
        for lang, was, now in breaches:
            warning = (f"forgetting: the base language {lang!r} val code loss rose {100 * (now / was - 1):.1f}% "
                       f"({was:.4f} -> {now:.4f}), above train.forgetting_tolerance={self.tolerance}")
            metrics.write({"step": step, "split": "guard", "language": lang, "start_mel_loss": round(was, 6),
                           "mel_loss": round(now, 6), "warning": warning})
            log(f"WARNING step {step}: {warning}")
        if self.mode != "stop":
            return
        if breaches:
            self.stopped = {"step": step, "best_step": self.best["step"] if self.best else step,
                            "languages": [b[0] for b in breaches]}
        elif self.best is None or res["loss"] < self.best["loss"]:
            self._keep(objective, step, float(res["loss"]))

    def restore(self, objective: nn.Module) -> None:
        """Load the kept weights into ``objective`` (rank 0, which writes the stage's folder)."""
        if self.main and self._file.is_file():
            from safetensors.torch import load_file

            objective.load_state_dict(load_file(str(self._file)), strict=True)

    def _keep(self, objective: nn.Module, step: int, loss: float) -> None:
        self.best = {"step": step, "loss": loss}
        if not self.main:
            return
        from safetensors.torch import save_file

        from indextts.files import atomic_path, write_json

        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._file) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in objective.state_dict().items()}, str(tmp))
        write_json(self.root / "best.json", {"step": step, "loss": loss if math.isfinite(loss) else None})


