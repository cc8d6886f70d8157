"""Codec codes: the clean manifest encoded into sharded, reproducible Parquet files.

Two codecs (``codec.kind``): DAC (:mod:`indextts.audio.dac`, every residual codebook) or IndexTTS2's
own MaskGCT semantic codec over w2v-BERT 2.0 features (:mod:`indextts.audio.semantic_codec`, one
codebook of 8192 at 50 frames/s). ``extract_codes`` encodes one shard (the utterances whose
stable hash of ``utt_id`` falls in it; every split goes in, training filters by split) and writes::

    codes/shard-00003-of-00064.parquet           one row per utterance, sorted by utt_id
    codes/rejects/shard-00003-of-00064.parquet   utt_id, audio_path, reason, detail
    codes/features/shard-00003-of-00064.parquet  semantic + features.store: the w2v-BERT prompt
                                                 features (indextts.features.PromptFeatureStore)

Shard columns: ``utt_id, speaker, text, language, emotion, audio_path, duration, n_frames`` and
``codes``: ``list<int16>`` holding the ``[n_q, n_frames]`` array flattened row-major. The codec
(kind, ``n_q``, sample rate, hop, frame rate, codebook size, weights sha256, and for the semantic
codec the w2v-BERT folder/stats sha256, layer and dtype) is in the Parquet schema metadata under
``indextts.codes``. ``index_codes`` gathers the shards into ``codes/index.json`` and checks every
row's frame count against its duration. ``read_shard_codes`` reads a shard back without copying
the codes.

Inside a shard: DataLoader workers read audio with soundfile, downmix to mono and resample to the
codec rate (for the semantic codec they also compute w2v-BERT's fbank inputs); the main process
encodes batches of similar length (see ``CodesConfig`` for the per-device policy) with
:func:`indextts.audio.dac.encode_batch`, whose codes equal DAC encoding each utterance alone, or with
:class:`indextts.audio.semantic_codec.SemanticEncoder`, whose codec masks padding the same way.
Audio that vanished, became unreadable, holds NaN/inf after cleaning or is too short for the
codec is rejected with a reason and the shard still completes. Output is written atomically and is
a pure function of (manifest, codec weights, config, device kind): a killed job reruns to the same
bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from indextts.config import ConfigError, get_section, load_config_arg, merge_runtime
from indextts.files import sha256_file, write_json, write_parquet
from indextts.hashing import stable_hash

if TYPE_CHECKING:
    import torch

    from indextts.features import PromptFeaturesConfig

# Parquet schema-metadata key holding the codec description (JSON).
META_KEY = b"indextts.codes"
FORMAT_VERSION = 1
# too_short: under one frame of the semantic codec (w2v-BERT's 25 ms window); DAC takes any length.
REJECT_REASONS = ("missing_file", "unreadable", "non_finite", "too_short")
META_COLUMNS = ("utt_id", "speaker", "text", "language", "emotion", "audio_path", "duration", "n_frames")
# Columns of clean.parquet this stage reads.
_MANIFEST_COLUMNS = ["utt_id", "speaker", "text", "language", "emotion", "audio_path", "duration"]
# Code values per shard above which list<int16>'s int32 offsets would overflow.
_MAX_VALUES = 2**31 - 1


@dataclass(frozen=True)
class CodecConfig:
    """The ``codec`` config section: which codes the model learns, from which weights, and where.

    ``kind="dac"``: DAC's residual codebooks (:mod:`indextts.audio.dac`). ``kind="semantic"``: IndexTTS2's own
    codes, the MaskGCT semantic codec (:mod:`indextts.audio.semantic_codec`) over normalised w2v-BERT 2.0
    features (:class:`indextts.audio.w2v_bert.W2VBert`), which needs the three ``w2v_bert*`` paths.
    """

    # The codec's weights. Required: the codes, and every model trained on them, belong to one
    # codec. dac: a DAC weights file in DAC's own format (constructor kwargs + state dict).
    # semantic: semantic_codec/model.safetensors of the amphion/MaskGCT release.
    weights: str
    # dac: self-contained, decoded by DAC. semantic: the released IndexTTS2's codes (drop-in export).
    kind: Literal["dac", "semantic"] = "dac"
    # "auto" takes CUDA when torch sees a GPU, else the CPU. Codes are computed in fp32 with
    # TF32 off on either, because a code is an argmax and must not move with the device's math.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Keep only the first N residual codebooks (RVQ is sequential, so these equal the first N of
    # the full codes); null keeps every codebook the weights have.
    n_quantizers: int | None = None
    # semantic: a local facebook/w2v-bert-2.0 folder (config.json, preprocessor_config.json,
    # model.safetensors); read with local_files_only, never downloaded.
    w2v_bert: str | None = None
    # semantic: the hidden state the codec was trained on; IndexTTS2 uses hidden_states[17].
    w2v_bert_layer: int = 17
    # semantic: wav2vec2bert_stats.pt of the released IndexTTS2 folder (mean and var of that layer).
    w2v_bert_stats: str | None = None
    # semantic: bf16 runs w2v-BERT about twice as fast on a GPU, but its features (and so a few
    # codes) then differ from the fp32 ones IndexTTS2 itself computes.
    w2v_bert_dtype: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self) -> None:
        if self.kind == "semantic":
            missing = [f"codec.{k}" for k in ("w2v_bert", "w2v_bert_stats") if not getattr(self, k)]
            if missing:
                raise ConfigError(
                    f"codec.kind is 'semantic', which needs {' and '.join(missing)}: the w2v-BERT 2.0 folder "
                    "and the released wav2vec2bert_stats.pt (see config/korean.yaml)"
                )
            if self.n_quantizers not in (None, 1):
                raise ConfigError(f"codec.n_quantizers: the semantic codec has one code stream, got {self.n_quantizers}")
        if self.w2v_bert_layer < 1:
            raise ConfigError(f"codec.w2v_bert_layer must be at least 1, got {self.w2v_bert_layer}")


def resolve_device(name: str) -> torch.device:
    """``codec.device``: ``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("codec.device: 'cuda' was asked for but torch sees no GPU; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"codec.device: expected one of 'auto', 'cpu', 'cuda', got {name!r}")
    return torch.device(name)


@dataclass(frozen=True)
class CodesConfig:
    """The ``codes`` config section: sharding, batching policy and checks of the extraction."""

    # Shards of the manifest, one Snakemake job each. Fixed, because membership is
    # hash(utt_id) % n_shards: changing it re-shards (and re-encodes) everything.
    n_shards: int = 64
    # Audio seconds per forward pass (padded: longest utterance x batch size) on a CPU. 0 means
    # one utterance at a time: on a CPU, batching made full-size DAC slower, not faster.
    batch_seconds_cpu: float = 0.0
    # The same on a GPU, where batching is what reaches hundreds of times real time. 200 s of
    # 16 kHz audio keeps the full-size encoder's activations to a few GiB.
    batch_seconds_cuda: float = 200.0
    # Most utterances in one batch, whatever their length.
    max_batch_size: int = 64
    # DataLoader worker processes that read, downmix and resample audio while a GPU encodes.
    num_workers: int = 4
    # The same on a CPU, where each worker takes one of the job's threads from the encoder. 0:
    # read in the encoding process. On a CPU the encoder needs every core (reading is ~1% of
    # full-size DAC's cost), and a worker that preempts one of torch's intra-op threads stalls
    # them all at the barrier after each op: on 2 cores workers made extraction up to 2x slower.
    num_workers_cpu: int = 0
    # index_codes fails when a row's n_frames differs from duration x frame_rate by more than
    # this many frames. DAC's right padding and resampling's rounding add up to just under 1; the
    # semantic codec's fbank drops the last partial window, up to 1.75 frames short.
    frame_tolerance: float = 2.0

    def batch_seconds_for(self, device_type: str) -> float:
        """The batching policy of a device ("cuda" or "cpu")."""
        return self.batch_seconds_cuda if device_type == "cuda" else self.batch_seconds_cpu

    def workers_for(self, device_type: str) -> int:
        """DataLoader workers on a device ("cuda" or "cpu")."""
        return self.num_workers if device_type == "cuda" else self.num_workers_cpu


# --------------------------------------------------------------------------------------------
# Sharding and batching


def shard_of(utt_id: str, n_shards: int) -> int:
    """The shard an utterance belongs to: ``stable_hash(utt_id) % n_shards``."""
    return stable_hash(utt_id) % n_shards


def shard_file_name(shard: int, n_shards: int) -> str:
    """``shard-00003-of-00064.parquet``."""
    return f"shard-{shard:05d}-of-{n_shards:05d}.parquet"


def plan_batches(durations: Sequence[float], max_seconds: float, max_batch_size: int) -> list[list[int]]:
    """Group utterances (given in the order to encode them, shortest first) into batches of
    similar length.

    A batch grows while ``longest x count`` stays within ``max_seconds`` and ``count`` within
    ``max_batch_size``; ``max_seconds <= 0`` gives one utterance per batch. Returns lists of
    positions into ``durations``. The plan depends only on the durations, never on timing, so a
    rerun encodes the same batches.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0.0
    for i, d in enumerate(durations):
        if current:
            grown = max(longest, d) * (len(current) + 1)
            if max_seconds <= 0 or grown > max_seconds or len(current) >= max_batch_size:
                batches.append(current)
                current, longest = [], 0.0
        current.append(i)
        longest = max(longest, d)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------
# Audio


class AudioFault(Exception):
    """An utterance's audio cannot be encoded; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def read_audio(path: str, sample_rate: int, resamplers: dict | None = None) -> np.ndarray:
    """Read an audio file as mono float32 at ``sample_rate``.

    soundfile reads it as float32 (all channels), the channels are averaged, and torchaudio's
    sinc resampler brings it to ``sample_rate`` (one resampler per source rate, cached in
    ``resamplers`` when given).

    Raises:
        AudioFault: ``missing_file`` (no such file), ``unreadable`` (soundfile cannot decode it,
            or it has no samples), ``non_finite`` (NaN or inf samples).
    """
    if not os.path.isfile(path):
        raise AudioFault("missing_file", f"{path} does not exist (it was there when the manifest was cleaned)")
    import soundfile as sf

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors, permission errors, truncated headers
        raise AudioFault("unreadable", f"{type(e).__name__}: {e}") from None
    if data.shape[0] == 0:
        raise AudioFault("unreadable", f"{path} holds no samples")
    finite = np.isfinite(data)
    if not finite.all():
        raise AudioFault("non_finite", f"{int(data.size - finite.sum())} NaN/inf samples of {data.size}")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        import torch
        import torchaudio

        key = int(sr)
        rs = resamplers.get(key) if resamplers is not None else None
        if rs is None:
            rs = torchaudio.transforms.Resample(int(sr), int(sample_rate))
            if resamplers is not None:
                resamplers[key] = rs
        with torch.inference_mode():
            mono = rs(torch.from_numpy(np.ascontiguousarray(mono))).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


class _ShardAudio:
    """A map-style dataset whose items are whole planned batches: read, mono, resampled and
    zero-padded into one ``(B, T)`` float32 array in the worker, so the main process only encodes.

    With ``prepare`` (the semantic codec's fbank front end), the item's ``audio`` is what
    ``prepare(waves)`` returns instead, and audio shorter than ``min_samples`` is rejected."""

    def __init__(self, paths: Sequence[str], batches: list[list[int]], sample_rate: int, prepare=None,
                 min_samples: int = 1):
        self.paths = list(paths)
        self.batches = batches
        self.sample_rate = sample_rate
        self.resamplers: dict = {}
        self.prepare = prepare
        self.min_samples = min_samples

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, Any]:
        rows, waves, rejects = [], [], []
        for r in self.batches[k]:
            try:
                wave = read_audio(self.paths[r], self.sample_rate, self.resamplers)
                if len(wave) < self.min_samples:
                    raise AudioFault("too_short", f"{len(wave)} samples at {self.sample_rate} Hz, the codec needs {self.min_samples}")
                waves.append(wave)
                rows.append(r)
            except AudioFault as e:
                rejects.append((r, e.reason, e.detail))
        audio = None
        if waves and self.prepare is not None:
            audio = self.prepare(waves)
        elif waves:
            # numpy, not torch: a tensor would travel to the main process through a shared-memory
            # file per item, which costs more than pickling these few hundred KiB.
            audio = np.zeros((len(waves), max(len(w) for w in waves)), dtype=np.float32)
            for i, w in enumerate(waves):
                audio[i, : len(w)] = w
        return {"batch": k, "rows": rows, "lengths": [len(w) for w in waves], "audio": audio, "rejects": rejects}


