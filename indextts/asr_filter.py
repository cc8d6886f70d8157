"""The ASR consistency filter: drop clean rows whose audio does not say their transcript, or whose
speech is cut at the clip's edge.

It runs between cleaning and extraction when ``asr_filter.enabled`` is true. ``clean_manifest``
then writes its table to ``clean/pre_asr.parquet``, and the filter writes ``clean/clean.parquet``
(the rows it keeps, in their order, with the schema and split cleaning gave them), so no later
stage knows it ran. Two steps:

``asr-transcribe`` (:func:`transcribe_shard`, one job per shard, a GPU rule)
    Each shard of ``pre_asr.parquet`` (by the hash of ``utt_id``, as extraction shards:
    :func:`shard_of`) is read at 16 kHz and transcribed by the evaluation's ASR loader
    (:class:`indextts.evaluation.asr.AsrModel`: a local Whisper or Wav2Vec2ForCTC/MMS folder),
    greedy, with its decoding keys. Its speech edges are measured with silero-vad (below). The
    transcripts go to ``asr_filter/transcripts/shard-*.parquet``: ``utt_id``, ``hypothesis``,
    ``seconds``, ``leading_silence``, ``trailing_silence``, ``speech_seconds`` and the ASR folder's
    sha256 (:func:`model_hash`). They depend only on the audio, the ASR folder and its decoding
    keys, never on a threshold. They are also kept in ``asr_filter/cache/`` (not a rule output),
    keyed by (utterance, audio file size and mtime) under the model's :func:`cache_identity`, so
    a shard that reruns because the corpus was cleaned again transcribes only its new clips.

``asr-filter`` (:func:`filter_transcripts`, one job)
    Joins the shards, scores every hypothesis against its transcript and decides. Changing a
    threshold reruns this step alone, in seconds: nothing is transcribed again.

Decisions, in order (a row gets the first that applies):

* ``unreadable``: the audio could not be decoded at transcription time.
* ``asr_mismatch``: CER above ``asr_filter.max_cer``. CER is
  :func:`indextts.evaluation.asr.error_rates`: hypothesis and manifest transcript both through the
  pipeline's normaliser (``text`` section), punctuation dropped, spaces removed, jiwer's character
  edits over the reference's characters. A reference with no character left (punctuation only)
  scores the hypothesis' character count (0 when both are empty).
* ``cut_speech``: less than ``asr_filter.min_edge_silence`` seconds of silence before the first or
  after the last detected speech, i.e. speech running into the clip's start or end (a word cut by
  the segmenter). A clip in which no speech is detected is left to the CER.

Speech edges. silero-vad (its model ships inside the wheel; it needs only torch) gives a speech
probability per 32 ms window; its own hysteresis (``threshold``, exit at threshold - 0.15, speech
runs of at least 250 ms, pauses of at least 100 ms, no padding) turns them into speech segments.
Trailing silence is the clip's end less the last segment's end. silero places the end of speech
to a window but its start late (its recurrent state needs a few windows of speech), so leading
silence is measured the same way on the clip reversed in time. Both are multiples of 32 ms, so
``min_edge_silence: 0.03`` means "speech in the first or last window". It runs on the CPU (its
TorchScript model keeps its state on the CPU), in fixed batches of clips of similar length: a
clip's measures depend on its shard only.

Every input row ends in exactly one of clean.parquet and asr_rejects.parquet; ``asr_summary.json``
says so, with counts per reason, the rejected share, the CER histogram and the edge silences
(drawn by the data report).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import unicodedata
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from indextts.config import ConfigError, get_section, load_config_arg
from indextts.evaluation.asr import AsrConfig
from indextts.files import write_json, write_parquet
from indextts.hashing import stable_hash

# The fixed vocabulary of the filter's reject reasons, in the order they are decided.
REASONS = ("unreadable", "asr_mismatch", "cut_speech")
FORMAT_VERSION = 1
META_KEY = b"indextts.asr_filter"
VAD_RATE = 16000  # silero-vad's rate (and every Whisper's and wav2vec2's)
VAD_WINDOW = 512  # samples per silero window at 16 kHz: 32 ms, the edge measures' resolution
VAD_BATCH = 32  # clips per VAD pass; fixed, so a clip's measures depend on its shard alone
CHUNK_CLIPS = 64  # clips read and transcribed together (bounds the audio held in memory)
CER_BIN = 0.05  # width of the summary's CER histogram bins over [0, 1]

TRANSCRIPT_SCHEMA = pa.schema(
    [
        ("utt_id", pa.string()),
        ("audio_path", pa.string()),
        ("seconds", pa.float64()),  # the clip's length as read
        ("hypothesis", pa.string()),  # null when the audio could not be read
        ("error", pa.string()),  # why it could not be read, else null
        ("leading_silence", pa.float64()),  # s before the first speech (the whole clip if none)
        ("trailing_silence", pa.float64()),  # s after the last speech
        ("speech_seconds", pa.float64()),  # s of detected speech
        ("model_hash", pa.string()),  # sha256 of the ASR folder's files
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        ("utt_id", pa.string()),
        ("audio_path", pa.string()),
        ("speaker", pa.string()),
        ("raw_text", pa.string()),
        ("text", pa.string()),
        ("duration", pa.float64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("hypothesis", pa.string()),
        ("cer", pa.float64()),
        ("leading_silence", pa.float64()),
        ("trailing_silence", pa.float64()),
        ("speech_seconds", pa.float64()),
    ]
)


@dataclass(frozen=True)
class AsrFilterConfig:
    """The ``asr_filter`` config section."""

    enabled: bool = False  # run the filter between cleaning and extraction
    # The ASR model; with path null the whole eval.asr section is used (one model for both).
    asr: AsrConfig = field(default_factory=AsrConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the ASR runs (silero-vad runs on the CPU)
    vad_threshold: float = 0.5  # silero's speech probability threshold (its default)
    # CER above this: asr_mismatch. Whisper large-v3 reads clean Korean/Japanese at a few percent;
    # 0.2 catches transcripts of another clip or a missing sentence, not an ASR slip.
    max_cer: float = 0.2
    # Seconds of silence a clip needs before its first and after its last speech, else cut_speech;
    # 0.03 flags speech in the first or last 32 ms window (0 turns the check off).
    min_edge_silence: float = 0.03

    def __post_init__(self) -> None:
        p = []
        if not 0.0 < self.vad_threshold < 1.0:
            p.append(f"asr_filter.vad_threshold must be in (0, 1), got {self.vad_threshold}")
        if self.max_cer < 0:
            p.append(f"asr_filter.max_cer must be at least 0, got {self.max_cer}")
        if self.min_edge_silence < 0:
            p.append(f"asr_filter.min_edge_silence must be at least 0, got {self.min_edge_silence}")
        if p:
            raise ConfigError("invalid config:\n  " + "\n  ".join(p))


class AsrFilterError(ValueError):
    """The filter cannot run or its result cannot be used; the message says what to do."""


def resolve_asr(cfg: AsrFilterConfig, eval_asr: AsrConfig | None) -> tuple[AsrConfig, str]:
    """The ASR section the filter transcribes with, and its config key (for messages).

    Returns:
        ``(asr_filter.asr, "asr_filter.asr")`` when its path is set, else ``(eval.asr, "eval.asr")``.

    Raises:
        ConfigError: neither path is set.
    """
    if cfg.asr.path:
        return cfg.asr, "asr_filter.asr"
    if eval_asr is not None and eval_asr.path:
        return eval_asr, "eval.asr"
    raise ConfigError("asr_filter.enabled needs an ASR model: set asr_filter.asr.path (or eval.asr.path, which "
                      "the filter then uses) to a local Whisper or Wav2Vec2ForCTC folder")


def shard_of(utt_id: str, n_shards: int) -> int:
    """The shard of an utterance: the same as extraction's (:func:`indextts.codes.shard_of`)."""
    return stable_hash(utt_id) % n_shards


