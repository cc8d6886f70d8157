"""Conditioning features for the speaker and emotion conditioners, and audio loading.

Two kinds (``FeatureConfig.kind``), each sized by its own field so the conformer's input size
(``ModelConfig.cond_feat_dim``) follows it:

``log_mel`` (the default of the small presets)
    A log-mel spectrogram computed here with torchaudio (:func:`log_mel`). The pretrained conformer
    input projection is then re-initialised by the checkpoint import (the transfer report lists it).

``w2v_bert`` (the released IndexTTS2 input)
    The hidden states of layer 17 of w2v-BERT 2.0 (1024-dim, 50 frames/s), normalised by the mean
    and variance in the released ``wav2vec2bert_stats.pt``: :class:`W2VBert`, loaded from a local
    ``facebook/w2v-bert-2.0`` folder (``transformers``' ``SeamlessM4TFeatureExtractor`` and
    ``Wav2Vec2BertModel`` with ``local_files_only``; nothing is downloaded). The same features feed
    the MaskGCT semantic codec (:mod:`indextts.audio.semantic_codec`), so code extraction computes them
    once per utterance and can store a crop of each beside the codes (:class:`PromptFeaturesConfig`,
    read back with :class:`PromptFeatureStore`), which is what the trainer reads instead of running
    a 600M-parameter encoder on every prompt at every step.

Shapes: features are ``[..., frames, dim]``, time before features, which is the layout
``UnifiedVoice.forward`` takes for ``cond_feats`` (the original's ``(b, s, d)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

from indextts.audio.w2v_bert import W2V_BERT_DIM, W2V_BERT_HOP, W2V_BERT_SAMPLE_RATE


@dataclass(frozen=True)
class FeatureConfig:
    """How conditioning features are computed from a reference waveform.

    ``kind="log_mel"`` is computed by :func:`log_mel` from these settings. ``kind="w2v_bert"`` is
    the released model's input, computed by :class:`W2VBert` from the w2v-BERT folder, stats and
    layer of the ``codec`` section (extraction stores them; the data loader reads them back);
    here only its width, ``w2v_bert_dim``, matters. :func:`log_mel` refuses that kind.
    """

    # log_mel: computed here, needs nothing but torchaudio. w2v_bert: the released input.
    kind: Literal["log_mel", "w2v_bert"] = "log_mel"
    # 16 kHz is what the original feeds its conditioning front end; speech needs no more.
    sample_rate: int = 16000
    # 64 ms window at 16 kHz: fine enough in frequency for 80 mel bands.
    n_fft: int = 1024
    win_length: int = 1024
    # 20 ms hop = 50 frames/s, the frame rate of the w2v-BERT features the released
    # conformers were trained on, so sequence lengths (and the 5000-entry pe table) match.
    hop_length: int = 320
    # 80 bands is the common TTS choice (BigVGAN, Tortoise); it sets the conformer input size.
    n_mels: int = 80
    f_min: float = 0.0
    # None means sample_rate / 2.
    f_max: float | None = 8000.0
    # Floor before the log so silence gives log(1e-5) = -11.5 rather than -inf.
    log_floor: float = 1e-5
    # Width of the w2v_bert features: w2v-BERT 2.0's hidden size. Only tests' tiny encoders differ.
    w2v_bert_dim: int = W2V_BERT_DIM

    def __post_init__(self) -> None:
        problems = []
        if self.sample_rate <= 0:
            problems.append(f"sample_rate must be positive, got {self.sample_rate}")
        if self.hop_length <= 0 or self.win_length <= 0 or self.n_fft <= 0:
            problems.append("n_fft, win_length and hop_length must be positive")
        if self.win_length > self.n_fft:
            problems.append(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.n_mels < 3:
            problems.append(f"n_mels must be at least 3 (the conformer subsamples it by 2), got {self.n_mels}")
        if self.w2v_bert_dim < 3:
            problems.append(f"w2v_bert_dim must be at least 3 (the conformer subsamples it by 2), got {self.w2v_bert_dim}")
        if self.f_max is not None and not (self.f_min < self.f_max <= self.sample_rate / 2):
            problems.append(f"need f_min < f_max <= sample_rate/2, got f_min={self.f_min}, f_max={self.f_max}")
        if problems:
            raise ValueError("features: " + "; ".join(problems))

    @property
    def dim(self) -> int:
        """Feature size per frame: the conformer input size."""
        return self.n_mels if self.kind == "log_mel" else self.w2v_bert_dim


def feature_frames(num_samples: int | torch.Tensor, cfg: FeatureConfig) -> int | torch.Tensor:
    """Number of frames :func:`log_mel` gives for ``num_samples`` samples (centred STFT)."""
    return num_samples // cfg.hop_length + 1


def log_mel(wave: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Log-mel spectrogram of ``wave``.

    Args:
        wave: float waveform ``[..., T]`` at ``cfg.sample_rate``.
        cfg: the feature settings; ``cfg.kind`` must be ``"log_mel"``.

    Returns:
        ``[..., frames, n_mels]`` float32 with ``frames = T // hop_length + 1``.

    Raises:
        ValueError: for ``kind="w2v_bert"`` (those come from :class:`W2VBert`) or an empty wave.
    """
    if cfg.kind != "log_mel":
        raise ValueError(
            f"features.kind is {cfg.kind!r}: those features are w2v-BERT 2.0 hidden states, computed by "
            "indextts.audio.w2v_bert.W2VBert (or read back from extraction's PromptFeatureStore), not by log_mel"
        )
    if wave.shape[-1] == 0:
        raise ValueError("log_mel: the waveform is empty")
    import torchaudio.functional as AF

    lead = wave.shape[:-1]
    x = wave.reshape(-1, wave.shape[-1]).float()
    window = torch.hann_window(cfg.win_length, device=x.device)
    # reflect padding needs more samples than n_fft // 2; very short clips fall back to zeros.
    pad_mode = "reflect" if x.shape[-1] > cfg.n_fft // 2 else "constant"
    spec = torch.stft(
        x,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    ).abs()  # (N, n_fft//2+1, frames), magnitude
    fb = AF.melscale_fbanks(
        n_freqs=cfg.n_fft // 2 + 1,
        f_min=cfg.f_min,
        f_max=cfg.f_max if cfg.f_max is not None else cfg.sample_rate / 2,
        n_mels=cfg.n_mels,
        sample_rate=cfg.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    ).to(x.device)  # (n_freqs, n_mels)
    mel = torch.matmul(spec.transpose(1, 2), fb)  # (N, frames, n_mels)
    out = torch.log(torch.clamp(mel, min=cfg.log_floor))
    return out.reshape(*lead, out.shape[-2], out.shape[-1])


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform at ``sample_rate``.

    Args:
        path: any format libsndfile reads (wav, flac, ogg ...).
        sample_rate: the rate to return; the file is resampled when it differs.

    Returns:
        ``[T]`` float32 tensor; channels are averaged.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: libsndfile cannot read it, or it holds no samples.
    """
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise ValueError(f"{path}: cannot read audio ({e}); convert it to wav or flac") from e
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples")
    wave = torch.from_numpy(data).mean(dim=1)  # (T,) mono downmix
    if sr != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(wave, orig_freq=sr, new_freq=sample_rate)
    return wave.contiguous()


# --------------------------------------------------------------------------------------------
# Stored prompt features: written by extract_codes, read by the data loader


@dataclass(frozen=True)
class PromptFeaturesConfig:
    """The ``features`` config section: whether code extraction also stores each utterance's
    w2v-BERT features, the trainer's conditioning input when the model's features are
    ``w2v_bert``.

    Stored: ``max_ref_seconds x 50 x dim x 2`` bytes per utterance at most (fp16; 614 kB for 6 s
    of 1024-dim features, 369 MB per hour of audio kept whole). Computed at every step instead,
    w2v-BERT 2.0 would run on every prompt of every step, on the training GPU (the cost model is
    in BENCHMARKS.md, section semantic codes).
    """

    # true: extract_codes writes codes/features/shard-*.parquet beside the codes (the w2v-BERT
    # pass is the codes' own, so this costs disk, not compute). Needs codec.kind semantic.
    store: bool = False
    # The stored crop per utterance (a window placed by a hash of utt_id). The data loader crops
    # again to its own max_ref_seconds, so store at least what training reads.
    max_ref_seconds: float = 6.0

    def __post_init__(self) -> None:
        if self.max_ref_seconds <= 0:
            from indextts.config import ConfigError

            raise ConfigError(f"features.max_ref_seconds must be positive, got {self.max_ref_seconds}")

    @property
    def max_frames(self) -> int:
        """Stored frames per utterance at most (50 per second)."""
        return max(1, int(round(self.max_ref_seconds * W2V_BERT_SAMPLE_RATE / W2V_BERT_HOP)))


# Parquet schema-metadata key of a features file (JSON: dim, frame_rate, source identities).
FEATURES_META_KEY = b"indextts.features"
# Bytes of fp16 features per row group: Parquet decodes a row group's column whole, so small
# groups make one utterance cheap to read at random (about 1 MiB: one or two 6 s prompts).
_GROUP_BYTES = 1 << 20


def crop_window(utt_id: str, n_frames: int, max_frames: int) -> tuple[int, int]:
    """``(start, length)`` of the stored crop: the whole utterance when it fits, else a window of
    ``max_frames`` placed by a stable hash of ``utt_id`` (the same in every run and process)."""
    if n_frames <= max_frames:
        return 0, n_frames
    from indextts.hashing import stable_hash

    return stable_hash(utt_id) % (n_frames - max_frames + 1), max_frames


def features_table(utt_ids: Sequence[str], feats: Sequence[np.ndarray], starts: Sequence[int], totals: Sequence[int],
                   meta: dict) -> "pa.Table":
    """A features file's table: ``utt_id``, ``start_frame``, ``n_frames``, ``total_frames`` and
    ``features`` (``list<float16>``, the ``[n_frames, dim]`` crop flattened), with ``meta`` as JSON
    under :data:`FEATURES_META_KEY`."""
    import json

    import pyarrow as pa

    dim = int(meta["dim"])
    frames = np.fromiter((f.shape[0] for f in feats), dtype=np.int32, count=len(feats))
    offsets = np.zeros(len(feats) + 1, dtype=np.int64)
    np.cumsum(frames.astype(np.int64) * dim, out=offsets[1:])
    values = np.concatenate([np.asarray(f, dtype=np.float16).ravel() for f in feats]) if feats else np.zeros(0, np.float16)
    schema = pa.schema(
        [("utt_id", pa.string()), ("start_frame", pa.int32()), ("n_frames", pa.int32()), ("total_frames", pa.int32()),
         ("features", pa.large_list(pa.float16()))],
        metadata={FEATURES_META_KEY: json.dumps(meta, sort_keys=True).encode()},
    )
    cols = [
        pa.array(list(utt_ids), pa.string()),
        pa.array(np.asarray(starts, dtype=np.int32)),
        pa.array(frames),
        pa.array(np.asarray(totals, dtype=np.int32)),
        pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float16())),
    ]
    return pa.table(cols, schema=schema)


def write_features(table: "pa.Table", path: str | Path) -> Path:
    """Write a features table atomically, in row groups of about 1 MiB, so :class:`PromptFeatureStore`
    decodes little more than the one utterance it reads. The pipeline's one Parquet writer
    (:func:`indextts.files.write_parquet`): same table, same bytes."""
    import json

    from indextts.files import write_parquet

    meta = table.schema.metadata or {}
    dim = int(json.loads(meta[FEATURES_META_KEY])["dim"])
    longest = int(max(table.column("n_frames").to_pylist(), default=1) or 1)
    rows = max(1, _GROUP_BYTES // (longest * dim * 2))
    # No dictionaries: utt_ids are unique and fp16 features never repeat.
    return write_parquet(table, path, row_group_size=rows, dictionary=False)


def features_path_for(shard: str | Path) -> Path:
    """Where extraction puts a codes shard's features: ``codes/features/<shard file name>``."""
    shard = Path(shard)
    return shard.parent / "features" / shard.name