def _as_is(item: dict[str, Any]) -> dict[str, Any]:
    return item


def _worker_init(_: int) -> None:
    import torch

    # Workers resample with torch: one thread each, the cores belong to the encoder.
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Extraction


def _read_manifest_shard(manifest: Path, shard: int, n_shards: int) -> pa.Table:
    try:
        table = pq.read_table(manifest, columns=_MANIFEST_COLUMNS)
    except Exception as e:
        raise ConfigError(f"{manifest}: cannot read the clean manifest's columns {_MANIFEST_COLUMNS}: {e}") from e
    ids = table.column("utt_id").to_pylist()
    mask = np.fromiter((shard_of(u, n_shards) == shard for u in ids), dtype=bool, count=len(ids))
    table = table.filter(pa.array(mask))
    return table.sort_by("utt_id")


def _codec_metadata(info, shard: int, n_shards: int) -> dict:
    return {
        "format": FORMAT_VERSION,
        "kind": info.kind,
        **dict(info.extra),
        "n_q": info.n_q,
        "sample_rate": info.sample_rate,
        "hop_length": info.hop_length,
        "frame_rate": info.frame_rate,
        "codebook_size": info.codebook_size,
        "weights_sha256": info.weights_sha256,
        "shard": shard,
        "n_shards": n_shards,
    }


