"""clean_manifest: raw manifests in, ``clean.parquet`` + ``rejects.parquet`` + ``summary.json`` out.

Reads JSONL, CSV/TSV (with header) or Parquet manifests, several at once, with column names mapped
in config. Every input row ends up in exactly one of the two tables, so
``kept + rejected == input`` always holds (and ``summary.json`` says so). Each rejected row keeps
its source manifest, its row number, its raw fields, a reason code from a fixed vocabulary
(:data:`REASONS`) and a human-readable detail.

The work is vectorised over Arrow arrays and numpy; the only per-row Python is the audio-header
probe, which runs in a thread pool (soundfile releases the GIL) and reads headers, never
samples, and ``json.loads`` on the few lines Arrow's JSON parser rejects. JSONL blocks and
transcript normalisation run on all cores (Arrow kernels release the GIL). Duplicates and the
train/val split use XXH64 (:func:`stable_hash64`), computed over Arrow's string buffers.
For corpora too large to probe, ``clean.trust_durations`` takes durations from the manifest.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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


# JSONL is parsed in blocks of about this many bytes, several blocks at once in a thread pool
# (Arrow's parser releases the GIL). Small blocks keep the cost of a bad line low: only its
# block is parsed again, in halves (see _parse_lines).
_JSON_BLOCK_BYTES = 2 << 20
# Spans with at most this many lines are parsed line by line once Arrow has rejected them.
_JSON_SLOW_LINES = 64
# A newline followed by a line of nothing but ASCII whitespace: a blank line, which is not a row
# (the empty string after a final newline is no line at all).
_BLANK_LINE = re.compile(rb"\n(?:[ \t\r\x0b\x0c]*\n|[ \t\r\x0b\x0c]+\Z)")


def _jsonl_schema(mapping: dict[str, str]) -> pa.Schema:
    return pa.schema([(mapping[c], pa.float64() if c == "duration" else pa.string()) for c in CANONICAL if mapping[c]])


def _jsonl_blocks(path: Path) -> Iterator[bytes]:
    """Yield the file's whole lines in blocks of about ``_JSON_BLOCK_BYTES``."""
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_JSON_BLOCK_BYTES)
            data = carry + chunk if carry else chunk
            if not chunk:
                if data:
                    yield data
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a block: keep reading
                carry = data
                continue
            if cut == len(data):
                block, carry = data, b""
            else:
                block, carry = data[:cut], data[cut:]
            yield block


def _read_jsonl(path: Path, mapping: dict[str, str]) -> tuple[pa.Table, list[dict]]:
    """Parse a JSONL manifest with Arrow, block by block, blocks in parallel.

    A block that Arrow rejects (a malformed line, a number where a string was expected) is split
    in halves until the bad line is isolated in a span of at most ``_JSON_SLOW_LINES`` lines, which
    is parsed line by line with ``json.loads``: one bad line costs about one extra parse of its
    block, and it lands in the rejects instead of failing the whole file. Row numbers are physical
    1-based line numbers; blank lines are not rows.
    """
    schema = _jsonl_schema(mapping)
    parse_opts = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False)
    read_opts = pajson.ReadOptions(use_threads=False, block_size=4 * _JSON_BLOCK_BYTES)
    workers = _workers()
    results: list[cf.Future] = []
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        window: list[cf.Future] = []
        for data in _jsonl_blocks(path):
            fut = pool.submit(_parse_block, data, schema, parse_opts, read_opts)
            results.append(fut)
            window.append(fut)
            if len(window) > 4 * workers:  # bound the bytes held in memory while parsing
                window.pop(0).result()
    # Blocks number their lines from 1; shift them by the lines of the blocks before.
    tables: list[pa.Table] = []
    malformed: list[dict] = []
    lines_before = 0
    for fut in results:
        block_tables, bad, n_lines = fut.result()
        for t in block_tables:
            i = t.schema.get_field_index("row")
            tables.append(t.set_column(i, "row", pc.add(t.column(i), lines_before)))
        malformed += [{**b, "row": b["row"] + lines_before} for b in bad]
        lines_before += n_lines
    if not tables:
        return _empty_rows(schema), malformed
    return pa.concat_tables(tables), malformed


