"""clean_manifest: raw manifests in, ``clean.parquet`` + ``rejects.parquet`` + ``summary.json`` out.

Reads JSONL, CSV/TSV (with header) or Parquet manifests, several at once, with column names mapped
in config. Every input row ends up in exactly one of the two tables, so
``kept + rejected == input`` always holds (and ``summary.json`` says so). Each rejected row keeps
its source manifest, its row number, its raw fields, a reason code from a fixed vocabulary
(:data:`REASONS`) and a human-readable detail.

The work is vectorised over Arrow arrays; the only per-row Python is the audio-header probe,
which runs in a thread pool (soundfile releases the GIL) and reads headers, never samples.
For corpora too large to probe, ``clean.trust_durations`` takes durations from the manifest.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from indextts.config import get_section, load_config_arg, pairs
from indextts.files import atomic_path, write_json
from indextts.text import TextConfig, has_bad_encoding, normalize_array

# The fixed vocabulary of reject reasons, in the order the checks run (a row gets the first).
REASONS = (
    "malformed",  # the line/row could not be parsed
    "missing_field",  # no audio path, transcript or speaker
    "bad_encoding",  # U+FFFD or mojibake in the transcript
    "empty_text",  # nothing left after normalisation
    "duplicate",  # same utt_id or same audio file as an earlier row
    "missing_file",  # the audio file does not exist
    "unreadable",  # libsndfile cannot open it
    "truncated",  # the WAV header promises more samples than the file holds
    "too_short",  # below clean.min_duration
    "too_long",  # above clean.max_duration
    "chars_per_second",  # transcript length implausible for the duration
)

CANONICAL = ("id", "audio", "text", "speaker", "language", "emotion", "duration")
REQUIRED = ("audio", "text", "speaker")


@dataclass(frozen=True)
class Columns:
    """Which manifest column holds each field (``data.columns``)."""

    id: str = "id"  # utterance id; when absent, the audio path without extension is used
    audio: str = "audio"  # audio file path, absolute or relative to the manifest's folder
    text: str = "text"  # transcript
    speaker: str = "speaker"  # speaker label
    language: str = "language"  # optional per-row language code
    emotion: str = "emotion"  # optional emotion label
    duration: str = "duration"  # optional duration in seconds (used with clean.trust_durations)


@dataclass(frozen=True)
class ManifestSpec:
    """One manifest with optional per-manifest overrides."""

    path: str  # the manifest file (.jsonl/.json, .csv, .tsv, .parquet)
    columns: dict[str, str] = field(default_factory=dict)  # overrides of data.columns for this file
    language: str | None = None  # language of rows without a language column (default text.language)


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` config section: where the corpus is and how its columns are named."""

    manifests: tuple[str | ManifestSpec, ...] = ()  # concatenated in order
    columns: Columns = Columns()


@dataclass(frozen=True)
class CleanConfig:
    """The ``clean`` config section: filters and the train/val split."""

    min_duration: float = 0.5  # seconds; shorter clips carry too little prosody to learn from
    max_duration: float = 30.0  # seconds; longer ones blow up the GPT's mel context (max_mel_tokens)
    min_chars_per_second: float = 1.0  # below: transcript too short for the audio (wrong pairing)
    max_chars_per_second: float = 30.0  # above: audio too short for the transcript (truncated clip)
    trust_durations: bool = False  # take durations from the manifest instead of probing headers
    probe_workers: int = 8  # threads probing audio headers (I/O-bound: more than cores is fine)
    val_fraction: float = 0.02  # share of utterances in the val split, chosen by hash of utt_id
    split_salt: str = ""  # changes which utterances land in val without touching utt_ids
    drop_duplicates: bool = True  # reject rows repeating an earlier utt_id or audio file


@dataclass(frozen=True)
class CleanOutputs:
    clean: Path
    rejects: Path
    summary: Path


class ManifestError(ValueError):
    """A manifest cannot be used at all (missing file, missing required column ...)."""


# --------------------------------------------------------------------------------------------
# Reading


def _spec(entry: str | ManifestSpec) -> ManifestSpec:
    return entry if isinstance(entry, ManifestSpec) else ManifestSpec(path=entry)


def _column_map(spec: ManifestSpec, columns: Columns) -> dict[str, str]:
    mapping = {k: getattr(columns, k) for k in CANONICAL}
    for k, v in pairs(spec.columns):
        if k not in mapping:
            raise ManifestError(f"{spec.path}: data.manifests[].columns has unknown field {k!r} (known: {', '.join(CANONICAL)})")
        mapping[k] = v
    return mapping