def shard_schema(codec_meta: dict) -> pa.Schema:
    """The Arrow schema of a codes shard, with ``codec_meta`` as JSON under :data:`META_KEY`."""
    return pa.schema(
        [
            ("utt_id", pa.string()),
            ("speaker", pa.string()),
            ("text", pa.string()),
            ("language", pa.string()),
            ("emotion", pa.string()),
            ("audio_path", pa.string()),
            ("duration", pa.float64()),
            ("n_frames", pa.int32()),
            ("codes", pa.list_(pa.int16())),
        ],
        metadata={META_KEY: json.dumps(codec_meta, sort_keys=True).encode()},
    )


def shard_table(meta: pa.Table, codes: Sequence[np.ndarray], codec_meta: dict) -> pa.Table:
    """Assemble a shard: ``meta`` rows (the manifest's columns, already in utt_id order) beside
    their ``[n_q, T]`` int16 codes, flattened into one list column without a per-row copy.

    Raises:
        OverflowError: more code values than list<int16>'s int32 offsets can address.
    """
    sizes = np.fromiter((c.size for c in codes), dtype=np.int64, count=len(codes))
    if sizes.sum() > _MAX_VALUES:
        raise OverflowError(f"{int(sizes.sum())} code values exceed what one list<int16> column holds")
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    values = np.concatenate([np.asarray(c, dtype=np.int16).ravel() for c in codes]) if codes else np.zeros(0, np.int16)
    columns = {name: meta.column(name) for name in META_COLUMNS if name != "n_frames"}
    columns["n_frames"] = pa.array(np.fromiter((c.shape[1] for c in codes), dtype=np.int32, count=len(codes)))
    columns["codes"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int16()))
    schema = shard_schema(codec_meta)
    return pa.table([columns[f.name] for f in schema], names=schema.names).cast(schema)