def _parse_block(data: bytes, schema: pa.Schema, parse_opts, read_opts) -> tuple[list[pa.Table], list[dict], int]:
    """Parse one block of whole lines. Returns its tables and malformed lines, numbered from 1
    within the block, and the block's number of newlines."""
    tables: list[pa.Table] = []
    malformed: list[dict] = []
    n_newlines = data.count(b"\n")
    has_blank = data[: data.find(b"\n") + 1 or len(data)].isspace() or _BLANK_LINE.search(data) is not None
    if not has_blank:
        n_lines = n_newlines + (0 if data.endswith(b"\n") else 1)
        table = _try_parse(data, 0, len(data), parse_opts, read_opts)
        if table is not None and table.num_rows == n_lines:
            rows = np.arange(1, n_lines + 1, dtype=np.int64)
            return [table.append_column("row", pa.array(rows))], malformed, n_newlines
    # Blank lines or a bad line: index the lines of this block and work on line ranges.
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [len(data)]))
    blank = np.zeros(len(starts), dtype=bool)
    for i in np.flatnonzero(ends - starts <= 8):  # only short lines can be blank; check those
        blank[i] = not data[starts[i] : ends[i]].strip()
    _parse_lines(data, starts, ends, blank, 0, len(starts), 0, schema, parse_opts, read_opts, tables, malformed)
    return tables, malformed, n_newlines


def _try_parse(data: bytes, lo: int, hi: int, parse_opts, read_opts) -> pa.Table | None:
    try:
        return pajson.read_json(pa.BufferReader(pa.py_buffer(memoryview(data)[lo:hi])), read_options=read_opts, parse_options=parse_opts)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _parse_lines(data, starts, ends, blank, a, b, lines_before, schema, parse_opts, read_opts, tables, malformed) -> None:
    """Parse lines ``[a, b)`` of a block, bisecting around lines Arrow rejects."""
    rows = np.flatnonzero(~blank[a:b]) + a
    if not len(rows):
        return
    lo, hi = int(starts[a]), int(ends[b - 1])
    table = _try_parse(data, lo, hi, parse_opts, read_opts)
    if table is not None and table.num_rows == len(rows):
        tables.append(table.append_column("row", pa.array(rows.astype(np.int64) + lines_before + 1)))
        return
    if len(rows) <= _JSON_SLOW_LINES:
        table, bad = _parse_lines_slowly(data[lo:hi], lines_before + a, schema)
        tables.append(table)
        malformed += bad
        return
    mid = (a + b) // 2
    _parse_lines(data, starts, ends, blank, a, mid, lines_before, schema, parse_opts, read_opts, tables, malformed)
    _parse_lines(data, starts, ends, blank, mid, b, lines_before, schema, parse_opts, read_opts, tables, malformed)


def _parse_lines_slowly(data: bytes, lines_before: int, schema: pa.Schema) -> tuple[pa.Table, list[dict]]:
    cols: dict[str, list] = {f.name: [] for f in schema}
    rows: list[int] = []
    bad: list[dict] = []
    for i, raw in enumerate(data.split(b"\n"), start=lines_before + 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        except ValueError as e:
            text = raw.decode("utf-8", errors="replace")
            bad.append({"row": i, "detail": f"{type(e).__name__}: {e}; line: {text[:200]}"})
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
        rows.append(i)
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
        (rows, malformed): ``rows`` has ``manifest`` (dictionary-encoded string), ``row`` (1-based
        line/row number) plus the canonical fields (strings, ``duration`` float64, missing
        optional columns all-null); ``malformed`` lists
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
    # One path for every row: dictionary-encoded, not 3M copies of the string.
    manifest = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([str(path)]))
    out = {"manifest": manifest, "row": table.column("row")}
    for c in CANONICAL:
        name = mapping[c]
        if name in table.column_names:
            col = table.column(name)
            want = pa.float64() if c == "duration" else pa.string()
            out[c] = col.cast(want) if col.type != want else col
        else:
            out[c] = pa.nulls(n, type=pa.float64() if c == "duration" else pa.string())
    lang = spec.language or default_language
    out["language"] = pc.fill_null(out["language"], lang)
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