def model_files(folder: str | Path) -> list[Path]:
    """The files that make up a model folder: its top-level regular files, hidden ones excepted
    (the workflow lists the same files as the transcription's inputs)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def model_hash(folder: str | Path) -> str:
    """sha256 over the names and bytes of :func:`model_files` (3 GB of Whisper large-v3: ~2 s)."""
    h = hashlib.sha256()
    for f in model_files(folder):
        h.update(f.name.encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def read_clip(path: str, sample_rate: int) -> np.ndarray:
    """A file's channels averaged, at ``sample_rate`` (scipy's polyphase resampler), float32.

    Raises:
        ValueError: a missing or undecodable file, no samples, NaN/inf samples; the message names it.
    """
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors, a missing file, permissions
        raise ValueError(f"{path}: cannot read audio ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: the audio holds NaN or inf samples")
    x = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        g = math.gcd(int(sr), int(sample_rate))
        x = resample_poly(x, sample_rate // g, int(sr) // g)
    return np.ascontiguousarray(x, dtype=np.float32)


# --- speech edges ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edges:
    """Where a clip's speech starts and ends, in seconds from each end."""

    leading: float  # silence before the first speech (the whole clip when there is none)
    trailing: float  # silence after the last speech
    speech: float  # seconds of speech detected