REJECTS_SCHEMA = pa.schema(
    [("utt_id", pa.string()), ("audio_path", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


def _write_parquet(table: pa.Table, path: Path) -> None:
    # The shared writer (fixed settings, no timestamps: the same table gives the same bytes).
    # Dictionary encoding stays on for codes: codebooks of <= 1024 entries pack to 10-bit
    # indices, which made shards smaller and faster to read than plain int16.
    write_parquet(table, path, row_group_size=1 << 20)


def _remove_stale_temporaries(path: Path) -> None:
    # A job killed while renaming its output leaves its temporary file (atomic_path's
    # ``.<name>.*.tmp``); Snakemake runs one job per output, so any such file here is stale.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def extract_codes(
    codec_cfg: CodecConfig,
    codes_cfg: CodesConfig,
    manifest: str | Path,
    shard: int,
    output: str | Path,
    rejects: str | Path,
    *,
    threads: int | None = None,
    progress: bool = True,
    on_batch=None,
    features_cfg: PromptFeaturesConfig | None = None,
    features_output: str | Path | None = None,
) -> tuple[Path, Path]:
    """Encode one shard of the clean manifest into codes: DAC's, or with ``codec.kind: semantic``
    the MaskGCT semantic codec's over w2v-BERT 2.0 (one codebook of 8192, 50 frames/s).

    Args:
        codec_cfg: the ``codec`` section (:class:`indextts.codes.CodecConfig`).
        codes_cfg: the ``codes`` section.
        manifest: ``clean.parquet`` (needs utt_id, speaker, text, language, emotion,
            audio_path, duration).
        shard: which shard, ``0 <= shard < codes_cfg.n_shards``.
        output: the shard Parquet file to write.
        rejects: the rejects Parquet file to write (possibly empty).
        threads: the CPU threads the job may use (the rule's ``threads``): on a CPU, torch gets
            those the workers do not take (None: torch's default).
        progress: show a progress bar (audio seconds per wall second) on stderr.
        on_batch: called as ``on_batch(batch_number)`` after each encoded batch (for tests).
        features_cfg: the ``features`` section; with ``store`` (semantic codec only), each kept
            utterance's normalised w2v-BERT features (fp16, a crop of at most
            ``max_ref_seconds``) go to ``features_output`` (default ``codes/features/<shard>``).
        features_output: the features Parquet file to write (see
            :class:`indextts.features.PromptFeatureStore`).

    Returns:
        ``(output, rejects)`` as Paths.

    Raises:
        ConfigError: bad shard index, device or manifest, or stored features asked of DAC.
        indextts.audio.dac.CodecLoadError, indextts.audio.semantic_codec.SemanticCodecLoadError,
            indextts.audio.w2v_bert.W2VBertLoadError: the weights cannot be loaded.
    """
    import torch

    from indextts.audio.dac import encode_padded, load_codec
    from indextts.codes import resolve_device
    from indextts.features import crop_window, features_path_for, features_table, write_features

    n = codes_cfg.n_shards
    if not 0 <= shard < n:
        raise ConfigError(f"shard {shard} is outside 0..{n - 1} (codes.n_shards = {n})")
    semantic = codec_cfg.kind == "semantic"
    store = features_cfg is not None and features_cfg.store
    if store and not semantic:
        raise ConfigError(
            "features.store is true but codec.kind is 'dac': stored prompt features are the semantic codec's "
            "w2v-BERT features; set codec.kind: semantic, or features.store: false (DAC models read log-mel)"
        )
    output, rejects, manifest = Path(output), Path(rejects), Path(manifest)
    features_output = (Path(features_output) if features_output else features_path_for(output)) if store else None
    for out in (output, rejects, features_output):
        if out is not None:
            _remove_stale_temporaries(out)
    device = resolve_device(codec_cfg.device)
    workers = codes_cfg.workers_for(device.type)
    if threads:
        # On a CPU the workers' cores come out of the job's threads; on a GPU the encoder
        # hardly uses the CPU and the workers run beside it.
        torch.set_num_threads(max(1, int(threads) - (workers if device.type == "cpu" else 0)))
    if semantic:
        from indextts.audio.w2v_bert import W2V_BERT_MIN_SAMPLES
        from indextts.audio.semantic_codec import load_semantic_encoder

        model = load_semantic_encoder(codec_cfg, device)
        info = model.info
        prepare, min_samples = model.prepare, W2V_BERT_MIN_SAMPLES
    else:
        model, info = load_codec(codec_cfg.weights, device, codec_cfg.n_quantizers)
        prepare, min_samples = None, 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # an algorithm picked by timing may differ per run
        torch.backends.cudnn.deterministic = True

    rows = _read_manifest_shard(manifest, shard, n)
    durations = np.asarray(rows.column("duration").to_numpy(zero_copy_only=False), dtype=np.float64)
    utt_ids = rows.column("utt_id").to_pylist()
    paths = rows.column("audio_path").to_pylist()
    # Shortest first (ties by utt_id) so batches hold similar lengths and little padding.
    order = sorted(range(len(utt_ids)), key=lambda r: (durations[r], utt_ids[r]))
    plan = plan_batches([durations[r] for r in order], codes_cfg.batch_seconds_for(device.type), codes_cfg.max_batch_size)
    batches = [[order[p] for p in b] for b in plan]

    dataset = _ShardAudio(paths, batches, info.sample_rate, prepare, min_samples)
    workers = min(workers, len(batches))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_is,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )

    from tqdm import tqdm

    codes: dict[int, np.ndarray] = {}
    prompts: dict[int, tuple[np.ndarray, int, int]] = {}  # row -> (fp16 crop, start frame, total frames)
    faults: dict[int, tuple[str, str]] = {}
    total = float(durations.sum())
    start = time.perf_counter()
    # Counted in integer milliseconds of audio (shown as seconds), so the bar ends exactly at
    # its total: the rate it shows is audio seconds per wall second.
    bar = tqdm(
        total=int(round(total * 1000)),
        unit=" audio-s",
        unit_scale=0.001,
        desc=f"shard {shard:05d}/{n:05d} ({device.type})",
        disable=not progress,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} audio-s [{elapsed}<{remaining}, {rate_fmt}]",
    )
    done_seconds, done_ms = 0.0, 0
    for item in loader:
        if item["audio"] is not None and semantic:
            batch_codes, feats = model.encode(item["audio"])  # (B, 1, F), (B, F, dim) on the device
            host = batch_codes.to(torch.int16).cpu().numpy()
            if store:
                feats = feats.to(torch.float16).cpu().numpy()
            for i, (r, frames) in enumerate(zip(item["rows"], item["audio"]["frames"].tolist())):
                codes[r] = host[i, :, :frames]
                if store:
                    first, length = crop_window(utt_ids[r], frames, features_cfg.max_frames)
                    prompts[r] = (feats[i, first : first + length], first, frames)
        elif item["audio"] is not None:
            audio = torch.from_numpy(item["audio"])[:, None, :]  # (B, 1, T)
            if device.type == "cuda":
                audio = audio.pin_memory().to(device, non_blocking=True)
            # One device-to-host copy per batch; each row keeps a view of its valid frames.
            host = encode_padded(model, audio, item["lengths"], codec_cfg.n_quantizers).to(torch.int16).cpu().numpy()
            for i, (r, length) in enumerate(zip(item["rows"], item["lengths"])):
                codes[r] = host[i, :, : info.n_frames(length)]
        for r, reason, detail in item["rejects"]:
            faults[r] = (reason, detail)
        done_seconds += float(durations[batches[item["batch"]]].sum())
        bar.update(int(round(done_seconds * 1000)) - done_ms)
        done_ms = int(round(done_seconds * 1000))
        if on_batch is not None:
            on_batch(item["batch"])
    bar.close()
    wall = time.perf_counter() - start

    kept = sorted(codes)  # row positions in utt_id order
    meta = rows.take(pa.array(np.asarray(kept, dtype=np.int64)))
    try:
        table = shard_table(meta, [codes[r] for r in kept], _codec_metadata(info, shard, n))
    except OverflowError as e:
        raise ConfigError(f"shard {shard}: {e}; raise codes.n_shards") from None
    bad = sorted(faults)
    reject_table = pa.table(
        {
            "utt_id": [utt_ids[r] for r in bad],
            "audio_path": [paths[r] for r in bad],
            "reason": [faults[r][0] for r in bad],
            "detail": [faults[r][1] for r in bad],
        },
        schema=REJECTS_SCHEMA,
    )
    _write_parquet(reject_table, rejects)
    if store:
        feature_meta = {"format": FORMAT_VERSION, "dim": int(dict(info.extra)["feature_dim"]), "frame_rate": info.frame_rate,
                        "max_ref_seconds": features_cfg.max_ref_seconds, "shard": shard, "n_shards": n,
                        **{k: v for k, v in info.extra if k != "feature_dim"}}
        write_features(
            features_table([utt_ids[r] for r in kept], [prompts[r][0] for r in kept], [prompts[r][1] for r in kept],
                           [prompts[r][2] for r in kept], feature_meta),
            features_output,
        )
    _write_parquet(table, output)

    seconds = float(durations[kept].sum()) if kept else 0.0
    print(
        f"shard {shard:05d}-of-{n:05d}: {len(kept)} utterances ({seconds:.1f} s of audio) encoded, "
        f"{len(bad)} rejected, in {wall:.1f} s = {seconds / max(wall, 1e-9):.1f}x real time on {device} "
        f"({len(batches)} batches, {workers} workers, {torch.get_num_threads()} torch threads)",
        file=sys.stderr,
    )
    for r in bad:
        print(f"  rejected {utt_ids[r]}: {faults[r][0]}: {faults[r][1]}", file=sys.stderr)
    return output, rejects