def stable_hash64(keys: Iterable[str] | pa.Array | pa.ChunkedArray, salt: str = "") -> np.ndarray:
    """XXH64 (seed 0, the ``xxhash`` package) of the UTF-8 bytes of ``salt + key``, as ``uint64``.

    The same on every machine, process and Python version (unlike ``hash()``), and about 5x
    cheaper per key than ``hashlib.blake2b`` (3M keys in about half a second).

    Args:
        keys: strings (a Python iterable or an Arrow string array); no nulls.
        salt: prepended to every key before hashing.

    Returns:
        ``uint64`` array, one hash per key.

    Raises:
        ValueError: a key is null.
    """
    import xxhash

    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        if keys.null_count:
            raise ValueError("stable_hash64: keys must not be null")
        keys = keys.to_pylist()
    elif not isinstance(keys, list):
        keys = list(keys)
    if any(k is None for k in keys):
        raise ValueError("stable_hash64: keys must not be null")
    digest, prefix = xxhash.xxh64_intdigest, salt.encode()
    return np.fromiter((digest(prefix + k.encode()) for k in keys), dtype=np.uint64, count=len(keys))


def stable_fraction(keys: Iterable[str] | pa.Array | pa.ChunkedArray, salt: str = "") -> np.ndarray:
    """Map strings to [0, 1): the top 53 bits of :func:`stable_hash64` ``(salt + key)`` over 2**53.

    Identical on every machine, process and Python version (``hash()`` is salted per process, so
    it cannot decide a split). An utterance is in val when its fraction is below
    ``clean.val_fraction``.
    """
    return (stable_hash64(keys, salt) >> np.uint64(11)).astype(np.float64) / 2.0**53


