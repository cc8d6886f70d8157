"""Resumable states: ``<out_dir>/state/step-NNNNNNNN/`` with the weights, optimiser, scheduler,
every rank's RNG, the data position and the run's fingerprint; written atomically, found again
by fingerprint (see :mod:`indextts.train`, "Restartability")."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from indextts.train.distributed import Dist, barrier


def fingerprint(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def state_dirs(root: Path) -> list[Path]:
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
    barrier(dist)
    torch.save(_rng_state(), tmp / f"rng-rank{dist.rank:03d}.pt")
    barrier(dist)
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
        for old in state_dirs(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
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


def find_resumable(root: Path, fp: str, log, dist: Dist | None = None) -> Path | None:
    """The newest state of ``root`` with fingerprint ``fp``. States of another fingerprint are
    moved aside (``state.stale-<utc>``), with a log line: the config or an input changed. Under
    DDP rank 0 decides and every rank gets its answer."""
    dist = dist or Dist()
    found = _newest_matching(root, fp, log) if dist.main else None
    if dist.enabled:
        import torch.distributed as tdist

        box = [str(found) if found else None]
        tdist.broadcast_object_list(box, src=0)
        found = Path(box[0]) if box[0] else None
    return found


def _newest_matching(root: Path, fp: str, log) -> Path | None:
    states = state_dirs(root)
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