# --------------------------------------------------------------------------------------------
# Index


def _check_features(path: Path, shard: Path, ids: list[str], frames: np.ndarray, root: Path, problems: list[str]) -> dict:
    """The index entry of a shard's prompt features file; disagreements go to ``problems``."""
    from indextts.features import FEATURES_META_KEY

    if not path.is_file():
        problems.append(f"{path}: the prompt features of {shard.name} are missing; rerun extract_codes")
        return {"path": os.path.relpath(path, root)}
    pf = pq.ParquetFile(path)
    if FEATURES_META_KEY not in (pf.schema_arrow.metadata or {}):
        problems.append(f"{path}: not a prompt features file")
        return {"path": os.path.relpath(path, root)}
    t = pf.read(columns=["utt_id", "n_frames", "total_frames"])
    f_ids = t.column("utt_id").to_pylist()
    if f_ids != ids:
        problems.append(f"{path}: holds {len(f_ids)} utterances, {shard.name} holds {len(ids)} (or in another order); rerun extract_codes")
    elif (t.column("total_frames").to_numpy() != frames).any():
        bad = int(np.flatnonzero(t.column("total_frames").to_numpy() != frames)[0])
        problems.append(f"{path}: {ids[bad]} has features of {t.column('total_frames')[bad]} frames, codes of {frames[bad]}")
    return {
        "path": os.path.relpath(path, root),
        "rows": t.num_rows,
        "frames": int(np.asarray(t.column("n_frames").to_numpy(), dtype=np.int64).sum()),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _shard_meta(path: Path) -> dict:
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not a codes shard (no {META_KEY.decode()} schema metadata)")
    return json.loads(raw)


class CodesIndexError(ValueError):
    """The shards fail a check; the message names the shard and rows."""


def index_codes(
    codes_cfg: CodesConfig,
    manifest: str | Path,
    shards: Sequence[str | Path],
    rejects: Sequence[str | Path],
    output: str | Path,
    features: Sequence[str | Path] | None = None,
) -> Path:
    """Gather code shards into ``index.json`` after checking them.

    Checks: every shard was made by the same codec and for ``codes_cfg.n_shards`` shards; each
    manifest utterance is in exactly one shard or one rejects file; every row's ``n_frames`` is
    within ``codes_cfg.frame_tolerance`` frames of ``duration x frame_rate``; with ``features``,
    each shard's prompt features file holds exactly its rows, with the same frame counts.

    Index layout: ``codec`` (kind, n_q, sample_rate, hop_length, frame_rate, codebook_size,
    weights_sha256, and for the semantic codec the w2v-BERT identity), ``shards`` (per shard: path
    relative to the index's folder, rows, rejected, frames, seconds, hours, sha256, rejects path,
    and ``features`` {path, rows, frames, bytes, sha256} when stored), ``totals`` (rows, rejected,
    frames, seconds, hours, rejects_by_reason, shard_bytes and, when stored, feature_bytes), ``rejects`` (utt_id,
    shard, reason, detail), ``frame_check``.

    Returns:
        ``output`` as a Path.

    Raises:
        CodesIndexError: a failed check, naming the shard or the utt_ids (up to 20).
    """
    output = Path(output)
    shards = [Path(s) for s in shards]
    rejects = [Path(r) for r in rejects]
    if len(shards) != len(rejects):
        raise ValueError("index_codes: give one rejects file per shard")
    feature_files = [Path(f) for f in features] if features else [None] * len(shards)
    if len(feature_files) != len(shards):
        raise ValueError("index_codes: give one features file per shard (or none)")
    n = codes_cfg.n_shards
    tol = codes_cfg.frame_tolerance
    codec: dict | None = None
    seen: dict[str, str] = {}
    entries, all_rejects, problems, frame_failures = [], [], [], []
    max_diff = 0.0
    by_reason = {r: 0 for r in REJECT_REASONS}
    shard_numbers = set()
    for path, rej_path, feat_path in zip(shards, rejects, feature_files):
        meta = _shard_meta(path)
        # Everything but the shard's place identifies the codec (kind, sizes, weight hashes).
        here = {k: v for k, v in meta.items() if k not in ("format", "shard", "n_shards")}
        here.setdefault("kind", "dac")
        if codec is None:
            codec = here
        elif here != codec:
            problems.append(f"{path}: made by another codec ({here}) than the first shard ({codec}); rerun extract_codes")
        if meta.get("n_shards") != n:
            problems.append(f"{path}: made for {meta.get('n_shards')} shards, config says codes.n_shards = {n}")
        shard_numbers.add(meta.get("shard"))
        t = pq.read_table(path, columns=["utt_id", "duration", "n_frames"])
        ids = t.column("utt_id").to_pylist()
        dur = t.column("duration").to_numpy(zero_copy_only=False).astype(np.float64)
        frames = t.column("n_frames").to_numpy(zero_copy_only=False).astype(np.int64)
        diff = frames - dur * here["frame_rate"]
        if len(diff):
            max_diff = max(max_diff, float(np.abs(diff).max()))
        for i in np.flatnonzero(np.abs(diff) > tol):
            frame_failures.append(
                f"{ids[i]} ({path.name}): {frames[i]} frames, expected {dur[i] * here['frame_rate']:.1f} "
                f"from duration {dur[i]:.3f} s"
            )
        rt = pq.read_table(rej_path)
        for rec in rt.to_pylist():
            all_rejects.append({"utt_id": rec["utt_id"], "shard": path.name, "reason": rec["reason"], "detail": rec["detail"]})
            by_reason[rec["reason"]] = by_reason.get(rec["reason"], 0) + 1
        for u in ids + rt.column("utt_id").to_pylist():
            if u in seen:
                problems.append(f"{u} is in both {seen[u]} and {path.name}")
            seen[u] = path.name
        entries.append(
            {
                "path": os.path.relpath(path, output.parent),
                "rows": len(ids),
                "rejected": rt.num_rows,
                "frames": int(frames.sum()),
                "seconds": round(float(dur.sum()), 3),
                "hours": round(float(dur.sum()) / 3600.0, 6),
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "rejects_path": os.path.relpath(rej_path, output.parent),
            }
        )
        if feat_path is not None:
            entries[-1]["features"] = _check_features(feat_path, path, ids, frames, output.parent, problems)
    if shard_numbers != set(range(n)) or len(shards) != n:
        problems.append(f"expected shards 0..{n - 1} once each, got {len(shards)} files for shards {sorted(shard_numbers)}")
    wanted = pq.read_table(manifest, columns=["utt_id"]).column("utt_id").to_pylist()
    missing = sorted(set(wanted) - set(seen))
    extra = sorted(set(seen) - set(wanted))
    if missing or extra:
        problems.append(
            f"shards do not match {manifest}: {len(missing)} utterances missing (e.g. {missing[:5]}), "
            f"{len(extra)} not in it (e.g. {extra[:5]}); rerun extract_codes"
        )
    if frame_failures:
        problems.append(
            f"{len(frame_failures)} rows differ from duration x frame rate by more than codes.frame_tolerance = "
            f"{tol} frames (the audio changed after cleaning?): " + "; ".join(frame_failures[:20])
        )
    if problems:
        raise CodesIndexError("index_codes failed:\n  " + "\n  ".join(problems))
    assert codec is not None
    rows = sum(e["rows"] for e in entries)
    index = {
        "format": FORMAT_VERSION,
        "codec": codec,
        "n_shards": n,
        "shards": entries,
        "totals": {
            "rows": rows,
            "rejected": len(all_rejects),
            "frames": sum(e["frames"] for e in entries),
            "seconds": round(sum(e["seconds"] for e in entries), 3),
            "hours": round(sum(e["seconds"] for e in entries) / 3600.0, 6),
            "rejects_by_reason": by_reason,
            "shard_bytes": sum(e["bytes"] for e in entries),
            **({"feature_bytes": sum(e["features"]["bytes"] for e in entries)} if features else {}),
        },
        "rejects": sorted(all_rejects, key=lambda r: r["utt_id"]),
        "frame_check": {"tolerance_frames": tol, "rows_checked": rows, "max_abs_diff_frames": round(max_diff, 4), "failed": 0},
    }
    write_json(output, index)
    print(
        f"indexed {len(entries)} shards: {rows} utterances, {index['totals']['hours']:.3f} h, "
        f"{index['totals']['frames']} frames, {len(all_rejects)} rejected {by_reason}; "
        f"frames within {max_diff:.2f} of duration x {codec['frame_rate']:g}/s",
        file=sys.stderr,
    )
    hours = max(index["totals"]["hours"], 1e-12)
    disk = f"shards {index['totals']['shard_bytes'] / hours / 1e6:.1f} MB per hour of audio"
    if features:
        disk += f", prompt features {index['totals']['feature_bytes'] / hours / 1e6:.1f} MB per hour"
    print(f"disk: {disk}", file=sys.stderr)
    for r in all_rejects:
        print(f"  rejected {r['utt_id']} ({r['shard']}): {r['reason']}: {r['detail']}", file=sys.stderr)
    return output


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, eq=False)
class ShardCodes:
    """One shard in memory. ``codes(i)`` is a zero-copy ``int16 [n_q, n_frames_i]`` view into the
    shard's single codes buffer (read-only: it is Arrow's memory)."""

    n_q: int
    frame_rate: float
    meta: pd.DataFrame  # every column but codes, in shard order (sorted by utt_id)
    codec: dict  # the shard's codec metadata (sample_rate, hop_length, weights_sha256 ...)
    path: Path
    _values: np.ndarray = field(repr=False)  # int16, every row's codes back to back
    _offsets: np.ndarray = field(repr=False)  # int32, row i is _values[_offsets[i]:_offsets[i+1]]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def codes(self, i: int) -> np.ndarray:
        n = len(self._offsets) - 1
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.path}: row {i} is outside 0..{n - 1}")
        return self._values[self._offsets[i] : self._offsets[i + 1]].reshape(self.n_q, -1)


