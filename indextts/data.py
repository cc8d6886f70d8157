"""Batches of the training data: :func:`collate` pads items of
:class:`indextts.dataset.CodesDataset` into exactly the tensors ``UnifiedVoice.forward`` takes, and
the samplers group utterances of similar length.

:class:`TokenBatchSampler` (training) packs batches bounded by padded tokens; :class:`BucketBatchSampler`
(the validate gate) by count. Both compute an epoch's batches with numpy over the lengths and hold
them as two arrays (items back to back, batch bounds), never as a Python list per item, so an
epoch of millions of utterances costs tens of MB and a fraction of a second.

``CodesDataset`` and ``DataError`` are re-exported here for the callers that import them from this
module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from indextts.dataset import CodesDataset
from indextts.pack import DataError, release_freed_memory

__all__ = ["Batch", "BucketBatchSampler", "CodesDataset", "DataError", "TokenBatchSampler", "collate", "pack_by_tokens"]


@dataclass
class Batch:
    """One padded batch. :meth:`inputs` gives the keyword arguments of ``UnifiedVoice.forward``.

    Shapes: ``text_ids [B, Lt]`` (no start/stop; the model adds them), ``codes [B, K, Tm]`` (the
    first K codebooks), ``cond_feats [B, Tc, F]``, each with a ``[B]`` lengths tensor.
    """

    text_ids: torch.Tensor
    text_lengths: torch.Tensor
    codes: torch.Tensor
    code_lengths: torch.Tensor
    cond_feats: torch.Tensor
    cond_lengths: torch.Tensor
    # The emotion prompt's features when it is not the speaker prompt (``emo_prompt: target``).
    emo_feats: torch.Tensor | None = None
    emo_lengths: torch.Tensor | None = None
    # Stage-2 classifier targets ``[B]`` (the speakers.json class of each row).
    speaker_ids: torch.Tensor | None = None
    utt_ids: list[str] = field(default_factory=list)
    speakers: list[str] = field(default_factory=list)

    _TENSORS = ("text_ids", "text_lengths", "codes", "code_lengths", "cond_feats", "cond_lengths",
                "emo_feats", "emo_lengths", "speaker_ids")

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``UnifiedVoice.forward`` (the emotion prompt only when set)."""
        out = {
            "text_ids": self.text_ids,
            "text_lengths": self.text_lengths,
            "codes": self.codes,
            "code_lengths": self.code_lengths,
            "cond_feats": self.cond_feats,
            "cond_lengths": self.cond_lengths,
        }
        if self.emo_feats is not None:
            out.update(emo_feats=self.emo_feats, emo_lengths=self.emo_lengths)
        return out

    def _map(self, fn) -> "Batch":
        tensors = {k: (None if getattr(self, k) is None else fn(getattr(self, k))) for k in self._TENSORS}
        return Batch(**tensors, utt_ids=self.utt_ids, speakers=self.speakers)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return int(self.text_lengths.shape[0])

    @property
    def n_text_targets(self) -> int:
        """Real text targets (each row's tokens and its stop token)."""
        return int(self.text_lengths.sum()) + len(self)

    @property
    def n_code_targets(self) -> int:
        """Real code targets per codebook (each row's frames and its stop token)."""
        return int(self.code_lengths.sum()) + len(self)

    @property
    def n_tokens(self) -> int:
        """Non-padding target tokens (text and codes, each with its stop token)."""
        return self.n_text_targets + self.n_code_targets