class SpeechEdges:
    """silero-vad's speech segments at a clip's two ends (module docstring)."""

    def __init__(self, threshold: float = 0.5) -> None:
        import torch

        threads = torch.get_num_threads()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            from silero_vad import get_speech_timestamps_from_probs, load_silero_vad

            self.model = load_silero_vad(onnx=False)
        torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread
        self.threshold = threshold
        self._from_probs = get_speech_timestamps_from_probs

    def measure(self, clips: Sequence[np.ndarray]) -> list[Edges]:
        """Edges of each 16 kHz mono clip, in order. silero finds where speech *ends* to within a
        window, but where it starts only once its recurrent state has built up (up to a few hundred
        ms late when a clip starts inside a word), so each edge is measured where speech ends: the
        trailing one on the clip, the leading one on the clip reversed in time."""
        forward = self._segments(clips)
        backward = self._segments([np.ascontiguousarray(c[::-1]) for c in clips])
        out = []
        for c, fw, bw in zip(clips, forward, backward):
            n = len(c)
            if not fw and not bw:
                out.append(Edges(n / VAD_RATE, n / VAD_RATE, 0.0))
                continue
            leading = (n - bw[-1]["end"]) if bw else fw[0]["start"]
            trailing = (n - fw[-1]["end"]) if fw else bw[0]["start"]
            speech = sum(s["end"] - s["start"] for s in (fw or bw))
            out.append(Edges(leading / VAD_RATE, trailing / VAD_RATE, speech / VAD_RATE))
        return out

    def _segments(self, clips: Sequence[np.ndarray]) -> list[list[dict]]:
        """silero's speech segments (sample offsets) of each clip, in batches of similar length."""
        import torch

        out: list[list[dict]] = [[] for _ in clips]
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        for start in range(0, len(order), VAD_BATCH):
            batch = order[start : start + VAD_BATCH]
            width = max(max(len(clips[i]) for i in batch), 1)
            audio = np.zeros((len(batch), width), dtype=np.float32)
            for row, i in enumerate(batch):
                audio[row, : len(clips[i])] = clips[i]
            with torch.inference_mode():
                probs = self.model.audio_forward(torch.from_numpy(audio), VAD_RATE).numpy()  # (B, windows)
            for row, i in enumerate(batch):
                n = len(clips[i])
                out[i] = self._from_probs(probs[row, : -(-n // VAD_WINDOW)].tolist(), sampling_rate=VAD_RATE,
                                          threshold=self.threshold, speech_pad_ms=0, audio_length_samples=n)
        return out


# --- step 1: transcription ------------------------------------------------------------------------


def _device(name: str) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise AsrFilterError("asr_filter.device is 'cuda' but torch sees no CUDA device; set it to auto or cpu")
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _shard_rows(manifest: Path, shard: int, n_shards: int) -> pa.Table:
    try:
        table = pq.read_table(manifest, columns=["utt_id", "audio_path", "duration"])
    except Exception as e:
        raise AsrFilterError(f"{manifest}: cannot read utt_id, audio_path, duration ({e}); rerun clean_manifest") from e
    ids = table.column("utt_id").to_pylist()
    mask = np.fromiter((shard_of(u, n_shards) == shard for u in ids), dtype=bool, count=len(ids))
    return table.filter(pa.array(mask)).sort_by("utt_id")


def cache_identity(digest: str, asr_cfg: AsrConfig, cfg: AsrFilterConfig, device: str) -> str:
    """What a transcript depends on besides its audio: the ASR folder's bytes, its decoding keys
    (not its path or batch size), the VAD threshold and the device; 16 hex digits."""
    key = {"format": FORMAT_VERSION, "model_hash": digest, "vad_threshold": cfg.vad_threshold, "device": device,
           "asr": {k: v for k, v in asdict(asr_cfg).items() if k not in ("path", "batch_size")}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _stamp(path: str) -> tuple[int, int] | None:
    """(size, mtime in ns) of an audio file: a changed or replaced file is transcribed again."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


CACHE_SCHEMA = pa.schema([*TRANSCRIPT_SCHEMA, ("file_size", pa.int64()), ("file_mtime_ns", pa.int64())])


def _read_cache(folder: Path, ids: Sequence[str], paths: Sequence[str], stamps: Sequence[tuple[int, int] | None],
                log) -> dict[int, dict]:
    """Rows of this shard found in the cache folder (any shard file of any earlier sharding), by
    row index, where the utterance's audio path, size and mtime are unchanged."""
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f).select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA))
        except Exception as e:  # a damaged cache file costs a transcription, never a wrong row
            log(f"WARNING {f}: unreadable transcript cache ({type(e).__name__}: {e}); ignored")
    if not tables:
        return {}
    t = pa.concat_tables(tables)
    t = t.filter(pc.is_in(t.column("utt_id"), value_set=pa.array(list(ids), type=pa.string())))
    found = {r["utt_id"]: r for r in t.to_pylist()}
    out = {}
    for i, (u, p, st) in enumerate(zip(ids, paths, stamps)):
        r = found.get(u)
        if r is not None and st is not None and r["audio_path"] == p and (r["file_size"], r["file_mtime_ns"]) == st:
            out[i] = r
    return out