def read_shard_codes(path: str | Path) -> ShardCodes:
    """Read a codes shard: the codes column once, as one int16 buffer plus offsets.

    Raises:
        ValueError: not a codes shard, or a row whose codes length is not n_q x n_frames.
    """
    path = Path(path)
    table = pq.read_table(path)
    meta_json = (table.schema.metadata or {}).get(META_KEY)
    if meta_json is None:
        raise ValueError(f"{path}: not a codes shard (no {META_KEY.decode()} schema metadata)")
    codec = json.loads(meta_json)
    col = table.column("codes")
    # One row group is one chunk; a file rewritten by another tool may hold several, which
    # costs one copy here to make the buffer contiguous.
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if len(arr) == 0:
        values, offsets = np.zeros(0, np.int16), np.zeros(1, np.int32)
    else:
        if arr.null_count:
            raise ValueError(f"{path}: {arr.null_count} rows have null codes")
        offsets = arr.offsets.to_numpy()
        values = arr.values.to_numpy(zero_copy_only=True)
    meta = table.drop_columns(["codes"]).to_pandas()
    n_q = int(codec["n_q"])
    lengths = np.diff(offsets)
    frames = meta["n_frames"].to_numpy()
    bad = np.flatnonzero(lengths != n_q * frames)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{path}: row {meta['utt_id'].iloc[i]} holds {lengths[i]} codes, expected n_q x n_frames = {n_q} x {frames[i]}"
        )
    return ShardCodes(n_q, float(codec["frame_rate"]), meta, codec, path, values, offsets)


