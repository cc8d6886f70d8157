"""The stage's data: the mapped datasets (:mod:`indextts.dataset`) over the training data cache,
the token-bounded train sampler with its replay mix, the fixed val batches (one set per language
when there are several) and the DataLoaders."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import torch

from indextts.train.distributed import Dist
from indextts.train.preflight import StageInputs
from indextts.train.settings import PreflightError, StageSettings, TrainConfig


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


def stage_datasets(stage: int, tcfg: TrainConfig, cfg, inputs: StageInputs, speakers: Mapping[str, int] | None, log):
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


def budget_indices(ds, tcfg: TrainConfig, cfg, name: str, log) -> np.ndarray:
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


def val_groups(val_ds, val_idx: np.ndarray, tcfg: TrainConfig, cfg, dist: Dist) -> dict[str, tuple[Any, bool]]:
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



def train_sampler(train_ds, train_idx: np.ndarray, stage: int, tcfg: TrainConfig, settings: StageSettings, cfg,
                  dist: Dist, log):
    """The token-bounded, seeded, resumable train sampler over ``train_idx``, with the stage's
    ``replay_ratio`` of base-language rows mixed in."""
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
    return sampler


def val_loaders(val_ds, tcfg: TrainConfig, cfg, dist: Dist, pin: bool, log) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """The val loaders: ``""`` over the main rows (the headline losses) and, when there are
    several languages, one per language, as ``{name: (loader, sampler)}``; and the base (replay)
    languages among them, which the forgetting guard watches."""
    val_sets: dict[str, tuple[Any, Any]] = {}
    base_languages: list[str] = []
    if val_ds is None:
        return val_sets, base_languages
    val_idx = budget_indices(val_ds, tcfg, cfg, "val", log)
    for name, (vs, is_base) in val_groups(val_ds, val_idx, tcfg, cfg, dist).items():
        val_sets[name] = (make_loader(val_ds, vs, num_workers=tcfg.num_workers, pin=pin, seed=tcfg.seed), vs)
        if is_base:
            base_languages.append(name)
    return val_sets, base_languages