def _pad(seqs: Sequence[torch.Tensor], value: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = seqs[0].new_full((len(seqs), int(lengths.max()), *seqs[0].shape[1:]), value)
    for b, s in enumerate(seqs):
        out[b, : s.shape[0]] = s
    return out, lengths


def collate(items: Sequence[dict[str, Any]]) -> Batch:
    """Pad items of :class:`CodesDataset` into a :class:`Batch` (padding values are 0; the model
    masks by the lengths)."""
    text, text_len = _pad([it["text_ids"] for it in items])
    # codes are (K, T): pad along time, then put the codebook axis back in the middle.
    codes, code_len = _pad([it["codes"].transpose(0, 1) for it in items])
    codes = codes.transpose(1, 2).contiguous()  # (B, K, T)
    cond, cond_len = _pad([it["cond_feats"] for it in items], 0.0)
    emo = emo_len = spk = None
    if "emo_feats" in items[0]:
        emo, emo_len = _pad([it["emo_feats"] for it in items], 0.0)
    if "speaker_id" in items[0]:
        spk = torch.tensor([it["speaker_id"] for it in items], dtype=torch.long)
    return Batch(
        text_ids=text,
        text_lengths=text_len,
        codes=codes,
        code_lengths=code_len,
        cond_feats=cond,
        cond_lengths=cond_len,
        emo_feats=emo,
        emo_lengths=emo_len,
        speaker_ids=spk,
        utt_ids=[it["utt_id"] for it in items],
        speakers=[it["speaker"] for it in items],
    )




class Plan:
    """One epoch's batches as two arrays: ``items`` (item positions, batch after batch) and
    ``bounds`` (batch k is ``items[bounds[k]:bounds[k + 1]]``)."""

    def __init__(self, items: np.ndarray, bounds: np.ndarray) -> None:
        self.items, self.bounds = items, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def batch(self, k: int) -> np.ndarray:
        return self.items[self.bounds[k] : self.bounds[k + 1]]

    def take(self, ids: np.ndarray) -> "Plan":
        """The batches ``ids``, in that order."""
        sizes = np.diff(self.bounds)[ids]
        bounds = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(sizes, out=bounds[1:])
        src = np.repeat(self.bounds[:-1][ids] - bounds[:-1], sizes) + np.arange(bounds[-1])
        return Plan(self.items[src], bounds)

    def of_rank(self, rank: int, world_size: int) -> "Plan":
        """Rank ``rank``'s batches ``rank, rank + world_size, ...``, trimmed so every rank has as
        many."""
        if world_size == 1:
            return self
        per_rank = len(self) // world_size
        return self.take(np.arange(rank, per_rank * world_size, world_size))

    def lists(self, index: np.ndarray | None = None) -> list[list[int]]:
        """The batches as Python lists (of ``index[item]`` when given): for small data and tests."""
        items = self.items if index is None else index[self.items]
        return [items[a:b].tolist() for a, b in zip(self.bounds[:-1], self.bounds[1:])]


def _item_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _sort_in_buckets(order: np.ndarray, key: np.ndarray, bucket: int) -> np.ndarray:
    """``order`` cut into buckets of ``bucket`` items, each sorted by ``key`` (of the items),
    stably: one lexsort for every bucket."""
    ids = np.arange(len(order)) // bucket
    return order[np.lexsort((key[order], ids))]


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar length: shuffle, cut into buckets of ``bucket_batches`` batches, sort
    each bucket by length, cut into batches, shuffle the batch order.

    Deterministic in ``(seed, epoch)``; with ``world_size > 1`` each rank takes every
    ``world_size``-th batch of the same order (the count is trimmed so all ranks step together).

    Args:
        lengths: a length per item (code frames).
        batch_size: items per batch.
        seed: shuffle seed.
        shuffle: False keeps the input order (evaluation).
        drop_last: drop a final short batch.
        bucket_batches: batches per sorting bucket; larger pads less but mixes less.
        rank, world_size: data-parallel position.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        bucket_batches: int = 50,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_batches = bucket_batches
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self) -> Plan:
        """This rank's batches of the current epoch."""
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = _sort_in_buckets(order, self.lengths, self.batch_size * self.bucket_batches).astype(_item_dtype(n))
        # A bucket holds whole batches, so batches start every batch_size items; only the last
        # one can be short.
        bounds = np.append(np.arange(0, n, self.batch_size), n).astype(np.int64)
        if self.drop_last and n % self.batch_size:
            bounds = bounds[:-1]
        plan = Plan(order, bounds)
        if self.shuffle:
            plan = plan.take(rng.permutation(len(plan)))
        return plan.of_rank(self.rank, self.world_size)

    def batches(self) -> list[list[int]]:
        return self.plan().lists()

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        for k in range(len(plan)):
            yield plan.batch(k).tolist()

    def __len__(self) -> int:
        return len(self.plan())