def _manifest_format(path: Path) -> str:
    name = path.name.lower()
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt
    raise ManifestError(f"{path}: unknown manifest format; use .jsonl, .csv, .tsv or .parquet")


_JSON_CHUNK_LINES = 65536


def _read_jsonl(path: Path, mapping: dict[str, str]) -> tuple[pa.Table, list[dict]]:
    """Parse a JSONL manifest in chunks with Arrow; a chunk that fails (a malformed line, a
    number where a string was expected) is re-parsed line by line, so one bad line costs one chunk
    of slow parsing and lands in the rejects instead of failing the whole file."""
    data = path.read_bytes()
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [len(data)]))
    lengths = ends - starts
    # Blank lines (empty, "\r", spaces) are not rows. Only short lines can be blank.
    short = np.flatnonzero(lengths <= 8)
    blank = np.zeros(len(starts), dtype=bool)
    for i in short:
        blank[i] = not data[starts[i] : ends[i]].strip()
    line_idx = np.flatnonzero(~blank)  # 0-based line numbers of rows

    fields = {c: mapping[c] for c in CANONICAL}
    schema = pa.schema(
        [(fields[c], pa.float64() if c == "duration" else pa.string()) for c in CANONICAL if fields[c]]
    )
    parse_opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False)
    tables: list[pa.Table] = []
    malformed: list[dict] = []
    for c0 in range(0, len(line_idx), _JSON_CHUNK_LINES):
        idx = line_idx[c0 : c0 + _JSON_CHUNK_LINES]
        lo, hi = int(starts[idx[0]]), int(ends[idx[-1]])
        table = None
        try:
            table = pajson.read_json(pa.BufferReader(pa.py_buffer(memoryview(data)[lo:hi])), parse_options=parse_opts)
            if table.num_rows != len(idx):
                table = None
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = None
        if table is None:
            table, bad = _parse_lines_slowly(data, starts, ends, idx, fields, schema)
            malformed += bad
        else:
            table = table.append_column("row", pa.array(idx + 1, type=pa.int64()))
        tables.append(table)
    if not tables:
        return _empty_rows(schema), malformed
    return pa.concat_tables(tables), malformed


def _parse_lines_slowly(data, starts, ends, idx, fields, schema) -> tuple[pa.Table, list[dict]]:
    cols: dict[str, list] = {f.name: [] for f in schema}
    rows: list[int] = []
    bad: list[dict] = []
    for i in idx:
        raw = data[int(starts[i]) : int(ends[i])]
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        except ValueError as e:
            text = raw.decode("utf-8", errors="replace")
            bad.append({"row": int(i) + 1, "detail": f"{type(e).__name__}: {e}; line: {text[:200]}"})
            continue
        for f in schema:
            v = obj.get(f.name)
            if f.type == pa.float64():
                try:
                    v = None if v is None or v == "" else float(v)
                except (TypeError, ValueError):
                    v = None
            elif v is not None and not isinstance(v, str):
                v = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)
            cols[f.name].append(v)
        rows.append(int(i) + 1)
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema] + [pa.array(rows, type=pa.int64())]
    return pa.Table.from_arrays(arrays, names=[f.name for f in schema] + ["row"]), bad


def _empty_rows(schema: pa.Schema) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array([], type=f.type) for f in schema] + [pa.array([], type=pa.int64())],
        names=[f.name for f in schema] + ["row"],
    )


def _read_csv(path: Path, mapping: dict[str, str], delimiter: str) -> tuple[pa.Table, list[dict]]:
    bad: list[dict] = []

    def on_invalid(row) -> str:
        number = row.number if row.number is not None else -1
        bad.append({"row": number - 1 if number > 0 else -1, "detail": f"expected {row.expected_columns} columns, got {row.actual_columns}; line: {row.text[:200]}"})
        return "skip"

    import csv

    with path.open(encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    types = {name: (pa.float64() if name == mapping["duration"] else pa.string()) for name in header}
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False, null_values=[""], quoted_strings_can_be_null=False),
    )
    # Data rows are numbered from 1 (the header is row 0); good rows fill the numbers bad rows left.
    bad_rows = {b["row"] for b in bad}
    numbers, n = [], 1
    while len(numbers) < table.num_rows:
        if n not in bad_rows:
            numbers.append(n)
        n += 1
    return table.append_column("row", pa.array(numbers, type=pa.int64())), bad


