"""The training data path as it was before the memory-mapped cache (issue 19): every shard read
whole into each process, a pandas frame of every row, Python lists in the samplers.

Kept only as the oracle of the tests: ``tests/test_dataset.py`` checks that the mapped
``indextts.dataset.CodesDataset`` yields exactly these items and batches, and that this one fails
the workers' memory bound the mapped one meets. ``core_item`` is ``__getitem__`` without the
prompt features (what the memory test and ``bench/bench_data.py`` read). Not for new code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from indextts.data import DataError
from indextts.features import FeatureConfig, load_audio, log_mel

def _split_lookup(clean_path: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(clean_path, columns=["utt_id", "split"])
    except Exception as e:
        raise DataError(f"{clean_path}: cannot read utt_id/split columns ({e})") from e
    return dict(zip(table.column("utt_id").to_pylist(), table.column("split").to_pylist()))


class LegacyCodesDataset(torch.utils.data.Dataset):
    """Utterances of the code shards, tokenised, with reference conditioning features.

    Args:
        shards: code shard paths (``indextts.codes.shard_paths(index)``).
        bpe_path: the SentencePiece model used to tokenise ``text``.
        features: how the conditioning features are computed (``FeatureConfig``).
        split: keep only this split (``"train"``/``"val"``), None for all. Taken from a ``split``
            column of the shards if they have one, else from ``clean_path``.
        clean_path: ``clean.parquet``, for the split of each utt_id.
        seed: reference choice and crop seed.
        max_text_tokens: drop utterances with more text tokens (the model's position table).
        max_code_frames: drop utterances with more code frames.
        max_ref_seconds: crop reference audio to at most this long (a random, seeded window).
        n_codebooks: how many codebooks are the target, the first K of the shard's ``n_q``
            (1: the first only, as in IndexTTS2).
        speakers: ``{speaker: class_id}`` (speakers.json); when given, only utterances of these
            speakers are kept and items carry ``speaker_id`` (stage 2).
        require_emotion: keep only utterances with an emotion label.
        emo_prompt: ``"reference"``: the emotion prompt is the speaker prompt (the model's
            default); ``"target"``: a crop of the target utterance itself, which is the one clip
            sure to carry the target's emotion, so ``emo_vec`` learns emotion from its prompt.

    Items are addressed by an index or by ``(epoch, index)`` (what :class:`TokenBatchSampler`
    yields): the epoch picks the reference draw, so DataLoader workers need no shared state.

    Raises:
        DataError: no shards, a split that cannot be determined, or nothing left after filtering.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        *,
        bpe_path: str | Path,
        features: FeatureConfig,
        split: str | None = "train",
        clean_path: str | Path | None = None,
        seed: int = 0,
        max_text_tokens: int | None = None,
        max_code_frames: int | None = None,
        max_ref_seconds: float = 6.0,
        n_codebooks: int = 1,
        speakers: Mapping[str, int] | None = None,
        require_emotion: bool = False,
        emo_prompt: Literal["reference", "target"] = "reference",
    ) -> None:
        import pandas as pd
        import sentencepiece as spm

        from indextts.codes import read_shard_codes

        if not shards:
            raise DataError("no code shards given (is results/codes/index.json empty?)")
        self.features = features
        self.seed = seed
        self.epoch = 0
        if n_codebooks < 1:
            raise DataError(f"n_codebooks must be at least 1, got {n_codebooks}")
        self.n_codebooks = n_codebooks
        if emo_prompt not in ("reference", "target"):
            raise DataError(f"emo_prompt must be 'reference' or 'target', got {emo_prompt!r}")
        self.emo_prompt = emo_prompt
        self.speaker_map = dict(speakers) if speakers is not None else None
        self.max_ref_seconds = max_ref_seconds
        self.max_ref_samples = int(max_ref_seconds * features.sample_rate)
        self._shards = [read_shard_codes(Path(p)) for p in shards]
        for sh in self._shards:
            if sh.n_q < n_codebooks:
                raise DataError(
                    f"{sh.path}: holds {sh.n_q} codebooks (codec {sh.codec.get('weights', '?')}), but "
                    f"{n_codebooks} were asked for; set model.n_codebooks to at most {sh.n_q} or re-extract "
                    "the codes with more quantizers (codec.n_quantizers)"
                )
        metas = []
        for s, sh in enumerate(self._shards):
            m = sh.meta.copy()
            m["_shard"] = s
            m["_row"] = np.arange(len(m))
            metas.append(m)
        meta = pd.concat(metas, ignore_index=True)
        self.n_input = len(meta)
        self.dropped: dict[str, int] = {}

        if split is not None:
            if "split" in meta.columns:
                splits = meta["split"]
            elif clean_path is not None:
                lookup = _split_lookup(Path(clean_path))
                splits = meta["utt_id"].map(lookup)
                if splits.isna().any():
                    missing = meta.loc[splits.isna(), "utt_id"].iloc[0]
                    raise DataError(
                        f"{clean_path}: utt_id {missing!r} of the code shards is not in the clean manifest; "
                        "the codes are stale: rerun extract_codes"
                    )
            else:
                raise DataError(f"split={split!r} asked for, but the shards have no split column and no clean manifest was given")
            keep = (splits == split).to_numpy()
            self.dropped["other_split"] = int((~keep).sum())
            meta = meta[keep].reset_index(drop=True)

        if self.speaker_map is not None:
            keep = meta["speaker"].astype(str).isin(list(self.speaker_map)).to_numpy()
            self.dropped["unmapped_speaker"] = int((~keep).sum())
            meta = meta[keep].reset_index(drop=True)
        if require_emotion:
            keep = (meta["emotion"].notna() & (meta["emotion"].astype(str) != "")).to_numpy() \
                if "emotion" in meta.columns else np.zeros(len(meta), dtype=bool)
            self.dropped["no_emotion"] = int((~keep).sum())
            meta = meta[keep].reset_index(drop=True)

        sp = spm.SentencePieceProcessor()
        sp.Load(str(bpe_path))
        ids = sp.encode(meta["text"].astype(str).tolist(), out_type=int)
        n_text = np.array([len(x) for x in ids], dtype=np.int64)
        n_frames = meta["n_frames"].to_numpy(dtype=np.int64)
        keep = (n_text > 0) & (n_frames > 0)
        self.dropped["empty"] = int((~keep).sum())
        if max_text_tokens is not None:
            too_long = n_text > max_text_tokens
            self.dropped["text_too_long"] = int((too_long & keep).sum())
            keep &= ~too_long
        if max_code_frames is not None:
            too_long = n_frames > max_code_frames
            self.dropped["codes_too_long"] = int((too_long & keep).sum())
            keep &= ~too_long
        if not keep.any():
            raise DataError(
                f"no utterance left of {self.n_input} (dropped: {self.dropped}); check split, "
                "max lengths and the shards"
            )
        idx = np.flatnonzero(keep)
        self.meta = meta.iloc[idx].reset_index(drop=True)
        # Flat token store: one int32 array + offsets instead of millions of Python lists.
        kept_ids = [ids[i] for i in idx]
        self._tok_off = np.zeros(len(kept_ids) + 1, dtype=np.int64)
        self._tok_off[1:] = np.cumsum([len(x) for x in kept_ids])
        self._tok = np.fromiter((t for x in kept_ids for t in x), dtype=np.int32, count=int(self._tok_off[-1]))
        self.unk_tokens = int((self._tok == sp.unk_id()).sum())
        self.lengths = self.meta["n_frames"].to_numpy(dtype=np.int64)
        self.text_lengths = np.diff(self._tok_off)
        # speaker -> positions, for reference choice
        self._by_speaker = {spk: np.asarray(g, dtype=np.int64) for spk, g in self.meta.groupby("speaker", sort=False).indices.items()}
        # w2v-BERT prompts are read from the store extraction wrote; a missing, mismatched or too
        # short store fails here, not in a loader worker.
        self._prompts = self._open_prompt_store() if features.kind == "w2v_bert" else None

    def __len__(self) -> int:
        return len(self.meta)

    def set_epoch(self, epoch: int) -> None:
        """Draw other references (and crops) in the next epoch; same epoch, same draws."""
        self.epoch = int(epoch)

    def text_ids(self, i: int) -> np.ndarray:
        return self._tok[self._tok_off[i] : self._tok_off[i + 1]]

    def reference_index(self, i: int, epoch: int | None = None) -> int:
        """Another utterance of the same speaker, drawn from (seed, epoch, i); ``i`` if none."""
        epoch = self.epoch if epoch is None else epoch
        group = self._by_speaker[self.meta.at[i, "speaker"]]
        if len(group) < 2:
            return i
        rng = np.random.default_rng((self.seed, epoch, i))
        j = int(group[rng.integers(len(group) - 1)])
        # skip i itself: draw among the others
        return j if j != i else int(group[-1])

    def _crop_features(self, j: int, epoch: int, salt: tuple[int, ...]) -> torch.Tensor:
        """Features ``[frames, F]`` of utterance ``j``, cropped to ``max_ref_seconds`` at a window
        drawn from (seed, epoch, *salt)."""
        if self.features.kind == "w2v_bert":
            # Not computed here: extract_codes stored them (features.store), the w2v-BERT pass of the
            # semantic codes themselves; read back from codes/features/ beside the shards.
            from indextts.features import W2V_BERT_HOP

            rng = np.random.default_rng((self.seed, epoch, *salt))
            return self._prompts.crop(str(self.meta.at[j, "utt_id"]), self.max_ref_samples // W2V_BERT_HOP, rng)
        wave = load_audio(self.meta.at[j, "audio_path"], self.features.sample_rate)
        if wave.shape[0] > self.max_ref_samples:
            rng = np.random.default_rng((self.seed, epoch, *salt))
            start = int(rng.integers(wave.shape[0] - self.max_ref_samples + 1))
            wave = wave[start : start + self.max_ref_samples]
        return log_mel(wave, self.features)

    def _open_prompt_store(self):
        """The w2v-BERT prompt features extraction stored beside the shards, checked against what
        this dataset reads: the feature width and the crop length."""
        from indextts.features import PromptFeatureStore

        try:
            store = PromptFeatureStore.beside([sh.path for sh in self._shards])
        except (FileNotFoundError, ValueError) as e:
            raise DataError(str(e)) from None
        if store.dim != self.features.dim:
            raise DataError(f"{store.paths[0]}: stored features are {store.dim}-dim, the model "
                            f"reads {self.features.dim} (model features.w2v_bert_dim); re-extract or fix the model")
        if store.max_ref_seconds is not None and self.max_ref_seconds > store.max_ref_seconds + 1e-9:
            raise DataError(
                f"{store.paths[0]}: prompt crops of {self.max_ref_seconds:g} s are asked for (train.max_ref_seconds, or "
                f"validate.max_ref_seconds when validating), but the stored features hold at most "
                f"{store.max_ref_seconds:g} s per utterance (features.max_ref_seconds at extraction): raise "
                "features.max_ref_seconds and re-extract the codes, or lower the crop"
            )
        return store

    def reference_features(self, i: int, epoch: int | None = None) -> torch.Tensor:
        """Log-mel ``[frames, F]`` of the reference utterance of item ``i``."""
        epoch = self.epoch if epoch is None else epoch
        return self._crop_features(self.reference_index(i, epoch), epoch, (i, 1))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = (self.epoch, key) if isinstance(key, (int, np.integer)) else key
        i = int(i)
        row = self.meta.iloc[i]
        codes = self._shards[int(row["_shard"])].codes(int(row["_row"]))
        item = {
            "utt_id": str(row["utt_id"]),
            "speaker": str(row["speaker"]),
            "text_ids": torch.from_numpy(self.text_ids(i).astype(np.int64)),
            "codes": torch.from_numpy(codes[: self.n_codebooks].astype(np.int64)),  # (K, T)
            "cond_feats": self.reference_features(i, epoch),
        }
        if self.emo_prompt == "target":
            item["emo_feats"] = self._crop_features(i, epoch, (i, 2))
        if self.speaker_map is not None:
            item["speaker_id"] = int(self.speaker_map[str(row["speaker"])])
        return item

    def core_item(self, i: int) -> dict[str, Any]:
        """``__getitem__`` without the prompt features: ids, text ids and codes."""
        row = self.meta.iloc[int(i)]
        codes = self._shards[int(row["_shard"])].codes(int(row["_row"]))
        return {
            "utt_id": str(row["utt_id"]),
            "speaker": str(row["speaker"]),
            "text_ids": torch.from_numpy(self.text_ids(int(i)).astype(np.int64)),
            "codes": torch.from_numpy(codes[: self.n_codebooks].astype(np.int64)),
        }


class LegacyBucketBatchSampler(torch.utils.data.Sampler[list[int]]):
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
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_batches = bucket_batches
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        out: list[list[int]] = []
        size = self.batch_size * self.bucket_batches
        for start in range(0, n, size):
            bucket = order[start : start + size]
            bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
            for b in range(0, len(bucket), self.batch_size):
                batch = bucket[b : b + self.batch_size].tolist()
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                out.append(batch)
        if self.shuffle:
            out = [out[k] for k in rng.permutation(len(out))]
        if self.world_size > 1:
            per_rank = len(out) // self.world_size
            out = out[self.rank : per_rank * self.world_size : self.world_size]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def pack_by_tokens(lengths: np.ndarray, order: np.ndarray, max_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Greedy packing of ``order`` (sorted longest first) into batches whose padded size
    ``len(batch) * longest`` stays within ``max_tokens`` (and ``max_batch_size`` items): the
    extraction's batch planner, over tokens instead of seconds."""
    from indextts.codes import plan_batches

    return [[int(order[k]) for k in b] for b in plan_batches(lengths[order].tolist(), max_tokens, max_batch_size)]


class LegacyTokenBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches bounded by *padded tokens* rather than a count, so long and short utterances fill
    the accelerator alike.

    Per epoch: shuffle with ``(seed, epoch)``; cut into buckets of ``bucket_size`` items; sort
    each bucket longest first and pack it greedily so that ``batch size x longest item`` stays
    within ``max_tokens``; shuffle the batch order. With ``world_size > 1`` rank ``r`` takes
    batches ``r, r + world_size, ...`` of the same order, trimmed so every rank has as many.

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
    ) -> None:
        # indices: the dataset items to use (a subset); batches name dataset indices either way.
        self.indices = np.arange(len(lengths)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)[self.indices]
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

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its batch ``start`` (0 = the whole epoch)."""
        self.epoch, self.start = int(epoch), int(start)

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch``, in order (item indices)."""
        n = len(self.lengths)
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        out: list[list[int]] = []
        for b in range(0, n, self.bucket_size):
            bucket = order[b : b + self.bucket_size]
            bucket = bucket[np.argsort(-self.lengths[bucket], kind="stable")]
            out += pack_by_tokens(self.lengths, bucket, self.max_tokens, self.max_batch_size)
        if self.shuffle:
            out = [out[k] for k in rng.permutation(len(out))]
        return [self.indices[b].tolist() for b in out]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of ``epoch`` (default: the current one), from the start."""
        out = self.all_batches(self.epoch if epoch is None else epoch)
        if self.world_size > 1:
            per_rank = len(out) // self.world_size
            out = out[self.rank : per_rank * self.world_size : self.world_size]
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches()[self.start :]:
            yield [(self.epoch, i) for i in batch]

    def __len__(self) -> int:
        """Batches left in the current epoch from ``start``."""
        return max(0, len(self.batches()) - self.start)

    def padding_efficiency(self, epoch: int = 0) -> float:
        """Real over padded tokens of one epoch's batches (1.0 = no padding)."""
        real = padded = 0
        pos = {int(i): k for k, i in enumerate(self.indices)}
        for b in self.all_batches(epoch):
            ln = self.lengths[[pos[i] for i in b]]
            real += int(ln.sum())
            padded += int(ln.max()) * len(b)
        return real / max(padded, 1)