class PromptFeatureStore:
    """Random access to stored prompt features by ``utt_id``.

    ``PromptFeatureStore(paths).get(utt_id)`` -> ``np.ndarray [frames, dim]`` float32 (fp16 on
    disk). Opening reads only the ``utt_id`` columns and the row-group layout; :meth:`get` decodes
    one row group (a few utterances). Picklable: DataLoader workers reopen the files themselves.

    The index holds no Python object per utterance (a corpus has millions, and forked workers
    would copy every page whose reference counts they touch): the XXH64 of each ``utt_id``
    (:func:`indextts.hashing.xxh64`), sorted, with its file, row group and row as int32 arrays,
    24 bytes an utterance. A lookup checks the id stored at the row it finds, so a hash collision
    is a miss, never another utterance's features; a repeated ``utt_id`` resolves to its last row.

    Raises:
        FileNotFoundError: a features file is missing (the message says how to make it).
        ValueError: not a features file, or files of different feature widths.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        import json

        import pyarrow.parquet as pq

        from indextts.hashing import xxh64

        self.paths = [Path(p) for p in paths]
        dims, self.meta = set(), {}
        stored: list[float | None] = []
        keys, where = [], []
        for k, p in enumerate(self.paths):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: no stored prompt features. The model's features are w2v_bert, which the data loader "
                    "reads from extraction: set features.store: true (with codec.kind: semantic) and rerun extract_codes"
                )
            pf = pq.ParquetFile(p)
            raw = (pf.schema_arrow.metadata or {}).get(FEATURES_META_KEY)
            if raw is None:
                raise ValueError(f"{p}: not a prompt features file (no {FEATURES_META_KEY.decode()} schema metadata)")
            self.meta = json.loads(raw)
            dims.add(int(self.meta["dim"]))
            stored.append(self.meta.get("max_ref_seconds"))
            keys.append(xxh64(pf.read(columns=["utt_id"]).column("utt_id").combine_chunks()))
            sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], dtype=np.int64)
            group = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
            row = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            where.append(np.stack([np.full(len(group), k, np.int32), group, row.astype(np.int32)], axis=1))
        key = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        loc = np.concatenate(where) if where else np.zeros((0, 3), np.int32)
        order = np.argsort(key, kind="stable")  # a repeated id keeps file order: its last row wins
        key, loc = key[order], loc[order]
        last = np.r_[key[1:] != key[:-1], True] if len(key) else np.zeros(0, bool)
        self._keys, self._loc = key[last], np.ascontiguousarray(loc[last])
        if len(dims) > 1:
            raise ValueError(f"prompt features of different widths {sorted(dims)} in {[str(p) for p in self.paths]}")
        self.dim = dims.pop() if dims else 0
        # The longest crop every file stores (features.max_ref_seconds at extraction); None if unknown.
        self.max_ref_seconds: float | None = None if not stored or None in stored else float(min(stored))
        self._files: dict[int, Any] = {}
        self._cache: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self._ids: dict[int, tuple[int, Any]] = {}  # per file: (row group, its utt_id column)

    @classmethod
    def beside(cls, shards: Sequence[str | Path]) -> "PromptFeatureStore":
        """The store of the features extraction wrote beside these codes shards."""
        return cls([features_path_for(s) for s in shards])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_cache"], state["_ids"] = {}, {}, {}  # handles and decoded groups stay per process
        return state

    def crop(self, utt_id: str, max_frames: int, rng: np.random.Generator) -> torch.Tensor:
        """The stored features of ``utt_id`` as a ``[frames, dim]`` float32 tensor, cut to a window
        of at most ``max_frames`` placed by ``rng`` when longer (the data loader's prompt crop)."""
        feats = self.get(utt_id)
        if feats.shape[0] > max_frames:
            start = int(rng.integers(feats.shape[0] - max_frames + 1))
            feats = feats[start : start + max_frames]
        return torch.from_numpy(np.ascontiguousarray(feats))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, utt_id: str) -> bool:
        return self._locate(utt_id) is not None

    def _file(self, k: int):
        import pyarrow.parquet as pq

        pf = self._files.get(k)
        if pf is None:
            pf = self._files[k] = pq.ParquetFile(self.paths[k], memory_map=True)
        return pf

    def _locate(self, utt_id: str) -> tuple[int, int, int] | None:
        """(file, row group, row) of ``utt_id``, checked against the id stored there."""
        import pyarrow as pa

        from indextts.hashing import xxh64

        h = xxh64(pa.array([utt_id], pa.string()))[0]
        i = int(np.searchsorted(self._keys, h))
        if i == len(self._keys) or self._keys[i] != h:
            return None
        k, g, j = (int(v) for v in self._loc[i])
        ids = self._ids.get(k)
        if ids is None or ids[0] != g:
            ids = self._ids[k] = (g, self._file(k).read_row_group(g, columns=["utt_id"]).column("utt_id"))
        return (k, g, j) if ids[1][j].as_py() == utt_id else None

    def get(self, utt_id: str) -> np.ndarray:
        """The stored features of ``utt_id``: ``[frames, dim]`` float32.

        Raises:
            KeyError: ``utt_id`` has no stored features (naming it and the files).
        """
        found = self._locate(utt_id)
        if found is None:
            raise KeyError(f"{utt_id!r} has no stored prompt features in {len(self.paths)} files "
                           f"(first {self.paths[0] if self.paths else None}); rerun extract_codes")
        k, g, j = found
        cached = self._cache.get(k)
        if cached is None or cached[0] != g:
            col = self._file(k).read_row_group(g, columns=["features"]).column("features")
            arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            cached = (g, arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False))
            self._cache[k] = cached
        _, off, values = cached
        return values[off[j] : off[j + 1]].reshape(-1, self.dim).astype(np.float32)