def read_manifest(spec: ManifestSpec, columns: Columns, default_language: str) -> tuple[pa.Table, list[dict]]:
    """Read one manifest into canonical columns.

    Returns:
        (rows, malformed): ``rows`` has ``manifest, row`` plus the canonical fields (strings,
        ``duration`` float64, missing optional columns all-null); ``malformed`` lists
        ``{row, detail}`` for lines that could not be parsed.

    Raises:
        ManifestError: the file is missing, of unknown format, or lacks a required column.
    """
    path = Path(spec.path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found (listed in data.manifests); check the path, relative paths resolve against the working directory")
    mapping = _column_map(spec, columns)
    fmt = _manifest_format(path)
    if fmt == "jsonl":
        table, malformed = _read_jsonl(path, mapping)
    elif fmt in ("csv", "tsv"):
        table, malformed = _read_csv(path, mapping, "," if fmt == "csv" else "\t")
    else:
        pf = pq.ParquetFile(path)
        names = [mapping[c] for c in CANONICAL if mapping[c] in pf.schema_arrow.names]
        table = pf.read(columns=names)
        table = table.append_column("row", pa.array(np.arange(1, table.num_rows + 1), type=pa.int64()))
        malformed = []
    present = set(table.column_names)
    # A JSONL file yields every schema column (null when absent); check the real keys instead.
    if fmt == "jsonl" and table.num_rows:
        present = {name for name in table.column_names if table.column(name).null_count < table.num_rows}
    if table.num_rows:
        missing = [c for c in REQUIRED if mapping[c] not in present]
        if missing:
            hints = ", ".join(f"{c} (looked for column {mapping[c]!r}; set data.columns.{c})" for c in missing)
            raise ManifestError(f"{path}: required column(s) missing: {hints}; the file has: {', '.join(sorted(table.column_names))}")
    n = table.num_rows
    out = {"manifest": pa.array([str(path)] * n, type=pa.string()) if n < 1 else pa.repeat(pa.scalar(str(path)), n), "row": table.column("row")}
    for c in CANONICAL:
        name = mapping[c]
        if name in table.column_names:
            col = table.column(name)
            want = pa.float64() if c == "duration" else pa.string()
            out[c] = col.cast(want) if col.type != want else col
        else:
            out[c] = pa.nulls(n, type=pa.float64() if c == "duration" else pa.string())
    lang = spec.language or default_language
    out["language"] = pc.if_else(pc.is_null(out["language"]), pa.scalar(lang), out["language"])
    out["base_dir"] = pa.repeat(pa.scalar(str(path.resolve().parent)), n)
    return pa.table(out), malformed


# --------------------------------------------------------------------------------------------
# Probing


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int = 0
    channels: int = 0
    frames: int = 0
    reason: str | None = None
    detail: str = ""


def _wav_truncation(path: str) -> str | None:
    """For RIFF/WAVE files, compare the data chunk's declared size with the bytes on disk.
    libsndfile silently reports the shorter length of a cut file, so this is the only way to
    tell a truncated recording from a short one."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
                return None
            size = os.fstat(f.fileno()).st_size
            pos = 12
            while pos + 8 <= size:
                f.seek(pos)
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, clen = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"data":
                    if clen in (0, 0xFFFFFFFF) or head[:4] == b"RF64":
                        return None  # streaming writers leave the size open; RF64 keeps it in ds64
                    have = size - (pos + 8)
                    if have < clen:
                        return f"data chunk declares {clen} bytes, file holds {have}"
                    return None
                pos += 8 + clen + (clen & 1)
    except OSError:
        return None
    return None


def probe_audio(path: str) -> AudioInfo:
    """Read one file's header (never its samples) and classify problems."""
    import soundfile as sf

    if not os.path.exists(path):
        return AudioInfo(reason="missing_file", detail=f"{path} does not exist")
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile raises its own error types for every kind of damage
        return AudioInfo(reason="unreadable", detail=f"{type(e).__name__}: {e}")
    trunc = _wav_truncation(path)
    if trunc:
        return AudioInfo(info.samplerate, info.channels, info.frames, "truncated", trunc)
    if info.samplerate <= 0 or info.frames <= 0:
        return AudioInfo(info.samplerate, info.channels, info.frames, "unreadable", "no samples in file")
    return AudioInfo(info.samplerate, info.channels, info.frames)


def probe_many(paths: Sequence[str], workers: int, progress: bool = True) -> list[AudioInfo]:
    """Probe headers in a thread pool, results in input order, with a progress bar."""
    from tqdm import tqdm

    if not paths:
        return []
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = pool.map(probe_audio, paths, chunksize=64)
        return list(tqdm(it, total=len(paths), desc="probing audio headers", unit="file", disable=not progress, mininterval=2.0, file=sys.stderr))


# --------------------------------------------------------------------------------------------
# Cleaning


def stable_fraction(keys: Iterable[str], salt: str = "") -> np.ndarray:
    """Map strings to [0, 1) with blake2b, identically on every machine and Python version
    (``hash()`` is salted per process, so it cannot decide a split)."""
    prefix = salt.encode()
    out = np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") for k in keys),
        dtype=np.uint64,
    )
    return out.astype(np.float64) / 2.0**64