def shard_paths(index_json: str | Path) -> list[Path]:
    """The shard files an ``index.json`` lists, resolved against the index's folder."""
    index_json = Path(index_json)
    index = json.loads(index_json.read_text(encoding="utf-8"))
    return [index_json.parent / s["path"] for s in index["shards"]]


def _index_codec_field(codes_index: str | Path, key: str) -> int:
    path = Path(codes_index)
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["codec"][key])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read codec.{key} from the codes index ({e}); rerun index_codes") from e


def codebook_size(codes_index: str | Path) -> int:
    """The codec's codebook size recorded in the codes index (what the codes were made with).

    Raises:
        ValueError: the index is unreadable or records no codebook size.
    """
    return _index_codec_field(codes_index, "codebook_size")


def codes_n_q(codes_index: str | Path) -> int:
    """How many codebooks every shard of the codes index holds (the index's ``codec.n_q``).

    Raises:
        ValueError: the index is unreadable or records no ``n_q``.
    """
    return _index_codec_field(codes_index, "n_q")


# --------------------------------------------------------------------------------------------
# CLI


def _load_config(arg: str, runtime: str | None) -> dict[str, Any]:
    """``--config`` with ``--runtime`` laid over it: the knobs that cannot change the codes
    (worker counts, batch sizes; batched encoding equals one-at-a-time) stay out of the rule's
    params, so changing one re-encodes nothing."""
    raw = load_config_arg(arg)
    return merge_runtime(raw, load_config_arg(runtime)) if runtime else raw