def _first_occurrences(keys: pa.Array | pa.ChunkedArray, hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows`` (ascending indices into ``keys``), True when its key equals the key of
    no earlier row in ``rows``. ``hashes``: :func:`stable_hash64` of ``keys``. Exact: a row whose
    hash was seen before is compared with that earlier row's string, so a 64-bit hash collision
    never makes two different keys duplicates."""
    import pandas as pd

    n = len(rows)
    if n == 0:
        return np.zeros(0, dtype=bool)
    codes, _ = pd.factorize(hashes[rows])  # codes numbered in order of first appearance (documented)
    top = np.maximum.accumulate(codes)
    first = np.empty(n, dtype=bool)
    first[0] = True
    first[1:] = top[1:] > top[:-1]
    later = np.flatnonzero(~first)
    if len(later):
        earlier = np.flatnonzero(first)[codes[later]]
        same = pc.equal(keys.take(pa.array(rows[later])), keys.take(pa.array(rows[earlier]))).to_numpy(zero_copy_only=False)
        if not same.all():  # a true 64-bit collision: settle those hash groups string by string
            groups = np.unique(codes[later[~same]])
            where = np.flatnonzero(np.isin(codes, groups))
            seen: set[str] = set()
            for i, k in zip(where.tolist(), keys.take(pa.array(rows[where])).to_pylist()):
                first[i] = k not in seen
                seen.add(k)
    return first


def _absolute_paths(audio: pa.ChunkedArray, base_dir: str) -> pa.ChunkedArray:
    """Relative audio paths resolved against the manifest's folder (absolute ones kept)."""
    is_abs = pc.starts_with(audio, "/")
    n_abs = pc.sum(is_abs).as_py() or 0
    if n_abs == len(audio):
        return audio
    joined = pc.binary_join_element_wise(base_dir, audio, "/")
    return joined if n_abs == 0 else pc.if_else(is_abs, audio, joined)


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _text_columns(raw_text: pa.ChunkedArray, cfg: TextConfig, pool: cf.Executor | None = None) -> tuple[np.ndarray, pa.ChunkedArray, np.ndarray]:
    """Mojibake flags, normalised text (null where the transcript is null) and its length
    without spaces, computed on slices in ``pool``: Arrow's string kernels release the GIL, but
    each call runs on one core."""
    n = len(raw_text)
    n_slices = 1 if n < 50_000 or pool is None else 4 * _workers()
    bounds = np.linspace(0, n, n_slices + 1).astype(np.int64).tolist()

    def work(a: int, b: int) -> tuple[pa.Array, pa.Array, pa.Array]:
        piece = raw_text.slice(a, b - a)
        text = normalize_array(piece, cfg)  # a null transcript stays null (0 characters)
        n_chars = pc.fill_null(pc.subtract(pc.utf8_length(text), pc.count_substring(text, " ")), 0)
        return pc.fill_null(has_bad_encoding(piece), False), text, n_chars

    parts = [work(0, n)] if n_slices == 1 else list(pool.map(work, bounds[:-1], bounds[1:]))

    def flat(i: int) -> pa.ChunkedArray:
        chunks = [c for p in parts for c in (p[i].chunks if isinstance(p[i], pa.ChunkedArray) else [p[i]])]
        return pa.chunked_array(chunks, type=chunks[0].type) if chunks else pa.chunked_array([], type=pa.string())

    bad = flat(0).to_numpy(zero_copy_only=False).astype(bool) if n else np.zeros(0, bool)
    n_chars = flat(2).to_numpy(zero_copy_only=False).astype(np.float64) if n else np.zeros(0)
    return bad, flat(1), n_chars


class _Rejects:
    """The first reason each row is rejected for (checks run in :data:`REASONS` order), as a
    small-int code per row; details are strings built only for the rows that are rejected."""

    def __init__(self, n: int):
        self.code = np.full(n, -1, dtype=np.int8)
        self.details: list[tuple[np.ndarray, object]] = []  # (rows, str | callable(rows) -> list[str])

    def alive(self) -> np.ndarray:
        return self.code < 0

    def add(self, mask: np.ndarray, reason: str, detail) -> None:
        rows = np.flatnonzero(mask & (self.code < 0))
        if len(rows):
            self.code[rows] = REASONS.index(reason)
            self.details.append((rows, detail))

    def detail_strings(self, rows: np.ndarray) -> list[str]:
        """Details for ``rows``: every rejected row, ascending."""
        out = np.empty(len(rows), dtype=object)
        for r, d in self.details:
            out[np.searchsorted(rows, r)] = d(r) if callable(d) else d
        return [str(d) for d in out]


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

    parts, paths_parts, bad_rows, per_manifest = [], [], [], []
    for spec in specs:
        table, malformed = read_manifest(spec, data_cfg.columns, text_cfg.language)
        parts.append(table)
        audio = pc.fill_null(table.column("audio"), "")
        paths_parts += _absolute_paths(audio, str(Path(spec.path).resolve().parent)).chunks
        for b in malformed:
            bad_rows.append({"manifest": str(spec.path), "row": b["row"], "reason": "malformed", "detail": b["detail"]})
        per_manifest.append({"path": str(spec.path), "rows": table.num_rows + len(malformed), "malformed": len(malformed)})
    rows = pa.concat_tables(parts)
    audio_path = pa.chunked_array(paths_parts, type=pa.string())
    n = rows.num_rows
    rej = _Rejects(n)
    id_hash = None

    def blank(col: pa.ChunkedArray) -> np.ndarray:
        """Null, empty or only whitespace."""
        empty = pc.or_(pc.equal(pc.utf8_length(col), 0), pc.utf8_is_space(col))
        return pc.fill_null(empty, True).to_numpy(zero_copy_only=False)

    for c in REQUIRED:
        mask = blank(rows.column(c)) if c != "text" else pc.is_null(rows.column("text")).to_numpy(zero_copy_only=False)
        rej.add(mask, "missing_field", f"no {c} (column {getattr(data_cfg.columns, c)!r})")

    # utt_id: the given id, or the audio path without its extension where none is given.
    ids_given = rows.column("id")
    no_id = blank(ids_given)
    if no_id.any():
        audio = pc.fill_null(rows.column("audio"), "")
        derived = pc.replace_substring_regex(audio.filter(pa.array(no_id)), pattern=r"\.[A-Za-z0-9]+$", replacement="")
        utt_id = pa.chunked_array([pc.replace_with_mask(pc.fill_null(ids_given, "").combine_chunks(), pa.array(no_id), derived.combine_chunks())])
    else:
        utt_id = ids_given

    raw_text = rows.column("text")
    with cf.ThreadPoolExecutor(max_workers=_workers()) as pool:
        # The duplicate hashes do not depend on the text: let them run beside the normalisation.
        hash_jobs = [pool.submit(stable_hash64, utt_id), pool.submit(stable_hash64, audio_path)] if clean_cfg.drop_duplicates else []
        bad_encoding, text, n_chars = _text_columns(raw_text, text_cfg, pool)
        id_hash, path_hash = (j.result() for j in hash_jobs) if hash_jobs else (None, None)
    rej.add(bad_encoding, "bad_encoding", "transcript holds U+FFFD or mojibake; re-export the manifest as UTF-8")
    rej.add(n_chars == 0, "empty_text", "transcript is empty after normalisation")  # no non-space character left

    if clean_cfg.drop_duplicates:
        idx = np.flatnonzero(rej.alive())
        dup_id = ~_first_occurrences(utt_id, id_hash, idx)
        dup_path = ~_first_occurrences(audio_path, path_hash, idx)
        mask = np.zeros(n, dtype=bool)
        mask[idx[dup_id | dup_path]] = True
        by_id = np.zeros(n, dtype=bool)
        by_id[idx[dup_id]] = True
        rej.add(mask, "duplicate", lambda r: np.where(by_id[r], "utt_id already seen in an earlier row", "audio file already listed in an earlier row"))

    duration = rows.column("duration").to_numpy(zero_copy_only=False).astype(np.float64)
    sample_rate = np.zeros(n, dtype=np.int64)
    channels = np.zeros(n, dtype=np.int64)
    alive = rej.alive()
    need_probe = alive & (~np.isfinite(duration) if clean_cfg.trust_durations else True)
    idx = np.flatnonzero(need_probe)
    paths = audio_path.take(pa.array(idx)).to_pylist() if len(idx) else []
    infos = probe_many(paths, clean_cfg.probe_workers, progress=progress)
    probe_fail: dict[str, tuple[list[int], list[str]]] = {}
    for i, info in zip(idx.tolist(), infos):
        if info.reason:
            probe_fail.setdefault(info.reason, ([], []))
            probe_fail[info.reason][0].append(i)
            probe_fail[info.reason][1].append(info.detail)
        else:
            sample_rate[i], channels[i] = info.sample_rate, info.channels
            duration[i] = info.frames / info.sample_rate
    for reason in REASONS:  # probe failures are exclusive, so their order does not matter
        if reason in probe_fail:
            where, why = probe_fail[reason]
            mask = np.zeros(n, dtype=bool)
            mask[where] = True
            rej.add(mask, reason, lambda r, d=dict(zip(where, why)): [d[i] for i in r.tolist()])

    lo, hi = clean_cfg.min_duration, clean_cfg.max_duration
    lo_cps, hi_cps = clean_cfg.min_chars_per_second, clean_cfg.max_chars_per_second
    with np.errstate(invalid="ignore", divide="ignore"):
        rej.add(duration < lo, "too_short", lambda r: [f"{round(float(d), 3)} s < clean.min_duration {lo}" for d in duration[r]])
        rej.add(duration > hi, "too_long", lambda r: [f"{round(float(d), 3)} s > clean.max_duration {hi}" for d in duration[r]])
        cps = n_chars / np.where(duration > 0, duration, np.nan)
        rej.add((cps < lo_cps) | (cps > hi_cps), "chars_per_second", lambda r: [f"{round(float(c), 2)} chars/s outside [{lo_cps}, {hi_cps}]" for c in cps[r]])

    keep = rej.alive()
    # Boolean filters work chunk by chunk; ``take`` on a chunked column concatenates it first.
    keep_mask, rej_mask = pa.array(keep), pa.array(~keep)
    kept_ids = utt_id.filter(keep_mask)
    if id_hash is not None and not clean_cfg.split_salt:  # the duplicate check's hashes are the split's
        frac = (id_hash[keep] >> np.uint64(11)).astype(np.float64) / 2.0**53
    else:
        frac = stable_fraction(kept_ids, clean_cfg.split_salt)
    is_val = frac < clean_cfg.val_fraction
    if clean_cfg.val_fraction > 0 and len(frac) >= 2 and not is_val.any():
        is_val[np.argmin(frac)] = True  # a tiny corpus still gets one val utterance to report on
    probed = sample_rate[keep] > 0
    clean = pa.table(
        {
            "utt_id": kept_ids,
            "audio_path": audio_path.filter(keep_mask),
            "text": text.filter(keep_mask),
            "raw_text": rows.column("text").filter(keep_mask),
            "speaker": rows.column("speaker").filter(keep_mask),
            "language": rows.column("language").filter(keep_mask),
            "emotion": rows.column("emotion").filter(keep_mask),
            "duration": pa.array(duration[keep], type=pa.float64()),
            "sample_rate": pa.array(np.where(probed, sample_rate[keep], 0), type=pa.int32(), mask=~probed),
            "channels": pa.array(np.where(probed, channels[keep], 0), type=pa.int16(), mask=~probed),
            "split": pa.DictionaryArray.from_arrays(pa.array(is_val.astype(np.int8)), pa.array(["train", "val"])).cast(pa.string()),
        }
    )

    rej_rows = np.flatnonzero(~keep)
    rejects = pa.table(
        {
            "manifest": rows.column("manifest").filter(rej_mask).cast(pa.string()),
            "row": rows.column("row").filter(rej_mask),
            "utt_id": utt_id.filter(rej_mask),
            "audio": rows.column("audio").filter(rej_mask),
            "text": rows.column("text").filter(rej_mask),
            "speaker": rows.column("speaker").filter(rej_mask),
            "language": rows.column("language").filter(rej_mask),
            "emotion": rows.column("emotion").filter(rej_mask),
            "duration": rows.column("duration").filter(rej_mask),
            "reason": pa.array([REASONS[c] for c in rej.code[rej_rows].tolist()], type=pa.string()),
            "detail": pa.array(rej.detail_strings(rej_rows), type=pa.string()),
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
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CleanOutputs(out_dir / "clean.parquet", out_dir / "rejects.parquet", out_dir / "summary.json")
    # The summary's counts and the two Parquet encodings are independent: run them side by side.
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        jobs = [pool.submit(_write_parquet, clean, paths.clean), pool.submit(_write_parquet, rejects, paths.rejects)]
        summary = _summary(clean, rejects, n_input, per_manifest, clean_cfg)
        for j in jobs:
            j.result()
    write_json(paths.summary, summary)
    if clean.num_rows == 0:
        top = ", ".join(f"{k}: {v}" for k, v in summary["rejected_by_reason"].items() if v)
        raise ManifestError(f"no row survived cleaning ({top}); see {paths.rejects}")
    return paths


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _summary(clean: pa.Table, rejects: pa.Table, n_input: int, per_manifest: list[dict], cfg: CleanConfig) -> dict:
    counts = {r: 0 for r in REASONS}
    counts.update({str(k): int(v) for k, v in _value_counts(rejects.column("reason")).items()})
    dur = clean.column("duration").to_numpy()
    is_val = pc.equal(clean.column("split"), "val").to_numpy(zero_copy_only=False).astype(bool) if clean.num_rows else np.zeros(0, bool)
    speakers = clean.column("speaker")
    summary = {
        "input_rows": n_input,
        "kept": clean.num_rows,
        "rejected": rejects.num_rows,
        "reconciled": clean.num_rows + rejects.num_rows == n_input,
        "rejected_by_reason": counts,
        "hours_kept": round(float(dur.sum()) / 3600, 4),
        "hours_by_split": {"train": round(float(dur[~is_val].sum()) / 3600, 4), "val": round(float(dur[is_val].sum()) / 3600, 4)},
        "utterances_by_split": {"train": int((~is_val).sum()), "val": int(is_val.sum())},
        "speakers": pc.count_distinct(speakers).as_py() if clean.num_rows else 0,
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