def pack_by_tokens(lengths: np.ndarray, order: np.ndarray, max_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Greedy packing of ``order`` (sorted longest first) into batches whose padded size
    ``len(batch) * longest`` stays within ``max_tokens`` (and ``max_batch_size`` items): the
    extraction's batch planner, over tokens instead of seconds."""
    bounds = _token_bounds(np.asarray(lengths)[order], len(order), max_tokens, max_batch_size)
    return Plan(np.asarray(order), bounds).lists()


def _token_bounds(sorted_lengths: np.ndarray, bucket: int, max_tokens: int, max_batch_size: int) -> np.ndarray:
    """Batch bounds of lengths sorted longest first within buckets of ``bucket`` items: each
    batch starts at its longest item ``L`` and takes ``min(max_batch_size, max_tokens // L)``
    items (at least one), never past its bucket. The same batches as growing a batch while
    ``longest x count <= max_tokens`` (``indextts.codes.plan_batches``), one step per batch."""
    n = len(sorted_lengths)
    longest = sorted_lengths.astype(np.int64)
    fits = np.where(longest > 0, max_tokens // np.maximum(longest, 1), max_batch_size)
    take = np.minimum(max_batch_size, np.maximum(1, fits))
    starts = []
    p = 0
    while p < n:
        starts.append(p)
        p = min(p + int(take[p]), (p // bucket + 1) * bucket, n)
    starts.append(n)
    return np.asarray(starts, dtype=np.int64)


class TokenBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches bounded by *padded tokens* rather than a count, so long and short utterances fill
    the accelerator alike.

    Per epoch: shuffle with ``(seed, epoch)``; cut into buckets of ``bucket_size`` items; sort
    each bucket longest first and pack it greedily so that ``batch size x longest item`` stays
    within ``max_tokens``; shuffle the batch order. With ``world_size > 1`` rank ``r`` takes
    batches ``r, r + world_size, ...`` of the same order, trimmed so every rank has as many.
    An epoch's batches are computed with numpy (:class:`Plan`; this rank's are cached for one epoch).

    It yields lists of ``(epoch, index)`` keys (see :class:`CodesDataset`), so workers draw the
    epoch's references without shared state, and it can start an epoch part-way
    (:meth:`set_epoch` with ``start``), which is how a resumed run sees exactly the batches it had
    not seen.

    Args:
        lengths: GPT positions per item (``ModelConfig.seq_len(ds.text_lengths, ds.lengths)``). An item longer than
            ``max_tokens`` is a ValueError: filter such items first (the trainer drops them with
            a count).
        max_tokens: padded tokens per batch (per rank).
        max_batch_size: items per batch at most.
        seed, shuffle: order; ``shuffle=False`` keeps the input order (evaluation batches).
        bucket_size: items sorted together; larger pads less but mixes lengths less.
        rank, world_size: data-parallel position.
        indices: use only these items (``lengths`` is indexed by them); batches hold dataset
            indices.
        replay: a bool per dataset item (indexed like ``lengths``): a base-language row of
            ``data.replay``. Those items are kept apart from the main ones and mixed in by
            ``replay_ratio``.
        replay_ratio: the share of an epoch's tokens that replay items make up (0 <= r < 1).

    Replay rule: with ``replay_ratio`` 0 (or no replay item) the replay items are left out and
    every batch is exactly what it is without them. With ``r > 0`` each epoch draws replay items
    from ``(seed, epoch, 1)`` (passes of seeded permutations, so every replay item comes once
    before any comes twice) until their tokens are the count closest to ``r / (1 - r)`` times
    the main items' tokens, adds them to the main items and then shuffles, buckets and packs the
    whole set as above: replay rows share batches with main rows, every batch keeps the token
    bound, and the epoch's plan stays a function of ``(seed, epoch)``, so a resumed run sees the
    same batches.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        max_batch_size: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        bucket_size: int = 2000,
        rank: int = 0,
        world_size: int = 1,
        indices: Sequence[int] | np.ndarray | None = None,
        replay: Sequence[bool] | np.ndarray | None = None,
        replay_ratio: float = 0.0,
    ) -> None:
        lengths = np.asarray(lengths)
        if not np.issubdtype(lengths.dtype, np.integer):
            lengths = lengths.astype(np.int64)
        if not 0.0 <= replay_ratio < 1.0:
            raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
        # indices: the dataset items to use (a subset); batches name dataset indices either way.
        self._index = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.replay_ratio = float(replay_ratio)
        self._n_main = None  # with replay mixed in: items [0, _n_main) are main, the rest replay
        if replay is not None:
            replay = np.asarray(replay, dtype=bool)
            if len(replay) != len(lengths):
                raise ValueError(f"replay has {len(replay)} flags for {len(lengths)} items")
            index = np.arange(len(lengths)) if self._index is None else self._index
            flags = replay[index]
            if flags.any():
                main = index[~flags]
                if self.replay_ratio > 0:
                    self._index, self._n_main = np.concatenate([main, index[flags]]), len(main)
                else:
                    self._index = main
        self.lengths = lengths if self._index is None else lengths[self._index]
        if max_tokens < 1 or max_batch_size < 1 or bucket_size < 1:
            raise ValueError("max_tokens, max_batch_size and bucket_size must be at least 1")
        if len(self.lengths) and int(self.lengths.max()) > max_tokens:
            raise ValueError(
                f"an item has {int(self.lengths.max())} tokens, more than max_tokens={max_tokens}: "
                "raise the token budget or drop such items first"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.max_tokens, self.max_batch_size = int(max_tokens), int(max_batch_size)
        self.seed, self.shuffle, self.bucket_size = seed, shuffle, int(bucket_size)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self._cached: tuple[int, Plan] | None = None  # this rank's plan of one epoch

    @property
    def indices(self) -> np.ndarray:
        return np.arange(len(self.lengths)) if self._index is None else self._index

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start`` (0 = the whole epoch)."""
        self.epoch, self.start = int(epoch), int(start)

    def _replay_draw(self, epoch: int) -> np.ndarray:
        """The replay items of ``epoch`` (positions into ``self.lengths``), their tokens closest
        to ``r / (1 - r)`` times the main items' tokens (see the class doc)."""
        n_main = self._n_main
        main_tokens = int(self.lengths[:n_main].sum(dtype=np.int64))
        pool = np.arange(n_main, len(self.lengths))
        target = self.replay_ratio / (1 - self.replay_ratio) * main_tokens
        per_pass = int(self.lengths[pool].sum(dtype=np.int64))
        passes = int(target // max(per_pass, 1)) + 1
        rng = np.random.default_rng((self.seed, epoch, 1))
        stream = np.concatenate([rng.permutation(pool) for _ in range(passes)])
        cum = np.cumsum(self.lengths[stream].astype(np.int64))
        k = int(np.searchsorted(cum, target))  # cum[k] >= target: take k or k + 1 items
        if k < len(cum) and (k == 0 or cum[k] - target < target - cum[k - 1]):
            k += 1
        return stream[:k]

    def replay_share(self, epoch: int = 0) -> float:
        """The share of ``epoch``'s tokens (every rank's) that replay items make up."""
        if self._n_main is None:
            return 0.0
        items = self._all(epoch).items
        ln = self.lengths[items].astype(np.int64)
        return float(ln[items >= self._n_main].sum() / max(int(ln.sum()), 1))

    def _all(self, epoch: int) -> Plan:
        """Every rank's batches of ``epoch``, positions into ``self.lengths``."""
        if self._n_main is not None:
            items = np.concatenate([np.arange(self._n_main), self._replay_draw(epoch)])
            rng = np.random.default_rng((self.seed, epoch))
            order = items[rng.permutation(len(items))] if self.shuffle else items
            order = _sort_in_buckets(order, -self.lengths.astype(np.int64), self.bucket_size).astype(_item_dtype(len(self.lengths)))
            plan = Plan(order, _token_bounds(self.lengths[order], self.bucket_size, self.max_tokens, self.max_batch_size))
            return plan.take(rng.permutation(len(plan))) if self.shuffle else plan
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = _sort_in_buckets(order, -self.lengths.astype(np.int64), self.bucket_size).astype(_item_dtype(n))
        plan = Plan(order, _token_bounds(self.lengths[order], self.bucket_size, self.max_tokens, self.max_batch_size))
        if self.shuffle:
            plan = plan.take(rng.permutation(len(plan)))
        return plan

    def _mine(self, epoch: int) -> Plan:
        """This rank's batches of ``epoch`` (cached for one epoch), positions into ``self.lengths``."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = None
            self._cached = (epoch, self._all(epoch).of_rank(self.rank, self.world_size))
            release_freed_memory()
        return self._cached[1]

    def plan(self, epoch: int | None = None) -> Plan:
        """This rank's batches of ``epoch`` (default: the current one), as dataset indices."""
        mine = self._mine(self.epoch if epoch is None else epoch)
        return mine if self._index is None else Plan(self._index[mine.items], mine.bounds)

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order (item indices), as lists: small data only."""
        return self._all(epoch).lists(self._index)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one), from the start, as lists:
        small data only (:meth:`plan` holds them as arrays)."""
        return self._mine(self.epoch if epoch is None else epoch).lists(self._index)

    def n_batches(self, epoch: int | None = None) -> int:
        """This rank's batches in ``epoch`` (default: the current one)."""
        return len(self._mine(self.epoch if epoch is None else epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan, epoch = self.plan(), self.epoch
        for k in range(self.start, len(plan)):
            yield [(epoch, i) for i in plan.batch(k).tolist()]

    def __len__(self) -> int:
        """Batches left in the current epoch from ``start``."""
        return max(0, self.n_batches() - self.start)

    def padding_efficiency(self, epoch: int = 0) -> float:
        """Real over padded tokens of one epoch's batches (1.0 = no padding)."""
        plan = self._all(epoch)
        if not len(plan):
            return 0.0
        ln = self.lengths[plan.items].astype(np.int64)
        real = int(ln.sum())
        padded = int((np.maximum.reduceat(ln, plan.bounds[:-1]) * np.diff(plan.bounds)).sum())
        return real / max(padded, 1)
