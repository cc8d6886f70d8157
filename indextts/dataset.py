"""The training dataset: utterances of the codes pack, tokenised, with reference conditioning features.

One item is one utterance of the codes pack (:mod:`indextts.pack`, the cache of the Parquet code
shards): its text ids (the tokens folder of the vocabulary), its target codes (the first
``n_codebooks`` codebooks ``[K, T]``) and the conditioning features of a *reference* utterance:
another utterance of the same speaker when there is one (so the model learns to take timbre from
the prompt, not to copy it), else the utterance itself. The reference is drawn from
``(seed, epoch, index)``, so a run is reproducible and resumes exactly.

Memory: the dataset holds five int32 per kept utterance (pack row, code frames, text ids, speaker
and the speaker-grouped order of the reference draw: 20 bytes) and no Python object per row.
An item is read by offset through the page cache (see :mod:`indextts.pack`), so DataLoader
workers forked from it share everything and copy nothing as they read.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from indextts.features import FeatureConfig, load_audio, log_mel
from indextts.pack import CodesPack, DataError, TokenPack, ensure_tokens, pack_codes, release_freed_memory, tokenize_text


def _remove_owned(path: str, owner: int) -> None:
    # Only the process that made the folder removes it: a forked DataLoader worker that drops
    # its copy of the dataset must not delete the files its parent still reads.
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


class CodesDataset(torch.utils.data.Dataset):
    """Utterances of a codes pack, tokenised, with reference conditioning features.

    Args:
        shards: code shard paths, packed into a temporary folder for this dataset (tests, small
            data). The pipeline gives ``pack`` and ``tokens`` instead.
        pack: a codes pack folder (``pack_codes``' output).
        tokens: its tokens folder for the vocabulary (``tokenize_text``' output); default: made
            beside the pack from ``bpe_path`` when missing (:func:`indextts.pack.ensure_tokens`).
        bpe_path: the SentencePiece model; the tokens are checked to be of this vocabulary.
        features: how the conditioning features are computed (``FeatureConfig``).
        split: keep only this split (``"train"``/``"val"``), None for all (from the clean manifest
            the pack was made with).
        clean_path: ``clean.parquet``, for the split of each utt_id (with ``shards``).
        seed: reference choice and crop seed.
        max_text_tokens: drop utterances with more text tokens (the model's position table).
        max_code_frames: drop utterances with more code frames.
        max_ref_seconds: crop reference audio to at most this long (a random, seeded window).
        n_codebooks: how many codebooks are the target, the first K of the pack's ``n_q``.
        speakers: ``{speaker: class_id}`` (speakers.json); when given, only utterances of these
            speakers are kept and items carry ``speaker_id`` (stage 2).
        require_emotion: keep only utterances with an emotion label.
        emo_prompt: ``"reference"``: the emotion prompt is the speaker prompt (the model's
            default); ``"target"``: a crop of the target utterance itself, which is the one clip
            sure to carry the target's emotion, so ``emo_vec`` learns emotion from its prompt.

    Items are addressed by an index or by ``(epoch, index)`` (what
    :class:`indextts.data.TokenBatchSampler` yields): the epoch picks the reference draw, so
    DataLoader workers need no shared state.

    Raises:
        DataError: no shards, a split that cannot be determined, tokens of another pack or
            vocabulary, or nothing left after filtering.
    """

    def __init__(
        self,
        shards: Sequence[str | Path] | None = None,
        *,
        pack: str | Path | CodesPack | None = None,
        tokens: str | Path | TokenPack | None = None,
        bpe_path: str | Path | None = None,
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
        self._tmp: str | None = None
        if pack is None:
            if not shards:
                raise DataError("no code shards given (is results/codes/index.json empty?)")
            if bpe_path is None and tokens is None:
                raise DataError("give bpe_path (the vocabulary to tokenise the text with)")
            self._tmp = tempfile.mkdtemp(prefix="indextts-pack-")
            weakref.finalize(self, _remove_owned, self._tmp, os.getpid())
            pack = pack_codes(shards, Path(self._tmp) / "pack", clean=clean_path)
            if tokens is None:
                tokens = tokenize_text(pack, bpe_path, Path(self._tmp) / "tokens")
        self.pack = pack if isinstance(pack, CodesPack) else CodesPack(pack)
        if tokens is None:
            if bpe_path is None:
                raise DataError("give tokens (tokenize_text's folder) or bpe_path")
            tokens = ensure_tokens(self.pack.folder, bpe_path)
        self.tokens = tokens if isinstance(tokens, TokenPack) else TokenPack(tokens)
        self.tokens.check(self.pack, bpe_path)

        self.features = features
        self.seed = seed
        self.epoch = 0
        if n_codebooks < 1:
            raise DataError(f"n_codebooks must be at least 1, got {n_codebooks}")
        if self.pack.n_q < n_codebooks:
            raise DataError(
                f"{self.pack.shards[0]}: holds {self.pack.n_q} codebooks (codec "
                f"{self.pack.meta['codec'].get('weights', '?')}), but {n_codebooks} were asked for; set "
                f"model.n_codebooks to at most {self.pack.n_q} or re-extract the codes with more quantizers "
                "(codec.n_quantizers)"
            )
        self.n_codebooks = n_codebooks
        if emo_prompt not in ("reference", "target"):
            raise DataError(f"emo_prompt must be 'reference' or 'target', got {emo_prompt!r}")
        self.emo_prompt = emo_prompt
        self.speaker_map = dict(speakers) if speakers is not None else None
        self.max_ref_seconds = max_ref_seconds
        self.max_ref_samples = int(max_ref_seconds * features.sample_rate)
        self._select(split, require_emotion, max_text_tokens, max_code_frames)
        # w2v-BERT prompts are read from the store extraction wrote; a missing, mismatched or too
        # short store fails here, not in a loader worker.
        self._prompts = self._open_prompt_store() if features.kind == "w2v_bert" else None

    def _select(self, split: str | None, require_emotion: bool, max_text_tokens: int | None,
                max_code_frames: int | None) -> None:
        """Choose the kept utterances with numpy over the mapped per-utterance arrays, counting
        each reason in ``dropped`` (each filter counts among the rows the earlier ones kept)."""
        pack = self.pack
        self.n_input = pack.rows
        self.dropped: dict[str, int] = {}
        keep = np.ones(pack.rows, dtype=bool)
        if split is not None:
            if pack.meta["source"].get("clean_sha256") is None:
                raise DataError(f"split={split!r} asked for, but the shards have no split column and no clean manifest "
                                f"was given (the pack {pack.folder} was made without one)")
            code = pack.splits.index(split) if split in pack.splits else -2
            keep &= pack.array("split") == code
            self.dropped["other_split"] = int(pack.rows - keep.sum())
        names = _Names(pack)
        speaker = pack.array("speaker")
        self._class = None
        if self.speaker_map is not None:
            index = {name: k for k, name in enumerate(names.all())}
            mapped = np.zeros(len(names), dtype=bool)
            self._class = np.full(len(names), -1, dtype=np.int64)
            for name, cid in self.speaker_map.items():
                if name in index:
                    mapped[index[name]] = True
                    self._class[index[name]] = int(cid)
            m = mapped[speaker]
            self.dropped["unmapped_speaker"] = int((keep & ~m).sum())
            keep &= m
        if require_emotion:
            m = pack.array("has_emotion")
            self.dropped["no_emotion"] = int((keep & ~m).sum())
            keep &= m
        n_text = self.tokens.lengths()
        n_frames = pack.array("n_frames")
        m = (n_text > 0) & (n_frames > 0)
        self.dropped["empty"] = int((keep & ~m).sum())
        keep &= m
        if max_text_tokens is not None:
            too_long = n_text > max_text_tokens
            self.dropped["text_too_long"] = int((keep & too_long).sum())
            keep &= ~too_long
        if max_code_frames is not None:
            too_long = n_frames > max_code_frames
            self.dropped["codes_too_long"] = int((keep & too_long).sum())
            keep &= ~too_long
        if not keep.any():
            raise DataError(
                f"no utterance left of {self.n_input} (dropped: {self.dropped}); check split, "
                "max lengths and the shards"
            )
        rows = np.flatnonzero(keep)
        del keep, m
        self._rows = rows.astype(np.int32 if pack.rows < 2**31 else np.int64)
        self.lengths = np.asarray(n_frames[rows], dtype=np.int32)
        self.text_lengths = np.asarray(n_text[rows], dtype=np.int32)
        self.unk_tokens = int(np.asarray(self.tokens.unk()[rows], dtype=np.int64).sum())
        # Per item: its language (index into ``languages``, -1 unknown) and whether it is a
        # base-language row of data.replay (what the sampler mixes in by train.stageN.replay_ratio).
        self.languages: list[str] = list(pack.languages)
        self.language = np.asarray(pack.array("language")[rows], dtype=np.int16)
        self.replay = np.asarray(pack.array("replay")[rows], dtype=bool)
        # The reference draw: each speaker's items in index order, as slices of one array.
        self._speaker = np.asarray(speaker[rows], dtype=np.int32)
        self._order = np.argsort(self._speaker, kind="stable").astype(self._rows.dtype)
        self._starts = np.searchsorted(self._speaker[self._order], np.arange(len(names) + 1))
        self._names = names
        release_freed_memory()

    def __len__(self) -> int:
        return len(self._rows)

    def set_epoch(self, epoch: int) -> None:
        """Draw other references (and crops) in the next epoch; same epoch, same draws."""
        self.epoch = int(epoch)

    def text_ids(self, i: int) -> np.ndarray:
        return self.tokens.ids(int(self._rows[i]))

    def utt_id(self, i: int) -> str:
        return self.pack.string("utt_id", int(self._rows[i]))

    def speaker(self, i: int) -> str:
        return self._names.get(int(self._speaker[i]))

    def language_name(self, code: int) -> str:
        """The language of code ``code`` of :attr:`language` (``"?"`` when unknown)."""
        return self.languages[code] if 0 <= code < len(self.languages) else "?"

    def speakers_present(self) -> list[str]:
        """The speakers that have items, sorted."""
        return sorted(self._names.get(int(k)) for k in np.flatnonzero(np.diff(self._starts)))

    @property
    def meta(self) -> "Any":
        """A pandas frame of the items (utt_id, speaker, audio_path, n_frames), built on each
        access: Python objects for every item, for inspection and small tests only."""
        import pandas as pd

        pick = lambda name: np.asarray(self.pack.strings(name), dtype=object)[self._rows]  # noqa: E731
        names = np.asarray(self._names.all(), dtype=object)
        return pd.DataFrame({"utt_id": pick("utt_id"), "speaker": names[self._speaker],
                             "audio_path": pick("audio_path"), "n_frames": self.lengths.astype(np.int64)})

    def reference_index(self, i: int, epoch: int | None = None) -> int:
        """Another utterance of the same speaker, drawn from (seed, epoch, i); ``i`` if none."""
        epoch = self.epoch if epoch is None else epoch
        i = int(i)
        s = self._speaker[i]
        a, b = int(self._starts[s]), int(self._starts[s + 1])
        if b - a < 2:
            return i
        rng = np.random.default_rng((self.seed, epoch, i))
        j = int(self._order[a + rng.integers(b - a - 1)])
        # skip i itself: draw among the others
        return j if j != i else int(self._order[b - 1])

    def _crop_features(self, j: int, epoch: int, salt: tuple[int, ...]) -> torch.Tensor:
        """Features ``[frames, F]`` of utterance ``j``, cropped to ``max_ref_seconds`` at a window
        drawn from (seed, epoch, *salt)."""
        if self.features.kind == "w2v_bert":
            # Not computed here: extract_codes stored them (features.store), the w2v-BERT pass of the
            # semantic codes themselves; read back from codes/features/ beside the shards.
            from indextts.features import W2V_BERT_HOP

            rng = np.random.default_rng((self.seed, epoch, *salt))
            return self._prompts.crop(self.utt_id(j), self.max_ref_samples // W2V_BERT_HOP, rng)
        wave = load_audio(self.pack.string("audio_path", int(self._rows[j])), self.features.sample_rate)
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
            store = PromptFeatureStore.beside(self.pack.shards)
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

    def core_item(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its prompt features: ids, text ids and target codes (what the
        memory test and ``bench/bench_data.py`` read)."""
        i = int(i)
        r = int(self._rows[i])
        codes = self.pack.codes(r, int(self.lengths[i]), self.n_codebooks)
        return {
            "utt_id": self.pack.string("utt_id", r),
            "speaker": self.speaker(i),
            "text_ids": torch.from_numpy(self.tokens.ids(r).astype(np.int64)),
            "codes": torch.from_numpy(codes.astype(np.int64)),  # (K, T)
        }

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = (self.epoch, key) if isinstance(key, (int, np.integer)) else key
        i = int(i)
        item = self.core_item(i)
        item["cond_feats"] = self.reference_features(i, epoch)
        if self.emo_prompt == "target":
            item["emo_feats"] = self._crop_features(i, epoch, (i, 2))
        if self._class is not None:
            item["speaker_id"] = int(self._class[self._speaker[i]])
        return item


class _Names:
    """The pack's speaker names as UTF-8 bytes + offsets in memory (one numpy buffer, not a
    Python string per speaker that every worker would touch)."""

    def __init__(self, pack: CodesPack) -> None:
        self._data = np.load(pack.folder / "speaker_names.npy")
        self._off = np.load(pack.folder / "speaker_names_offsets.npy")

    def __len__(self) -> int:
        return len(self._off) - 1

    def get(self, k: int) -> str:
        return self._data[self._off[k] : self._off[k + 1]].tobytes().decode("utf-8")

    def all(self) -> list[str]:
        return [self.get(k) for k in range(len(self))]