def _asr_name(cfg: AsrConfig) -> str:
    """:attr:`indextts.evaluation.asr.AsrModel.name` without loading the model."""
    return f"{Path(cfg.path).resolve().name} ({cfg.kind}{', ' + cfg.language if cfg.language else ''})"  # type: ignore[arg-type]


def transcribe_shard(cfg: AsrFilterConfig, asr_cfg: AsrConfig, manifest: str | Path, shard: int, n_shards: int,
                     output: str | Path, *, asr_key: str = "asr_filter.asr", batch_size: int | None = None,
                     threads: int | None = None, cache: str | Path | None = None, log=print) -> Path:
    """Transcribe one shard of the clean table and measure its speech edges.

    Args:
        cfg: the ``asr_filter`` section (its vad_threshold and device).
        asr_cfg: the ASR section to use (:func:`resolve_asr`).
        manifest: ``clean/pre_asr.parquet`` (utt_id, audio_path, duration).
        shard: which shard, ``0 <= shard < n_shards``.
        n_shards: ``codes.n_shards``: extraction's sharding.
        output: the transcripts Parquet file (:data:`TRANSCRIPT_SCHEMA`).
        asr_key: ``asr_cfg``'s config key, for error messages.
        batch_size: clips per ASR forward pass, over ``asr_cfg.batch_size`` (speed only: a clip's
            transcript does not depend on its batch).
        threads: torch's CPU threads.
        cache: a folder of earlier transcripts, kept across reruns (not a rule output): an
            utterance whose audio file (path, size, mtime) and :func:`cache_identity` are unchanged
            is taken from it instead of transcribed again (a re-cleaned corpus costs only its new
            clips), and this shard's transcripts are added to it.
        log: where progress lines go.

    Returns:
        ``output``.

    Raises:
        AsrFilterError: a bad shard, an unreadable table, a CUDA device that is not there.
        indextts.evaluation.asr.EvalModelError: the ASR folder cannot be loaded.
    """
    import torch

    from indextts.evaluation.asr import AsrModel

    if not 0 <= shard < n_shards:
        raise AsrFilterError(f"shard {shard} is outside 0..{n_shards - 1} (codes.n_shards = {n_shards})")
    if threads:
        torch.set_num_threads(int(threads))
    device = _device(cfg.device)
    rows = _shard_rows(Path(manifest), shard, n_shards)
    if batch_size:
        asr_cfg = replace(asr_cfg, batch_size=int(batch_size))
    t0 = time.perf_counter()
    digest = model_hash(asr_cfg.path)  # type: ignore[arg-type]
    ids = rows.column("utt_id").to_pylist()
    paths = rows.column("audio_path").to_pylist()
    durations = rows.column("duration").to_numpy(zero_copy_only=False)
    n = len(ids)
    stamps = [_stamp(p) for p in paths]
    cache_dir = Path(cache) / cache_identity(digest, asr_cfg, cfg, device) if cache else None
    cached = _read_cache(cache_dir, ids, paths, stamps, log) if cache_dir else {}

    hyp: list[str | None] = [None] * n
    err: list[str | None] = [None] * n
    seconds = np.zeros(n)
    edges: list[Edges | None] = [None] * n
    for r, c in cached.items():
        hyp[r], seconds[r] = c["hypothesis"], c["seconds"]
        edges[r] = Edges(c["leading_silence"], c["trailing_silence"], c["speech_seconds"])
    # Shortest first (ties by utt_id): ASR batches hold similar lengths, little padding.
    todo = sorted((r for r in range(n) if r not in cached), key=lambda r: (durations[r], ids[r]))
    asr = vad = None
    if todo:
        asr = AsrModel(asr_cfg, device=device, key=asr_key)
        vad = SpeechEdges(cfg.vad_threshold)
        log(f"ASR: {asr.name} on {device} (sha256 {digest[:12]}), silero-vad on the CPU; loaded in "
            f"{time.perf_counter() - t0:.1f} s")
    load_s = time.perf_counter() - t0
    if cached:
        log(f"{len(cached)} of {n} clips from the cache {cache_dir} (same audio file, ASR model and settings)")

    asr_s = vad_s = 0.0
    t_start = time.perf_counter()
    for c, start in enumerate(range(0, len(todo), CHUNK_CLIPS)):
        chunk, clips = [], []
        for r in todo[start : start + CHUNK_CLIPS]:
            try:
                clip = read_clip(paths[r], VAD_RATE)
            except ValueError as e:
                err[r] = str(e)
                continue
            chunk.append(r)
            clips.append(clip)
            seconds[r] = len(clip) / VAD_RATE
        t = time.perf_counter()
        texts = asr.transcribe(clips if asr.sample_rate == VAD_RATE else [read_clip(paths[r], asr.sample_rate) for r in chunk])
        asr_s += time.perf_counter() - t
        t = time.perf_counter()
        measured = vad.measure(clips)
        vad_s += time.perf_counter() - t
        for r, text, e in zip(chunk, texts, measured):
            hyp[r], edges[r] = text, e
        if c % 20 == 19:
            log(f"  {min(start + CHUNK_CLIPS, len(todo))}/{len(todo)} clips")
    wall = time.perf_counter() - t_start

    nan = float("nan")
    table = pa.table(
        {
            "utt_id": ids,
            "audio_path": paths,
            "seconds": seconds,
            "hypothesis": hyp,
            "error": err,
            "leading_silence": [e.leading if e else nan for e in edges],
            "trailing_silence": [e.trailing if e else nan for e in edges],
            "speech_seconds": [e.speech if e else nan for e in edges],
            "model_hash": [digest] * n,
        },
        schema=TRANSCRIPT_SCHEMA,
    )
    audio_s = float(seconds[todo].sum()) if todo else 0.0
    meta = {
        "format": FORMAT_VERSION, "shard": shard, "n_shards": n_shards, "model": asr.name if asr else _asr_name(asr_cfg),
        "model_hash": digest, "asr": {k: v for k, v in asdict(asr_cfg).items() if k != "batch_size"}, "device": device,
        "vad": {"model": "silero-vad", "threshold": cfg.vad_threshold, "window_seconds": VAD_WINDOW / VAD_RATE},
        "audio_seconds": audio_s, "wall_seconds": wall, "asr_seconds": asr_s, "vad_seconds": vad_s,
        "load_seconds": load_s, "cached": len(cached),
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    write_parquet(table, output, dictionary=["model_hash"])
    if cache_dir is not None:
        ok = [r for r in range(n) if err[r] is None and stamps[r] is not None]  # a read error may pass
        keep = table.take(pa.array(ok, type=pa.int64()))
        keep = keep.append_column("file_size", pa.array([stamps[r][0] for r in ok], pa.int64()))
        keep = keep.append_column("file_mtime_ns", pa.array([stamps[r][1] for r in ok], pa.int64()))
        write_parquet(keep.replace_schema_metadata(None), cache_dir / f"shard-{shard:05d}-of-{n_shards:05d}.parquet",
                      dictionary=["model_hash"])
    failed = sum(e is not None for e in err)
    log(f"shard {shard:05d}-of-{n_shards:05d}: {len(todo) - failed} clips ({audio_s:.1f} s of audio) transcribed in "
        f"{wall:.1f} s = {audio_s / max(wall, 1e-9):.1f}x real time on {device} (ASR {asr_s:.1f} s, VAD {vad_s:.1f} s, "
        f"{torch.get_num_threads()} torch threads); {len(cached)} from the cache; {failed} unreadable")
    for r in range(n):
        if err[r]:
            log(f"  unreadable {ids[r]}: {err[r]}")
    return Path(output)


# --- step 2: decisions ----------------------------------------------------------------------------


def _strip_punctuation(text: str) -> str:
    return "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)


def character_error_rate(hyp: str, ref: str) -> float:
    """CER of an already normalised hypothesis against an already normalised reference, as
    :func:`indextts.evaluation.asr.error_rates` scores it; a reference with no character left
    after punctuation scores the hypothesis' character count (0 when both are empty)."""
    from indextts.evaluation.asr import error_rates

    try:
        return float(error_rates(hyp, ref, lambda s: s, words=False)["cer"])
    except ValueError:  # nothing to score against
        return float(len("".join(_strip_punctuation(hyp).split())))


def cer_column(hypotheses: Sequence[str | None], references: Sequence[str], text_cfg) -> np.ndarray:
    """CER of each hypothesis against its transcript, both normalised by the ``text`` section
    (NaN where the hypothesis is None)."""
    from indextts.text import normalize_array

    hyp = normalize_array(pa.array([h or "" for h in hypotheses], type=pa.string()), text_cfg).to_pylist()
    ref = normalize_array(pa.array(list(references), type=pa.string()), text_cfg).to_pylist()
    return np.array([character_error_rate(h, r) if raw is not None else math.nan
                     for h, r, raw in zip(hyp, ref, hypotheses)], dtype=np.float64)


def decide(cer: np.ndarray, leading: np.ndarray, trailing: np.ndarray, speech: np.ndarray, readable: np.ndarray,
           cfg: AsrFilterConfig) -> np.ndarray:
    """Each row's reason index into :data:`REASONS`, or -1 for a kept row (the first reason that
    applies: unreadable, then CER above ``max_cer``, then an edge silence under ``min_edge_silence``
    in a clip with speech)."""
    code = np.full(len(cer), -1, dtype=np.int64)
    cut = (speech > 0) & ((leading < cfg.min_edge_silence) | (trailing < cfg.min_edge_silence))
    for i, mask in enumerate((~readable, readable & (cer > cfg.max_cer), readable & cut)):
        code[(code < 0) & mask] = i
    return code


def _read_transcripts(paths: Sequence[Path]) -> tuple[pa.Table, list[dict]]:
    tables, metas = [], []
    for p in paths:
        try:
            t = pq.read_table(p)
        except Exception as e:
            raise AsrFilterError(f"{p}: not a transcripts file ({e}); rerun asr_transcribe") from e
        raw = (t.schema.metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != FORMAT_VERSION:
            raise AsrFilterError(f"{p}: transcripts format {meta.get('format')!r}, expected {FORMAT_VERSION}; "
                                 "rerun asr_transcribe")
        tables.append(t.select(TRANSCRIPT_SCHEMA.names).cast(TRANSCRIPT_SCHEMA))
        metas.append(meta)
    hashes = {m["model_hash"] for m in metas}
    if len(hashes) > 1:
        raise AsrFilterError(f"the transcript shards come from {len(hashes)} different ASR models; rerun asr_transcribe")
    shards = sorted(m["shard"] for m in metas)
    n = {m["n_shards"] for m in metas}
    if n != {len(paths)} or shards != list(range(len(paths))):
        raise AsrFilterError(f"expected the {len(paths)} shards 0..{len(paths) - 1} of one sharding, got shards "
                             f"{shards} of {sorted(n)}")
    return pa.concat_tables(tables), metas


def _histogram(cer: np.ndarray) -> dict:
    edges = np.round(np.arange(0.0, 1.0 + CER_BIN / 2, CER_BIN), 6)
    counts = np.histogram(np.clip(cer, 0.0, 1.0), bins=edges)[0]
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "above_1": int((cer > 1.0).sum())}


def _quantiles(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if not len(x):
        return {"n": 0}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {"n": int(len(x)), "mean": round(float(x.mean()), 4), "p5": round(float(q[0]), 4),
            "median": round(float(q[1]), 4), "p95": round(float(q[2]), 4)}


def filter_transcripts(cfg: AsrFilterConfig, text_cfg, manifest: str | Path, transcripts: Sequence[str | Path],
                       clean: str | Path, rejects: str | Path, summary: str | Path) -> dict:
    """Score the transcripts against the clean table and split it into kept and rejected rows.

    Args:
        cfg: the ``asr_filter`` section (max_cer, min_edge_silence).
        text_cfg: the ``text`` section (:class:`indextts.text.TextConfig`): the normaliser.
        manifest: ``clean/pre_asr.parquet``.
        transcripts: every shard of :func:`transcribe_shard`, one sharding.
        clean: the kept rows, in order, as clean.parquet (same schema and split).
        rejects: the rejected rows (:data:`REJECT_SCHEMA`).
        summary: counts per reason, the rejected share, the CER histogram, the edge silences.

    Returns:
        The summary.

    Raises:
        AsrFilterError: shards of different models or shardings, an utterance missing from or
            unknown to the transcripts, no row kept, or no val row kept.
    """
    from indextts.manifest import write_clean_table

    t0 = time.perf_counter()
    pre = pq.read_table(manifest)
    tr, metas = _read_transcripts([Path(p) for p in transcripts])
    ids = pre.column("utt_id")
    found = pc.index_in(ids, value_set=tr.column("utt_id"))
    missing = np.flatnonzero(found.is_null().to_numpy(zero_copy_only=False))
    if len(missing) or tr.num_rows != pre.num_rows:
        some = ", ".join(ids.take(pa.array(missing[:5])).to_pylist()) if len(missing) else "none"
        raise AsrFilterError(f"{manifest} has {pre.num_rows} rows but the transcripts hold {tr.num_rows} "
                             f"({len(missing)} missing, e.g. {some}); the transcripts are stale: rerun asr_transcribe")
    tr = tr.take(pc.cast(found, pa.int64()))  # in the clean table's order

    hyp = tr.column("hypothesis").to_pylist()
    readable = np.array([h is not None for h in hyp])
    cer = cer_column(hyp, pre.column("raw_text").to_pylist(), text_cfg)
    lead = tr.column("leading_silence").to_numpy(zero_copy_only=False)
    trail = tr.column("trailing_silence").to_numpy(zero_copy_only=False)
    speech = tr.column("speech_seconds").to_numpy(zero_copy_only=False)
    code = decide(cer, lead, trail, np.nan_to_num(speech), readable, cfg)
    keep = code < 0

    kept = pre.filter(pa.array(keep))
    split = np.asarray(pre.column("split").to_pylist(), dtype=object)
    n_val_in, n_val_kept = int((split == "val").sum()), int((split[keep] == "val").sum())
    rej = np.flatnonzero(~keep)

    def detail(r: int) -> str:
        reason = REASONS[code[r]]
        if reason == "unreadable":
            return str(tr.column("error")[r].as_py())
        if reason == "asr_mismatch":
            return f"CER {cer[r]:.3f} > asr_filter.max_cer {cfg.max_cer}"
        ends = [f"{name} silence {x:.3f} s" for name, x in (("leading", lead[r]), ("trailing", trail[r]))
                if x < cfg.min_edge_silence]
        return f"{' and '.join(ends)} < asr_filter.min_edge_silence {cfg.min_edge_silence}: speech runs into the clip's edge"

    def col(name: str) -> pa.Array:
        return pre.column(name).take(pa.array(rej, type=pa.int64()))

    rejects_table = pa.table(
        {
            "utt_id": col("utt_id"), "audio_path": col("audio_path"), "speaker": col("speaker"),
            "raw_text": col("raw_text"), "text": col("text"), "duration": col("duration"),
            "reason": [REASONS[c] for c in code[rej]], "detail": [detail(int(r)) for r in rej],
            "hypothesis": [hyp[r] for r in rej], "cer": cer[rej], "leading_silence": lead[rej],
            "trailing_silence": trail[rej], "speech_seconds": speech[rej],
        },
        schema=REJECT_SCHEMA,
    )
    counts = {r: int((code == i).sum()) for i, r in enumerate(REASONS)}
    n_in, n_kept, n_rej = pre.num_rows, kept.num_rows, rejects_table.num_rows
    dur = pre.column("duration").to_numpy(zero_copy_only=False)
    scored = cer[readable]
    meta = metas[0] if metas else {}
    with_speech = speech > 0
    out = {
        "input_rows": n_in,
        "kept": n_kept,
        "rejected": n_rej,
        "reconciled": n_kept + n_rej == n_in,
        "rejected_by_reason": counts,
        "rejected_share": round(n_rej / n_in, 6) if n_in else 0.0,
        "hours_in": round(float(dur.sum()) / 3600, 4),
        "hours_kept": round(float(dur[keep].sum()) / 3600, 4),
        "utterances_by_split": {"train": n_kept - n_val_kept, "val": n_val_kept},
        "max_cer": cfg.max_cer,
        "min_edge_silence": cfg.min_edge_silence,
        "model": {"name": meta.get("model"), "sha256": meta.get("model_hash"), **(meta.get("asr") or {})},
        "vad": meta.get("vad"),
        "cer": {**_quantiles(scored), "histogram": _histogram(scored)},
        "leading_silence": _quantiles(lead[with_speech]),
        "trailing_silence": _quantiles(trail[with_speech]),
        "no_speech_detected": int((readable & ~with_speech).sum()),
        "transcription": {
            "audio_seconds": round(sum(m.get("audio_seconds", 0.0) for m in metas), 3),
            "wall_seconds": round(sum(m.get("wall_seconds", 0.0) for m in metas), 3),
            "device": meta.get("device"),
            "shards": len(metas),
        },
        "filter_seconds": None,
    }
    if not out["reconciled"]:  # a bug, not bad input: never write a summary that hides rows
        raise AssertionError(f"kept {n_kept} + rejected {n_rej} != input {n_in}")
    if n_kept == 0:
        raise AsrFilterError(f"the ASR filter kept no row of {n_in} ({counts}); check asr_filter.asr (the right "
                             "language?) or raise asr_filter.max_cer")
    if n_val_in and not n_val_kept:
        raise AsrFilterError(f"the ASR filter rejected all {n_val_in} val utterances; raise asr_filter.max_cer or "
                             "clean.val_fraction")
    write_clean_table(kept, clean)
    write_parquet(rejects_table, rejects, dictionary=["speaker", "reason"])
    out["filter_seconds"] = round(time.perf_counter() - t0, 3)
    write_json(summary, out)
    return out


# --- CLI ------------------------------------------------------------------------------------------


def _sections(arg: str) -> tuple[AsrFilterConfig, dict]:
    config = load_config_arg(arg)
    return get_section(AsrFilterConfig, config, "asr_filter"), config


def cli_asr_transcribe(argv: list[str]) -> int:
    """``indextts asr-transcribe``: transcribe one shard of the clean table and measure its speech edges."""
    p = argparse.ArgumentParser(prog="indextts asr-transcribe", description=cli_asr_transcribe.__doc__)
    p.add_argument("--config", required=True, help="inline JSON or a YAML file with the asr_filter section "
                   "(and eval.asr, used when asr_filter.asr.path is null)")
    p.add_argument("--manifest", required=True, type=Path, help="clean/pre_asr.parquet")
    p.add_argument("--shard", required=True, type=int)
    p.add_argument("--n-shards", required=True, type=int, help="codes.n_shards")
    p.add_argument("--output", required=True, type=Path, help="the shard's transcripts Parquet")
    p.add_argument("--batch-size", type=int, help="clips per ASR forward pass (speed only)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--cache", type=Path, help="a folder of earlier transcripts to reuse and add to "
                   "(asr_filter/cache: not a rule output, so kept across reruns)")
    a = p.parse_args(argv)
    from indextts.evaluation.asr import EvalModelError

    cfg, config = _sections(a.config)
    eval_asr = get_section(AsrConfig, config.get("eval") or {}, "asr")
    try:
        asr_cfg, key = resolve_asr(cfg, eval_asr)
        transcribe_shard(cfg, asr_cfg, a.manifest, a.shard, a.n_shards, a.output, asr_key=key,
                         batch_size=a.batch_size, threads=a.threads, cache=a.cache,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    except (AsrFilterError, EvalModelError) as e:
        print(f"indextts asr-transcribe: {e}", file=sys.stderr)
        return 1
    return 0


def cli_asr_filter(argv: list[str]) -> int:
    """``indextts asr-filter``: score the transcripts and split the clean table into kept and rejected rows."""
    from indextts.text import TextConfig

    p = argparse.ArgumentParser(prog="indextts asr-filter", description=cli_asr_filter.__doc__)
    p.add_argument("--config", required=True, help="inline JSON or a YAML file with the asr_filter and text sections")
    p.add_argument("--manifest", required=True, type=Path, help="clean/pre_asr.parquet")
    p.add_argument("--transcripts", required=True, nargs="+", type=Path, help="every shard of asr-transcribe")
    p.add_argument("--clean", required=True, type=Path, help="the kept rows (clean/clean.parquet)")
    p.add_argument("--rejects", required=True, type=Path, help="the rejected rows (clean/asr_rejects.parquet)")
    p.add_argument("--summary", required=True, type=Path, help="clean/asr_summary.json")
    a = p.parse_args(argv)
    cfg, config = _sections(a.config)
    text_cfg = get_section(TextConfig, config, "text")
    try:
        s = filter_transcripts(cfg, text_cfg, a.manifest, a.transcripts, a.clean, a.rejects, a.summary)
    except AsrFilterError as e:
        print(f"indextts asr-filter: {e}", file=sys.stderr)
        return 1
    reasons = ", ".join(f"{k}={v}" for k, v in s["rejected_by_reason"].items() if v) or "none"
    c = s["cer"]
    cer = f"CER median {c['median']:.3f}, mean {c['mean']:.3f}" if c.get("n") else "no CER"
    print(f"asr-filter: {s['input_rows']} rows in, {s['kept']} kept ({s['hours_kept']:.3f} h), {s['rejected']} rejected "
          f"({100 * s['rejected_share']:.1f} %: {reasons}); {cer} by {s['model']['name']}")
    return 0