def clean_manifest(
    data_cfg: DataConfig,
    text_cfg: TextConfig,
    clean_cfg: CleanConfig,
    out_dir: str | os.PathLike,
    manifests: Sequence[str | ManifestSpec] | None = None,
    progress: bool = True,
) -> CleanOutputs:
    """Clean and concatenate manifests.

    Args:
        data_cfg, text_cfg, clean_cfg: the ``data``, ``text`` and ``clean`` sections.
        out_dir: folder for ``clean.parquet``, ``rejects.parquet`` and ``summary.json``.
        manifests: overrides ``data_cfg.manifests`` when given.
        progress: show a progress bar while probing.

    Returns:
        The three output paths.

    Raises:
        ManifestError: a manifest is missing or lacks a required column, or no row survives.
    """
    out_dir = Path(out_dir)
    specs = [_spec(m) for m in (manifests if manifests is not None else data_cfg.manifests)]
    if not specs:
        raise ManifestError("data.manifests is empty: list at least one manifest file")

    parts, bad_rows, per_manifest = [], [], []
    for spec in specs:
        table, malformed = read_manifest(spec, data_cfg.columns, text_cfg.language)
        parts.append(table)
        for b in malformed:
            bad_rows.append({"manifest": str(spec.path), "row": b["row"], "reason": "malformed", "detail": b["detail"]})
        per_manifest.append({"path": str(spec.path), "rows": table.num_rows + len(malformed), "malformed": len(malformed)})
    rows = pa.concat_tables(parts)
    n = rows.num_rows

    reason = np.full(n, None, dtype=object)
    detail = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, code: str, why: np.ndarray | str) -> None:
        sel = mask & (reason == None)  # noqa: E711 (elementwise on an object array)
        reason[sel] = code
        detail[sel] = why[sel] if isinstance(why, np.ndarray) else why

    def null_or_blank(col: str) -> np.ndarray:
        c = rows.column(col)
        return pc.fill_null(pc.equal(pc.utf8_trim_whitespace(c), ""), True).to_numpy(zero_copy_only=False)

    for c in REQUIRED:
        mask = null_or_blank(c) if c != "text" else pc.is_null(rows.column("text")).to_numpy(zero_copy_only=False)
        reject(mask, "missing_field", f"no {c} (column {getattr(data_cfg.columns, c)!r})")

    raw_text = pc.fill_null(rows.column("text"), "")
    reject(has_bad_encoding(raw_text).to_numpy(zero_copy_only=False), "bad_encoding", "transcript holds U+FFFD or mojibake; re-export the manifest as UTF-8")
    text = normalize_array(raw_text, text_cfg)
    reject(pc.equal(text, "").to_numpy(zero_copy_only=False), "empty_text", "transcript is empty after normalisation")

    audio = pc.fill_null(rows.column("audio"), "")
    is_abs = pc.starts_with(audio, "/").to_numpy(zero_copy_only=False)
    audio_path = pc.if_else(pa.array(is_abs), audio, pc.binary_join_element_wise(rows.column("base_dir"), audio, "/"))
    ids_given = rows.column("id")
    derived = pc.replace_substring_regex(audio, pattern=r"\.[A-Za-z0-9]+$", replacement="")
    utt_id = pc.if_else(pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(ids_given), ""), False), ids_given, derived)

    if clean_cfg.drop_duplicates:
        alive = reason == None  # noqa: E711
        idx = np.flatnonzero(alive)
        uid = np.asarray(utt_id.to_numpy(zero_copy_only=False), dtype=object)
        apath = np.asarray(audio_path.to_numpy(zero_copy_only=False), dtype=object)
        import pandas as pd

        frame = pd.DataFrame({"uid": uid[idx], "path": apath[idx]})
        dup_id = frame["uid"].duplicated().to_numpy()
        dup_path = frame["path"].duplicated().to_numpy()
        mask = np.zeros(n, dtype=bool)
        mask[idx[dup_id | dup_path]] = True
        why = np.where(np.isin(np.arange(n), idx[dup_id]), "utt_id already seen in an earlier row", "audio file already listed in an earlier row")
        reject(mask, "duplicate", why.astype(object))

    duration = rows.column("duration").to_numpy(zero_copy_only=False).astype(np.float64)
    sample_rate = np.zeros(n, dtype=np.int64)
    channels = np.zeros(n, dtype=np.int64)
    alive = reason == None  # noqa: E711
    need_probe = alive & (~np.isfinite(duration) if clean_cfg.trust_durations else True)
    idx = np.flatnonzero(need_probe)
    paths = audio_path.take(pa.array(idx)).to_pylist() if len(idx) else []
    infos = probe_many(paths, clean_cfg.probe_workers, progress=progress)
    for i, info in zip(idx, infos):
        if info.reason:
            reason[i], detail[i] = info.reason, info.detail
        else:
            sample_rate[i], channels[i] = info.sample_rate, info.channels
            duration[i] = info.frames / info.sample_rate

    alive = reason == None  # noqa: E711
    with np.errstate(invalid="ignore"):
        reject(alive & (duration < clean_cfg.min_duration), "too_short", np.char.add(np.round(duration, 3).astype(str), f" s < clean.min_duration {clean_cfg.min_duration}").astype(object))
        reject(alive & (duration > clean_cfg.max_duration), "too_long", np.char.add(np.round(duration, 3).astype(str), f" s > clean.max_duration {clean_cfg.max_duration}").astype(object))
        n_chars = pc.utf8_length(pc.replace_substring(text, " ", "")).to_numpy(zero_copy_only=False).astype(np.float64)
        cps = n_chars / np.where(duration > 0, duration, np.nan)
        bad_cps = (cps < clean_cfg.min_chars_per_second) | (cps > clean_cfg.max_chars_per_second)
        reject((reason == None) & bad_cps, "chars_per_second", np.char.add(np.round(cps, 2).astype(str), f" chars/s outside [{clean_cfg.min_chars_per_second}, {clean_cfg.max_chars_per_second}]").astype(object))  # noqa: E711

    keep = reason == None  # noqa: E711
    keep_idx = pa.array(np.flatnonzero(keep))
    kept_ids = utt_id.take(keep_idx)
    frac = stable_fraction(kept_ids.to_pylist(), clean_cfg.split_salt)
    is_val = frac < clean_cfg.val_fraction
    if clean_cfg.val_fraction > 0 and len(frac) >= 2 and not is_val.any():
        is_val[np.argmin(frac)] = True  # a tiny corpus still gets one val utterance to report on
    probed = sample_rate[keep] > 0
    clean = pa.table(
        {
            "utt_id": kept_ids,
            "audio_path": audio_path.take(keep_idx),
            "text": text.take(keep_idx),
            "raw_text": rows.column("text").take(keep_idx),
            "speaker": rows.column("speaker").take(keep_idx),
            "language": rows.column("language").take(keep_idx),
            "emotion": rows.column("emotion").take(keep_idx),
            "duration": pa.array(duration[keep], type=pa.float64()),
            "sample_rate": pa.array(np.where(probed, sample_rate[keep], 0), type=pa.int32(), mask=~probed),
            "channels": pa.array(np.where(probed, channels[keep], 0), type=pa.int16(), mask=~probed),
            "split": pa.array(np.where(is_val, "val", "train"), type=pa.string()),
        }
    )

    rej_idx = pa.array(np.flatnonzero(~keep))
    rejects = pa.table(
        {
            "manifest": rows.column("manifest").take(rej_idx),
            "row": rows.column("row").take(rej_idx),
            "utt_id": utt_id.take(rej_idx),
            "audio": rows.column("audio").take(rej_idx),
            "text": rows.column("text").take(rej_idx),
            "speaker": rows.column("speaker").take(rej_idx),
            "language": rows.column("language").take(rej_idx),
            "emotion": rows.column("emotion").take(rej_idx),
            "duration": rows.column("duration").take(rej_idx),
            "reason": pa.array(reason[~keep].tolist(), type=pa.string()),
            "detail": pa.array([str(d) for d in detail[~keep]], type=pa.string()),
        }
    )
    if bad_rows:
        malformed = pa.table(
            {
                "manifest": pa.array([b["manifest"] for b in bad_rows], pa.string()),
                "row": pa.array([b["row"] for b in bad_rows], pa.int64()),
                "reason": pa.array([b["reason"] for b in bad_rows], pa.string()),
                "detail": pa.array([b["detail"] for b in bad_rows], pa.string()),
            }
        )
        rejects = pa.concat_tables([malformed, rejects], promote_options="default").select(rejects.column_names)
        rejects = rejects.sort_by([("manifest", "ascending"), ("row", "ascending")])

    n_input = n + len(bad_rows)
    summary = _summary(clean, rejects, n_input, per_manifest, clean_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CleanOutputs(out_dir / "clean.parquet", out_dir / "rejects.parquet", out_dir / "summary.json")
    with atomic_path(paths.clean) as tmp:
        pq.write_table(clean, tmp, compression="zstd")
    with atomic_path(paths.rejects) as tmp:
        pq.write_table(rejects, tmp, compression="zstd")
    write_json(paths.summary, summary)
    if clean.num_rows == 0:
        top = ", ".join(f"{k}: {v}" for k, v in summary["rejected_by_reason"].items() if v)
        raise ManifestError(f"no row survived cleaning ({top}); see {paths.rejects}")
    return paths


def _summary(clean: pa.Table, rejects: pa.Table, n_input: int, per_manifest: list[dict], cfg: CleanConfig) -> dict:
    counts = {r: 0 for r in REASONS}
    for r, c in zip(*np.unique(np.asarray(rejects.column("reason").to_pylist(), dtype=object).astype(str), return_counts=True)) if rejects.num_rows else []:
        counts[str(r)] = int(c)
    dur = clean.column("duration").to_numpy()
    split = np.asarray(clean.column("split").to_pylist())
    speakers = clean.column("speaker")
    summary = {
        "input_rows": n_input,
        "kept": clean.num_rows,
        "rejected": rejects.num_rows,
        "reconciled": clean.num_rows + rejects.num_rows == n_input,
        "rejected_by_reason": counts,
        "hours_kept": round(float(dur.sum()) / 3600, 4),
        "hours_by_split": {s: round(float(dur[split == s].sum()) / 3600, 4) for s in ("train", "val")},
        "utterances_by_split": {s: int((split == s).sum()) for s in ("train", "val")},
        "speakers": len(pc.unique(speakers)) if clean.num_rows else 0,
        "languages": _value_counts(clean.column("language")),
        "emotions": _value_counts(clean.column("emotion")),
        "durations_probed": clean.num_rows - clean.column("sample_rate").null_count,
        "durations_from_manifest": clean.column("sample_rate").null_count,
        "manifests": per_manifest,
    }
    if not summary["reconciled"]:  # a bug, not bad input: never write a summary that hides rows
        raise AssertionError(f"kept {clean.num_rows} + rejected {rejects.num_rows} != input {n_input}")
    return summary


def _value_counts(col: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(col)
    return {str(v["values"]): int(v["counts"]) for v in vc.to_pylist()}


def load_configs(raw: dict) -> tuple[DataConfig, TextConfig, CleanConfig]:
    """Parse the ``data``, ``text`` and ``clean`` sections of a config mapping."""
    return get_section(DataConfig, raw, "data"), get_section(TextConfig, raw, "text"), get_section(CleanConfig, raw, "clean")


def cli_clean_manifest(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="indextts clean-manifest", description=clean_manifest.__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="inline JSON or a YAML file with data/text/clean sections")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("manifests", nargs="*", help="override data.manifests")
    args = p.parse_args(argv)
    data_cfg, text_cfg, clean_cfg = load_configs(load_config_arg(args.config))
    try:
        out = clean_manifest(data_cfg, text_cfg, clean_cfg, args.out_dir, manifests=args.manifests or None, progress=not args.no_progress)
    except ManifestError as e:
        print(f"clean-manifest: {e}", file=sys.stderr)
        return 1
    summary = json.loads(out.summary.read_text())
    reasons = ", ".join(f"{k}={v}" for k, v in summary["rejected_by_reason"].items() if v) or "none"
    print(
        f"clean-manifest: {summary['input_rows']} rows in, {summary['kept']} kept "
        f"({summary['hours_kept']:.3f} h, {summary['speakers']} speakers), {summary['rejected']} rejected ({reasons})"
    )
    return 0