def _sections(arg: str, runtime: str | None = None):

    raw = _load_config(arg, runtime)
    return get_section(CodecConfig, raw, "codec"), get_section(CodesConfig, raw, "codes")


def cli_extract_codes(argv: list[str]) -> int:
    """``indextts extract-codes``: encode one shard."""
    p = argparse.ArgumentParser(prog="indextts extract-codes", description="Encode one shard of clean.parquet into codes (DAC or semantic).")
    p.add_argument("--config", required=True, help="inline JSON with the codec, codes (and features) sections, or a YAML file")
    p.add_argument("--manifest", required=True, help="clean.parquet")
    p.add_argument("--runtime", default=None, help="inline JSON of runtime knobs laid over --config (what the rules pass)")
    p.add_argument("--shard", required=True, type=int, help="shard index, 0 <= shard < codes.n_shards")
    p.add_argument("--output", required=True, help="the shard Parquet file to write")
    p.add_argument("--rejects", required=True, help="the rejects Parquet file to write")
    p.add_argument("--features", default=None, help="the prompt features Parquet file to write (with features.store)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the job (the rule's threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    # Before torch starts its OpenMP pool: waiting threads sleep instead of spinning. When another
    # process shares the cores, spinning threads burn the slice the awaited thread needs, and
    # every op's barrier stalls; measured 10x -> 41x real time for the demo codec on a busy
    # 2-core machine. No effect if torch is already loaded.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    codec_cfg, codes_cfg = _sections(args.config, args.runtime)
    from indextts.audio.dac import CodecLoadError
    from indextts.audio.w2v_bert import W2VBertLoadError
    from indextts.features import PromptFeaturesConfig
    from indextts.audio.semantic_codec import SemanticCodecLoadError

    features_cfg = get_section(PromptFeaturesConfig, load_config_arg(args.config), "features")
    try:
        extract_codes(
            codec_cfg,
            codes_cfg,
            args.manifest,
            args.shard,
            args.output,
            args.rejects,
            threads=args.threads,
            progress=not args.no_progress,
            features_cfg=features_cfg,
            features_output=args.features,
        )
    except (CodecLoadError, SemanticCodecLoadError, W2VBertLoadError) as e:
        print(f"indextts extract-codes: {e}", file=sys.stderr)
        return 1
    return 0


def cli_index_codes(argv: list[str]) -> int:
    """``indextts index-codes``: check the shards and write index.json."""
    p = argparse.ArgumentParser(prog="indextts index-codes", description="Index and check the code shards.")
    p.add_argument("--config", required=True, help="inline JSON with the codes section, or a YAML file")
    p.add_argument("--manifest", required=True, help="clean.parquet")
    p.add_argument("--runtime", default=None, help="inline JSON of runtime knobs laid over --config (what the rules pass)")
    p.add_argument("--shards", required=True, nargs="+", help="every shard file, in shard order")
    p.add_argument("--rejects", required=True, nargs="+", help="every rejects file, in the same order")
    p.add_argument("--features", nargs="*", default=None, help="every prompt features file, in the same order (features.store)")
    p.add_argument("--output", required=True, help="index.json to write")
    args = p.parse_args(argv)
    codes_cfg = get_section(CodesConfig, _load_config(args.config, args.runtime), "codes")
    try:
        index_codes(codes_cfg, args.manifest, args.shards, args.rejects, args.output, features=args.features)
    except CodesIndexError as e:
        print(str(e), file=sys.stderr)
        return 1
    return 0
