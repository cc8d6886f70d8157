"""clean_manifest: raw manifests in, ``clean.parquet`` + ``rejects.parquet`` + ``summary.json`` out.

Reads JSONL, CSV/TSV (with header) or Parquet manifests, several at once, with column names mapped
in config. Every input row ends up in exactly one of the two tables, so
``kept + rejected == input`` always holds (and ``summary.json`` says so). Each rejected row keeps
its source manifest, its row number, its raw fields, a reason code from a fixed vocabulary
(:data:`REASONS`) and a human-readable detail.

Audio paths. ``clean.parquet``'s ``audio_path`` is the path as the manifest wrote it, made
absolute: a relative path is joined to the manifest's folder, nothing else is changed. Symbolic
links and ``.``/``..`` are left as they are, because they are often deliberate: a link farm that
assembles a corpus, or a ``/data`` link that points at different storage on each cluster node
(resolving it would bake one node's mount into the table). The duplicate check, though, compares
*resolved* paths (:func:`resolve_paths`, the same as ``os.path.realpath``), so ``a/b.wav``,
``a/../a/b.wav`` and a symlink to it are one file: the first listing is kept, the later ones are
rejected as ``duplicate`` with a detail naming the earlier row and the resolved path.

How it runs (:func:`clean_manifest`): read (the JSONL file mapped into memory and parsed by
Arrow in blocks, in parallel; a block with a bad line is bisected until that line is isolated and
parsed with ``json.loads``) -> normalise (spans of rows in a thread pool, ahead of the checks:
polars and Arrow kernels release the GIL, see :mod:`indextts.text`) -> check (span after span in
row order) -> write (each span's kept rows become a row group of clean.parquet, encoded in a
thread of its own beside the normalisation of later spans; the transcripts uncompressed, see
:data:`CLEAN_UNCOMPRESSED`). The only per-row Python is the audio-header probe, in a thread pool
(soundfile releases the GIL; headers only, never samples). The train/val split hashes the kept
utt_ids with XXH64 (:func:`stable_fraction`, vectorised in :mod:`indextts.hashing`). Duplicates
are found exactly: rows are grouped by a 64-bit hash and every repeat is compared with its first
row's string. For corpora too large to probe, ``clean.trust_durations``
takes durations from the manifest.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import itertools
import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from indextts.config import get_section, load_config_arg, pairs
from indextts.files import parquet_writer, write_json, write_parquet
from indextts.hashing import xxh64
from indextts.text import TextConfig, count_chars, has_bad_encoding, normalize_array

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
    # Base-language manifests (languages the pretrained model speaks), each with its language:
    # cleaned, extracted and packed like the main data, flagged ``replay`` in clean.parquet, mixed
    # into training by ``train.stageN.replay_ratio``, never used to train the vocabulary.
    replay: tuple[str | ManifestSpec, ...] = ()
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
    # share of distinct (normalised) texts held out whole: every utterance of such a text is in
    # val, so the model never trains on it (the samples' `novel` kind reads new text)
    val_text_fraction: float = 0.0
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
_JSON_BLOCK_BYTES = 1 << 20
# Spans with at most this many lines are parsed line by line once Arrow has rejected them.
_JSON_SLOW_LINES = 64
# Lines of at most this many bytes may be blank (only ASCII whitespace); longer ones are rows.
_BLANK_MAX = 8


def _jsonl_schema(mapping: dict[str, str]) -> pa.Schema:
    return pa.schema([(mapping[c], pa.float64() if c == "duration" else pa.string()) for c in CANONICAL if mapping[c]])


@contextlib.contextmanager
def _jsonl_blocks(path: Path) -> Iterator[Iterator[memoryview]]:
    """The file's whole lines in blocks of about ``_JSON_BLOCK_BYTES``: views of the file mapped
    into memory (no copies), valid inside the ``with`` block."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield iter(())
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)

            def blocks() -> Iterator[memoryview]:
                start = 0
                while start < size:
                    end = min(start + _JSON_BLOCK_BYTES, size)
                    if end < size:
                        cut = mm.rfind(b"\n", start, end)
                        # One line longer than a block: the block reaches to that line's end.
                        end = cut + 1 if cut >= 0 else (mm.find(b"\n", end) + 1 or size)
                    yield view[start:end]
                    start = end

            try:
                yield blocks()
            finally:
                view.release()


@dataclass(frozen=True)
class _JsonFormat:
    """How Arrow parses one manifest's JSONL: the canonical columns and the parser options."""

    schema: pa.Schema
    parse: pajson.ParseOptions
    read: pajson.ReadOptions

    @classmethod
    def of(cls, mapping: dict[str, str]) -> _JsonFormat:
        schema = _jsonl_schema(mapping)
        return cls(
            schema,
            pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False),
            pajson.ReadOptions(use_threads=False, block_size=4 * _JSON_BLOCK_BYTES),
        )


@dataclass
class _Block:
    """One block of whole JSONL lines being parsed, and what parsing it has produced so far.
    Line numbers are 1-based within the block."""

    data: memoryview
    fmt: _JsonFormat
    starts: np.ndarray  # byte offset where each line starts
    ends: np.ndarray  # byte offset of each line's newline (or the block's end)
    blank: np.ndarray  # True for blank lines, which are not rows
    tables: list[pa.Table] = field(default_factory=list)  # parsed rows, with their line numbers
    malformed: list[dict] = field(default_factory=list)  # {row, detail} for lines no parser took

    @classmethod
    def index(cls, data: memoryview, fmt: _JsonFormat) -> _Block:
        """Find the block's lines (one vectorised pass over its bytes) and which are blank."""
        nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        starts = np.concatenate(([0], nl + 1))
        ends = np.concatenate((nl, [len(data)]))
        if len(data) and ends[-1] == starts[-1]:  # the empty string after a final newline is no line
            starts, ends = starts[:-1], ends[:-1]
        blank = np.zeros(len(starts), dtype=bool)
        for i in np.flatnonzero(ends - starts <= _BLANK_MAX):  # only short lines can be blank; check those
            blank[i] = not bytes(data[starts[i] : ends[i]]).strip()
        return cls(data, fmt, starts, ends, blank)


def _read_jsonl(path: Path, mapping: dict[str, str]) -> tuple[pa.Table, list[dict]]:
    """Parse a JSONL manifest with Arrow, block by block, blocks in parallel.

    A block that Arrow rejects (a malformed line, a number where a string was expected) is split
    in halves until the bad line is isolated in a span of at most ``_JSON_SLOW_LINES`` lines, which
    is parsed line by line with ``json.loads``: one bad line costs about one extra parse of its
    block, and it lands in the rejects instead of failing the whole file. Row numbers are physical
    1-based line numbers; blank lines are not rows.
    """
    fmt = _JsonFormat.of(mapping)
    workers = _workers()
    results: list[cf.Future] = []
    with _jsonl_blocks(path) as blocks, cf.ThreadPoolExecutor(max_workers=workers) as pool:
        window: collections.deque[cf.Future] = collections.deque()
        for data in blocks:
            fut = pool.submit(_parse_block, data, fmt)
            results.append(fut)
            window.append(fut)
            if len(window) > 4 * workers:  # bound the parsed blocks waiting in memory
                window.popleft().result()
        parsed = [fut.result() for fut in results]  # before the file's mapping closes
        data = None  # the last block's view must not outlive the mapping (Arrow copied the values)
    # Blocks number their lines from 1; shift them by the lines of the blocks before.
    tables: list[pa.Table] = []
    malformed: list[dict] = []
    lines_before = 0
    for block_tables, bad, n_lines in parsed:
        for t in block_tables:
            i = t.schema.get_field_index("row")
            tables.append(t.set_column(i, "row", pc.add(t.column(i), lines_before)))
        malformed += [{**b, "row": b["row"] + lines_before} for b in bad]
        lines_before += n_lines
    if not tables:
        return _empty_rows(fmt.schema), malformed
    return pa.concat_tables(tables), malformed


def _parse_block(data: memoryview, fmt: _JsonFormat) -> tuple[list[pa.Table], list[dict], int]:
    """Parse one block of whole lines. Returns its tables and malformed lines, numbered from 1
    within the block, and the block's number of lines (blank ones included).

    Arrow skips blank lines and reads two objects on one line as two rows, so its row count can
    match the line count by chance; its rows are taken as the block's lines only when no line is
    blank. Otherwise, or when Arrow rejects the block, the lines are parsed in ranges."""
    block = _Block.index(data, fmt)
    if not block.blank.any():
        table = _try_parse(data, 0, len(data), fmt)
        if table is not None and table.num_rows == len(block.starts):
            rows = np.arange(1, len(block.starts) + 1, dtype=np.int64)
            return [table.append_column("row", pa.array(rows))], [], len(block.starts)
    _parse_lines(block, 0, len(block.starts))
    return block.tables, block.malformed, len(block.starts)


def _try_parse(data: memoryview, lo: int, hi: int, fmt: _JsonFormat) -> pa.Table | None:
    try:
        return pajson.read_json(pa.BufferReader(pa.py_buffer(data[lo:hi])), read_options=fmt.read, parse_options=fmt.parse)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _parse_lines(block: _Block, a: int, b: int) -> None:
    """Parse lines ``[a, b)`` of ``block`` into it, bisecting around lines Arrow rejects."""
    rows = np.flatnonzero(~block.blank[a:b]) + a
    if not len(rows):
        return
    lo, hi = int(block.starts[a]), int(block.ends[b - 1])
    table = _try_parse(block.data, lo, hi, block.fmt)
    if table is not None and table.num_rows == len(rows):
        block.tables.append(table.append_column("row", pa.array(rows.astype(np.int64) + 1)))
        return
    if len(rows) <= _JSON_SLOW_LINES:
        table, bad = _parse_lines_slowly(bytes(block.data[lo:hi]), a, block.fmt.schema)
        block.tables.append(table)
        block.malformed.extend(bad)
        return
    mid = (a + b) // 2
    _parse_lines(block, a, mid)
    _parse_lines(block, mid, b)


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


def probe_many(paths: Sequence[str], workers: int, progress: bool = True, bar=None) -> list[AudioInfo]:
    """Probe headers in a thread pool, results in input order, with a progress bar (or advancing
    ``bar``, a tqdm bar the caller keeps across calls)."""
    from tqdm import tqdm

    if not paths:
        return []
    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = pool.map(probe_audio, paths, chunksize=64)
        if bar is None:
            it = tqdm(it, total=len(paths), desc="probing audio headers", unit="file", disable=not progress, mininterval=2.0, file=sys.stderr)
            return list(it)
        out = []
        for info in it:
            out.append(info)
            bar.update()
        return out


# --------------------------------------------------------------------------------------------
# Keys: utt_ids, audio paths, and which rows name the same utterance or the same file


def stable_hash64(keys: Iterable[str] | pa.Array | pa.ChunkedArray, salt: str = "") -> np.ndarray:
    """XXH64 (seed 0, as the ``xxhash`` package computes it) of the UTF-8 bytes of ``salt + key``,
    as ``uint64``.

    The same on every machine, process and Python version (unlike ``hash()``). Computed for all
    keys at once (:func:`indextts.hashing.xxh64`), not one Python call per key.

    Args:
        keys: strings (a Python iterable or an Arrow string array); no nulls.
        salt: prepended to every key before hashing.

    Returns:
        ``uint64`` array, one hash per key.

    Raises:
        ValueError: a key is null.
    """
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = pa.array(keys if isinstance(keys, list) else list(keys), type=pa.string())
    if keys.null_count:
        raise ValueError("stable_hash64: keys must not be null")
    flat = _flat(keys)
    if salt:
        flat = pc.binary_join_element_wise(salt, flat, "")
    return xxh64(flat)


def stable_fraction(keys: Iterable[str] | pa.Array | pa.ChunkedArray, salt: str = "") -> np.ndarray:
    """Map strings to [0, 1): the top 53 bits of :func:`stable_hash64` ``(salt + key)`` over 2**53.

    Identical on every machine, process and Python version (``hash()`` is salted per process, so
    it cannot decide a split). An utterance is in val when its fraction is below
    ``clean.val_fraction``.
    """
    return (stable_hash64(keys, salt) >> np.uint64(11)).astype(np.float64) / 2.0**53


def _absolute_paths(audio: pa.ChunkedArray, base_dir: str) -> pa.ChunkedArray:
    """Relative audio paths joined to the manifest's folder (absolute ones kept as written)."""
    is_abs = pc.starts_with(audio, "/")
    n_abs = pc.sum(is_abs).as_py() or 0
    if n_abs == len(audio):
        return audio
    joined = pc.binary_join_element_wise(base_dir, audio, "/")
    return joined if n_abs == 0 else pc.if_else(is_abs, audio, joined)


def resolve_paths(paths: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Each absolute path as ``os.path.realpath`` gives it: symbolic links followed, ``.``,
    ``..`` and repeated slashes collapsed; a path that names no file is resolved as far as it goes.

    Works per distinct folder: each is resolved once (its parents with it, see
    :func:`_resolve_folder`) and listed once for symlinked files, so 3M files in 20k folders
    cost some 20k ``lstat`` and ``readdir`` calls, not 3M ``realpath`` calls. The rows are taken
    in slices of ``_RESOLVE_ROWS``, so the split paths in flight stay a few tens of MB instead of
    ~0.5 GB for 3M paths. Returns ``paths`` itself when no path changes.

    Args:
        paths: absolute paths, no nulls.
    """
    folders = _Folders()
    out, changed = [], False
    for a in range(0, len(paths), _RESOLVE_ROWS):
        part = paths.slice(a, _RESOLVE_ROWS)
        flat = _flat(part)
        real = _resolve_slice(flat, folders)
        if real is flat:  # keep the slice, not its copy in one piece
            out += part.chunks if isinstance(part, pa.ChunkedArray) else [part]
        else:
            out.append(real)
            changed = True
    if not changed:
        return paths
    resolved = pa.chunked_array(out, type=pa.string())
    return resolved if isinstance(paths, pa.ChunkedArray) else resolved.combine_chunks()


# Rows per slice in resolve_paths.
_RESOLVE_ROWS = 1 << 18


@dataclass
class _Folders:
    """What :func:`resolve_paths` learns about folders, kept across its slices."""

    real: dict[str, str] = field(default_factory=dict)  # folder as written -> resolved (and each parent)
    links: dict[str, frozenset[str]] = field(default_factory=dict)  # resolved folder -> its symlinked names


def _resolve_slice(flat: pa.Array, folders: _Folders) -> pa.Array:
    """:func:`resolve_paths` for one slice of rows (not empty); ``flat`` itself when nothing changes."""
    parts = pc.split_pattern(flat, "/", max_splits=1, reverse=True)
    encoded = pc.dictionary_encode(pc.list_element(parts, 0))
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    written = [f or "/" for f in encoded.dictionary.to_pylist()]
    real = [_resolve_folder(f, folders.real) for f in written]
    for r in real:
        if r not in folders.links:
            folders.links[r] = _symlinked_names(r)
    one_by_one = np.array([bool(folders.links[r]) for r in real], dtype=bool)[codes]  # a symlinked file may be among them
    for tail in ("/", "/.", "/.."):  # names that are no file name
        one_by_one |= pc.ends_with(flat, tail).to_numpy(zero_copy_only=False)
    if real == written and not one_by_one.any():
        return flat
    names = pc.list_element(parts, 1)
    real_dirs = pa.array([r.rstrip("/") for r in real], type=pa.string()).take(pa.array(codes))  # "" + "/" + name for the root
    out = pc.binary_join_element_wise(real_dirs, names, "/")
    if one_by_one.any():
        rows = np.flatnonzero(one_by_one)
        fixed = []
        for i, name, path in zip(rows.tolist(), names.take(pa.array(rows)).to_pylist(), flat.take(pa.array(rows)).to_pylist()):
            folder = real[codes[i]]
            whole = name in ("", ".", "..") or name in folders.links[folder]
            fixed.append(os.path.realpath(path) if whole else folder.rstrip("/") + "/" + name)
        out = pc.replace_with_mask(out, pa.array(one_by_one), pa.array(fixed, type=pa.string()))
    return out


def _resolve_folder(path: str, cache: dict[str, str]) -> str:
    """``os.path.realpath`` of an absolute folder, each prefix resolved once: a corpus has few
    folders and they share their parents, so most folders cost a single ``lstat``."""
    if path in cache:
        return cache[path]
    head, _, name = path.rpartition("/")
    parent = _resolve_folder(head, cache) if head else "/"
    if name in ("", "."):
        real = parent
    elif name == "..":
        real = os.path.dirname(parent)  # the parent is already resolved, so its parent is the real one
    else:
        candidate = parent.rstrip("/") + "/" + name
        real = os.path.realpath(candidate) if os.path.islink(candidate) else candidate
    cache[path] = real
    return real


def _symlinked_names(folder: str) -> frozenset[str]:
    """Names of the symbolic links in ``folder``: one ``readdir``, whose entry types say which are
    links (none when the folder cannot be read)."""
    try:
        with os.scandir(folder) as entries:
            return frozenset(e.name for e in entries if e.is_symlink())
    except OSError:
        return frozenset()


def _groups(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A number per row, equal exactly where the keys are equal.

    Rows are grouped by a 64-bit hash (:func:`_hash64`), and every row whose hash an earlier row
    had is compared with that row's string; should two different keys ever share a hash, those
    groups are split string by string. So a collision costs time, never a wrong duplicate.
    """
    import pandas as pd

    # A chunked array is hashed and gathered from chunk by chunk, never first copied into one piece.
    codes = pd.factorize(_hash64(keys))[0].astype(np.int64)  # numbered in order of first appearance
    if not len(codes):
        return codes
    top = np.maximum.accumulate(codes)
    is_first = np.concatenate(([True], top[1:] > top[:-1]))
    first = np.flatnonzero(is_first)  # first[c]: the first row of group c
    later = np.flatnonzero(~is_first)
    if len(later):
        series = pl.from_arrow(keys, rechunk=False)  # polars gathers from chunks; Arrow's take would join them first
        same = (series.gather(later) == series.gather(first[codes[later]])).to_numpy()
        if not same.all():
            rows = np.flatnonzero(np.isin(codes, np.unique(codes[later[~same]])))
            first_key: dict[int, str] = {}
            split: dict[tuple[int, str], int] = {}
            for i, c, k in zip(rows.tolist(), codes[rows].tolist(), series.gather(rows).to_list()):
                if first_key.setdefault(c, k) != k:
                    codes[i] = split.setdefault((c, k), len(codes) + len(split))
    return codes


def _hash64(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash per string (polars' hash: fast, but its values may change between polars
    versions, so it only groups rows within one run; the split uses :func:`stable_hash64`)."""
    return pl.from_arrow(keys, rechunk=False).hash(seed=0).to_numpy()


def _flat(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(arr, pa.Array):
        return arr
    return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()


def _blank(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Null, empty or only whitespace."""
    empty = pc.or_(pc.equal(pc.utf8_length(col), 0), pc.utf8_is_space(col))
    return pc.fill_null(empty, True).to_numpy(zero_copy_only=False).astype(bool)


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Cleaning: read -> normalise -> check -> write, span after span of rows

# Rows per span: the unit that is normalised in the pool, checked, and written as a row group.
_SPAN_ROWS = 1 << 18

CLEAN_SCHEMA = pa.schema(
    [
        ("utt_id", pa.string()),
        ("audio_path", pa.string()),
        ("text", pa.string()),
        ("raw_text", pa.string()),
        ("speaker", pa.string()),
        ("language", pa.string()),
        ("emotion", pa.string()),
        ("duration", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("replay", pa.bool_()),  # a base-language row of data.replay (not the new language)
        ("split", pa.string()),
    ]
)
# Columns with few distinct values: dictionary encoding shrinks them; on the unique strings of
# the other columns Arrow would build a dictionary, find it too large and drop it.
_CLEAN_DICTIONARY = ("speaker", "language", "emotion", "split")
# The transcripts are stored uncompressed: zstd on them took 4.5 of the ~6.5 CPU-seconds of
# writing a 3M-row clean.parquet (160 MB/s on the benchmark machine) for a file 2.4x smaller
# (387 MB instead of 935 MB), while later stages read them faster without it. Every other
# column is zstd.
CLEAN_UNCOMPRESSED = ("text", "raw_text")
# Min/max statistics for the columns a reader might filter on; not for the transcripts.
_CLEAN_STATISTICS = ("utt_id", "audio_path", "speaker", "language", "emotion", "duration", "sample_rate", "channels", "split")


def write_clean_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write rows of clean.parquet (:data:`CLEAN_SCHEMA`) with the settings cleaning writes them
    with, atomically; for steps that take rows out of a clean table (the ASR filter)."""
    if "replay" not in table.column_names:  # a table of a clean.parquet written before replay existed
        table = table.append_column("replay", pa.array(np.zeros(table.num_rows, dtype=bool)))
    with parquet_writer(path, CLEAN_SCHEMA, dictionary=_CLEAN_DICTIONARY, statistics=_CLEAN_STATISTICS, uncompressed=CLEAN_UNCOMPRESSED) as writer:
        writer.write_table(table.select(CLEAN_SCHEMA.names).cast(CLEAN_SCHEMA), row_group_size=_SPAN_ROWS)
    return Path(path)


@dataclass(frozen=True)
class _Rows:
    """Step 1's result: every parsed row of every manifest."""

    table: pa.Table  # manifest (dictionary-encoded path), row (1-based), the canonical fields
    folders: list[tuple[str, int]]  # (folder, parsed rows) of each manifest: relative audio paths start there
    malformed: list[dict]  # {manifest, row, reason, detail} for lines that could not be parsed
    manifests: list[dict]  # {path, rows, malformed} per manifest, for summary.json


@dataclass(frozen=True)
class _Keys:
    """The absolute audio paths, and what the duplicate check compares, for every row."""

    audio_path: pa.ChunkedArray  # the absolute audio path of each row, as written
    utt_id: pa.ChunkedArray  # the given id, or the audio path without its extension
    id_group: np.ndarray | None  # equal numbers for equal utt_ids (None: clean.drop_duplicates off)
    file_group: np.ndarray | None  # equal numbers for paths that resolve to the same file
    resolved: pa.Array | pa.ChunkedArray | None  # the resolved audio paths


@dataclass(frozen=True)
class _Texts:
    """Step 2's result for one span."""

    text: pa.Array  # normalised transcripts; null where the transcript is null
    n_chars: np.ndarray  # characters other than spaces (float64, 0 for null)
    bad_encoding: np.ndarray  # U+FFFD or mojibake in the raw transcript


@dataclass(frozen=True)
class _Verdict:
    """Step 3's result for one span: which rows are kept, and the durations the checks used."""

    keep: np.ndarray
    duration: np.ndarray  # seconds: probed, or from the manifest
    sample_rate: np.ndarray  # 0 where not probed
    channels: np.ndarray


def clean_manifest(
    data_cfg: DataConfig,
    text_cfg: TextConfig,
    clean_cfg: CleanConfig,
    out_dir: str | os.PathLike,
    manifests: Sequence[str | ManifestSpec] | None = None,
    progress: bool = True,
    clean_path: str | os.PathLike | None = None,
) -> CleanOutputs:
    """Clean and concatenate manifests.

    Four steps: read every manifest (:func:`_read`); normalise the transcripts, span by span in a
    thread pool ahead of the checks (:func:`_normalise`); check each span in row order
    (:class:`_Check`); write its kept rows to clean.parquet as a row group while later spans are
    still being normalised (:class:`_CleanFile`), then rejects.parquet and summary.json.

    Args:
        data_cfg, text_cfg, clean_cfg: the ``data``, ``text`` and ``clean`` sections.
        out_dir: folder for ``clean.parquet``, ``rejects.parquet`` and ``summary.json``.
        manifests: overrides ``data_cfg.manifests`` when given.
        progress: show a progress bar while probing.
        clean_path: where the clean table goes instead of ``out_dir/clean.parquet`` (with
            ``asr_filter.enabled``, ``pre_asr.parquet``: the ASR filter writes clean.parquet).

    Returns:
        The three output paths.

    Raises:
        ManifestError: a manifest is missing or lacks a required column, or no row survives.
    """
    specs = [_spec(m) for m in (manifests if manifests is not None else data_cfg.manifests)]
    if not specs:
        raise ManifestError("data.manifests is empty: list at least one manifest file")
    replay = [_spec(m) for m in data_cfg.replay]
    for spec in replay:
        if not spec.language:
            raise ManifestError(f"{spec.path}: data.replay entries need their language, e.g. "
                                f"{{path: {spec.path}, language: zh}}")
    out_dir = Path(out_dir)
    out = CleanOutputs(Path(clean_path) if clean_path else out_dir / "clean.parquet", out_dir / "rejects.parquet", out_dir / "summary.json")

    rows = _read(specs, data_cfg.columns, text_cfg.language, replay)
    spans = [(a, min(a + _SPAN_ROWS, rows.table.num_rows)) for a in range(0, rows.table.num_rows, _SPAN_ROWS)]
    raw_text = rows.table.column("text")
    with cf.ThreadPoolExecutor(max_workers=_workers()) as pool:
        keys = pool.submit(_keys, rows, clean_cfg)  # beside the first spans' normalisation
        texts = _in_order(pool, [lambda a=a, b=b: _normalise(_flat(raw_text.slice(a, b - a)), text_cfg) for a, b in spans])
        check = _Check(rows, keys.result(), data_cfg.columns, clean_cfg, progress)
        with parquet_writer(out.clean, CLEAN_SCHEMA, dictionary=_CLEAN_DICTIONARY, statistics=_CLEAN_STATISTICS, uncompressed=CLEAN_UNCOMPRESSED) as writer:
            clean = _CleanFile(writer, clean_cfg)
            try:
                for (a, b), span_texts in zip(spans, texts):
                    verdict = check.span(a, b, span_texts)
                    clean.add(_kept_rows(rows, check.keys, a, b, span_texts, verdict))
                clean.finish()
                rejects = check.rejects()  # while the last row groups are being written
            finally:
                clean.close()  # every row group written (or failed) before the writer closes
    write_parquet(rejects, out.rejects)
    summary = _summary(clean.tally, rejects, rows.table.num_rows + len(rows.malformed), rows.manifests, clean_cfg)
    write_json(out.summary, summary)
    if summary["kept"] == 0:
        top = ", ".join(f"{k}: {v}" for k, v in summary["rejected_by_reason"].items() if v)
        raise ManifestError(f"no row survived cleaning ({top}); see {out.rejects}")
    return out


def _read(specs: Sequence[ManifestSpec], columns: Columns, default_language: str,
          replay: Sequence[ManifestSpec] = ()) -> _Rows:
    """Step 1: read every manifest (:func:`read_manifest`), the replay ones flagged, and
    concatenate them."""
    tables, folders, malformed, manifests = [], [], [], []
    for spec, is_replay in [(s, False) for s in specs] + [(s, True) for s in replay]:
        table, bad = read_manifest(spec, columns, default_language)
        table = table.append_column("replay", pa.array(np.full(table.num_rows, is_replay)))
        tables.append(table)
        folders.append((str(Path(spec.path).resolve().parent), table.num_rows))
        malformed += [{"manifest": str(spec.path), "row": b["row"], "reason": "malformed", "detail": b["detail"]} for b in bad]
        manifests.append({"path": str(spec.path), "rows": table.num_rows + len(bad), "malformed": len(bad)})
    return _Rows(pa.concat_tables(tables), folders, malformed, manifests)


def _keys(rows: _Rows, cfg: CleanConfig) -> _Keys:
    """Absolute audio paths and utt_ids for every row, and the groups the duplicate check
    compares. Runs in the pool, beside the first spans' normalisation."""
    audio = pc.fill_null(rows.table.column("audio"), "")
    starts = itertools.accumulate([n for _, n in rows.folders], initial=0)
    audio_path = pa.chunked_array(
        [c for (folder, n), a in zip(rows.folders, starts) for c in _absolute_paths(audio.slice(a, n), folder).chunks], type=pa.string()
    )
    ids_given = rows.table.column("id")
    no_id = _blank(ids_given)
    utt_id = ids_given
    if no_id.any():  # derive the id from the audio path without its extension
        derived = pc.replace_substring_regex(audio.filter(pa.array(no_id)), pattern=r"\.[A-Za-z0-9]+$", replacement="")
        utt_id = pa.chunked_array([pc.replace_with_mask(pc.fill_null(_flat(ids_given), ""), pa.array(no_id), _flat(derived))])
    if not cfg.drop_duplicates:
        return _Keys(audio_path, utt_id, None, None, None)
    resolved = resolve_paths(audio_path)
    return _Keys(audio_path, utt_id, _groups(utt_id), _groups(resolved), resolved)


def _normalise(raw: pa.Array, cfg: TextConfig) -> _Texts:
    """Step 2, for one span: :func:`normalize_array`, lengths and the mojibake check. Runs in a
    thread pool: polars' and Arrow's kernels release the GIL."""
    text = normalize_array(raw, cfg)
    n_chars = count_chars(text).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = pc.fill_null(has_bad_encoding(raw), False).to_numpy(zero_copy_only=False).astype(bool)
    return _Texts(text, n_chars, bad)


def _in_order(pool: cf.Executor, jobs: Sequence, ahead: int | None = None) -> Iterator:
    """Results of ``jobs`` (callables) in order. ``ahead`` of them are submitted to ``pool`` at
    once, and one more each time a result is taken, so the pool works ahead of the consumer
    without holding every result in memory."""
    ahead = ahead or 2 * _workers() + 1
    queue = iter(jobs)
    pending = collections.deque(pool.submit(job) for job in itertools.islice(queue, ahead))

    def results() -> Iterator:
        while pending:
            fut = pending.popleft()
            job = next(queue, None)
            if job is not None:
                pending.append(pool.submit(job))
            yield fut.result()

    return results()


class _Check:
    """Step 3: the checks of :data:`REASONS`, span after span in row order.

    Each row gets the first reason it fails, as a small-int code in one array for the whole
    corpus; details are strings built only for rejected rows. A row is a duplicate when an
    earlier row that reached the duplicate check had the same utt_id or the same audio file
    (paths compared resolved, see :func:`resolve_paths`); the detail names that earlier row.
    """

    def __init__(self, rows: _Rows, keys: _Keys, columns: Columns, cfg: CleanConfig, progress: bool):
        self.rows, self.keys, self.columns, self.cfg = rows, keys, columns, cfg
        self.code = np.full(rows.table.num_rows, -1, dtype=np.int8)
        self.details: list[tuple[np.ndarray, list[str]]] = []  # (rows, detail per row)
        # For each utt_id / file group: the first row that reached the duplicate check with it.
        self.owner = {}
        if keys.id_group is not None:
            self.owner = {
                "utt_id": np.full(int(keys.id_group.max(initial=-1)) + 1, -1, dtype=np.int64),
                "file": np.full(int(keys.file_group.max(initial=-1)) + 1, -1, dtype=np.int64),
            }
        self.progress, self.bar = progress, None  # one bar over every span's probing, made when needed

    def span(self, a: int, b: int, texts: _Texts) -> _Verdict:
        table = self.rows.table.slice(a, b - a)
        code = self.code[a:b]  # a view: the span's codes land in the corpus-wide array

        def reject(mask: np.ndarray, reason: str, detail) -> None:
            """``detail``: a string, or a function of the rejected rows (span-local) -> strings."""
            rows = np.flatnonzero(mask & (code < 0))
            if len(rows):
                code[rows] = REASONS.index(reason)
                self.details.append((rows + a, [detail] * len(rows) if isinstance(detail, str) else list(detail(rows))))

        for c in REQUIRED:
            col = table.column(c)
            mask = pc.is_null(col).to_numpy(zero_copy_only=False) if c == "text" else _blank(col)
            reject(mask, "missing_field", f"no {c} (column {getattr(self.columns, c)!r})")
        reject(texts.bad_encoding, "bad_encoding", "transcript holds U+FFFD or mojibake; re-export the manifest as UTF-8")
        reject(texts.n_chars == 0, "empty_text", "transcript is empty after normalisation")  # no non-space character left
        if self.owner:
            self._duplicates(a, code, reject)
        duration, sample_rate, channels = self._durations(a, table, code, reject)

        lo, hi = self.cfg.min_duration, self.cfg.max_duration
        lo_cps, hi_cps = self.cfg.min_chars_per_second, self.cfg.max_chars_per_second
        with np.errstate(invalid="ignore", divide="ignore"):
            reject(duration < lo, "too_short", lambda r: [f"{round(float(d), 3)} s < clean.min_duration {lo}" for d in duration[r]])
            reject(duration > hi, "too_long", lambda r: [f"{round(float(d), 3)} s > clean.max_duration {hi}" for d in duration[r]])
            cps = texts.n_chars / np.where(duration > 0, duration, np.nan)
            reject((cps < lo_cps) | (cps > hi_cps), "chars_per_second", lambda r: [f"{round(float(c), 2)} chars/s outside [{lo_cps}, {hi_cps}]" for c in cps[r]])
        return _Verdict(code < 0, duration, sample_rate, channels)

    def _duplicates(self, a: int, code: np.ndarray, reject) -> None:
        alive = np.flatnonzero(code < 0)
        rows = a + alive
        dup, earlier = {}, {}
        for name, groups in (("utt_id", self.keys.id_group), ("file", self.keys.file_group)):
            g = groups[rows]
            owner = self.owner[name]
            uniq, first = np.unique(g, return_index=True)  # each group's first row in this span
            seen = owner[g]
            earlier[name] = np.where(seen >= 0, seen, rows[first][np.searchsorted(uniq, g)])
            dup[name] = earlier[name] != rows
            new = owner[uniq] < 0
            owner[uniq[new]] = rows[first[new]]
        mask = np.zeros(len(code), dtype=bool)
        mask[alive[dup["utt_id"] | dup["file"]]] = True

        def detail(local: np.ndarray) -> list[str]:
            pos = np.searchsorted(alive, local)
            out = []
            for p in pos.tolist():
                if dup["utt_id"][p]:
                    out.append(f"utt_id already seen in an earlier row ({self._where(int(earlier['utt_id'][p]))})")
                else:
                    first, this = int(earlier["file"][p]), int(rows[p])
                    written = self.keys.audio_path[first].as_py(), self.keys.audio_path[this].as_py()
                    same = "" if written[0] == written[1] else f"; both are {self.keys.resolved[this].as_py()}"
                    out.append(f"audio file already listed in an earlier row ({self._where(first)}{same})")
            return out

        reject(mask, "duplicate", detail)

    def _where(self, i: int) -> str:
        return f"row {self.rows.table.column('row')[i].as_py()} of {self.rows.table.column('manifest')[i].as_py()}"

    def _durations(self, a: int, table: pa.Table, code: np.ndarray, reject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Durations from the manifest (``clean.trust_durations``) or from probing the audio
        headers of the rows still alive; probe failures are rejected here."""
        duration = table.column("duration").to_numpy(zero_copy_only=False).astype(np.float64)
        n = len(duration)
        sample_rate = np.zeros(n, dtype=np.int64)
        channels = np.zeros(n, dtype=np.int64)
        need = (code < 0) & (~np.isfinite(duration) if self.cfg.trust_durations else True)
        idx = np.flatnonzero(need)
        paths = _flat(self.keys.audio_path.slice(a, n)).take(pa.array(idx)).to_pylist() if len(idx) else []
        if paths and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="probing audio headers", unit="file", disable=not self.progress, mininterval=2.0, file=sys.stderr)
        failed: dict[str, dict[int, str]] = {}
        for i, info in zip(idx.tolist(), probe_many(paths, self.cfg.probe_workers, bar=self.bar)):
            if info.reason:
                failed.setdefault(info.reason, {})[i] = info.detail
            else:
                sample_rate[i], channels[i] = info.sample_rate, info.channels
                duration[i] = info.frames / info.sample_rate
        for reason, why in failed.items():  # probe failures are exclusive: their order does not matter
            mask = np.zeros(n, dtype=bool)
            mask[list(why)] = True
            reject(mask, reason, lambda r, why=why: [why[i] for i in r.tolist()])
        return duration, sample_rate, channels

    def rejects(self) -> pa.Table:
        """rejects.parquet: every rejected row (its raw fields, reason and detail), with the
        malformed lines, in manifest and row order."""
        if self.bar is not None:
            self.bar.close()
        t, is_rej = self.rows.table, self.code >= 0
        mask = pa.array(is_rej)
        rows = np.concatenate([r for r, _ in self.details]) if self.details else np.zeros(0, dtype=np.int64)
        details = np.array([d for _, ds in self.details for d in ds], dtype=object)[np.argsort(rows, kind="stable")]
        rejects = pa.table(
            {
                "manifest": t.column("manifest").filter(mask).cast(pa.string()),
                "row": t.column("row").filter(mask),
                "utt_id": self.keys.utt_id.filter(mask),
                **{c: t.column(c).filter(mask) for c in ("audio", "text", "speaker", "language", "emotion", "duration")},
                "reason": pa.array([REASONS[c] for c in self.code[is_rej].tolist()], type=pa.string()),
                "detail": pa.array(details.tolist(), type=pa.string()),
            }
        )
        if self.rows.malformed:
            bad = self.rows.malformed
            malformed = pa.table(
                {
                    "manifest": pa.array([b["manifest"] for b in bad], pa.string()),
                    "row": pa.array([b["row"] for b in bad], pa.int64()),
                    "reason": pa.array([b["reason"] for b in bad], pa.string()),
                    "detail": pa.array([b["detail"] for b in bad], pa.string()),
                }
            )
            rejects = pa.concat_tables([malformed, rejects], promote_options="default").select(rejects.column_names)
            rejects = rejects.sort_by([("manifest", "ascending"), ("row", "ascending")])
        return rejects


def _kept_rows(rows: _Rows, keys: _Keys, a: int, b: int, texts: _Texts, verdict: _Verdict) -> pa.Table:
    """The span's kept rows in clean.parquet's columns (all but ``split``)."""
    keep, mask = verdict.keep, pa.array(verdict.keep)
    span = rows.table.slice(a, b - a)
    probed = verdict.sample_rate[keep] > 0
    columns = {
        "utt_id": keys.utt_id.slice(a, b - a).filter(mask),
        "audio_path": keys.audio_path.slice(a, b - a).filter(mask),
        "text": texts.text.filter(mask),
        "raw_text": span.column("text").filter(mask),
        "speaker": span.column("speaker").filter(mask),
        "language": span.column("language").filter(mask),
        "emotion": span.column("emotion").filter(mask),
        "duration": pa.array(verdict.duration[keep], type=pa.float64()),
        "sample_rate": pa.array(np.where(probed, verdict.sample_rate[keep], 0), type=pa.int32(), mask=~probed),
        "channels": pa.array(np.where(probed, verdict.channels[keep], 0), type=pa.int16(), mask=~probed),
        "replay": span.column("replay").filter(mask),
    }
    return pa.table(columns)


class _CleanFile:
    """Step 4: clean.parquet, one row group per span, written in a thread of its own while the
    next spans are checked and normalised (zstd compression is single-threaded and releases the
    GIL; this way it runs beside the other work instead of after it).

    The split is decided here: val when :func:`stable_fraction` of the utt_id is below
    ``clean.val_fraction``, or that of the normalised text below ``clean.val_text_fraction``
    (every utterance of a held-out text). A corpus whose kept rows all land in train still gets one val
    utterance (the one with the smallest fraction), so spans are held back until a val row has
    been seen and that can no longer happen.
    """

    # Row groups handed to the writing thread and not yet written: bounds the memory they hold,
    # and what is left to write once the last span is checked.
    _PENDING = 1

    def __init__(self, writer: pq.ParquetWriter, cfg: CleanConfig):
        self.writer, self.cfg = writer, cfg
        self.held: list[tuple[pa.Table, np.ndarray]] = []  # (kept rows, split fractions)
        self.any_val = cfg.val_fraction <= 0  # nothing to guarantee then
        self.tally = _Tally()
        self.thread = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="clean-parquet")
        self.pending: collections.deque[cf.Future] = collections.deque()

    def add(self, table: pa.Table) -> None:
        frac = stable_fraction(table.column("utt_id"), self.cfg.split_salt)
        if self.cfg.val_text_fraction > 0:
            # a held-out text's utterances get a fraction below any val_fraction: val
            text = stable_fraction(table.column("text"), "text:" + self.cfg.split_salt)
            frac = np.where(text < self.cfg.val_text_fraction, -1.0, frac)
        self.held.append((table, frac))
        self.any_val = self.any_val or bool((frac < self.cfg.val_fraction).any())
        if self.any_val:
            self._flush()

    def finish(self) -> None:
        """Hand over what is held back (:meth:`close` waits for it to be written)."""
        fracs = [f for _, f in self.held]
        if sum(len(f) for f in fracs) >= 2 and not self.any_val:
            flat = np.concatenate(fracs)
            flat[np.argmin(flat)] = -1.0  # below any val_fraction: a tiny corpus still gets one val utterance
            self.held = [(t, f) for (t, _), f in zip(self.held, np.split(flat, np.cumsum([len(f) for f in fracs])[:-1]))]
        self._flush()

    def close(self) -> None:
        """Wait for the row groups handed over (raising the first error), then stop the thread."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.thread.shutdown(wait=True, cancel_futures=True)

    def _flush(self) -> None:
        for table, frac in self.held:
            is_val = frac < self.cfg.val_fraction
            split = pa.DictionaryArray.from_arrays(pa.array(is_val.astype(np.int8)), pa.array(["train", "val"])).cast(pa.string())
            table = table.append_column("split", split).cast(CLEAN_SCHEMA)
            while len(self.pending) >= self._PENDING:
                self.pending.popleft().result()
            self.pending.append(self.thread.submit(self.writer.write_table, table))
            self.tally.add(table, is_val)
        self.held = []


@dataclass
class _Tally:
    """What summary.json counts of the kept rows, gathered span by span as they are written
    (beside the other work, not after it)."""

    durations: list[np.ndarray] = field(default_factory=list)
    is_val: list[np.ndarray] = field(default_factory=list)
    speakers: set = field(default_factory=set)
    languages: dict = field(default_factory=dict)  # value -> count, in order of first appearance
    emotions: dict = field(default_factory=dict)
    probed: int = 0

    def add(self, table: pa.Table, is_val: np.ndarray) -> None:
        self.durations.append(table.column("duration").to_numpy())
        self.is_val.append(is_val)
        self.speakers.update(pc.unique(table.column("speaker")).to_pylist())
        for name, counts in (("language", self.languages), ("emotion", self.emotions)):
            for value, n in _value_counts(table.column(name)).items():
                counts[value] = counts.get(value, 0) + n
        self.probed += table.num_rows - table.column("sample_rate").null_count


def _summary(tally: _Tally, rejects: pa.Table, n_input: int, per_manifest: list[dict], cfg: CleanConfig) -> dict:
    counts = {r: 0 for r in REASONS}
    counts.update({str(k): int(v) for k, v in _value_counts(rejects.column("reason")).items()})
    dur = np.concatenate(tally.durations) if tally.durations else np.zeros(0)
    is_val = np.concatenate(tally.is_val) if tally.is_val else np.zeros(0, dtype=bool)
    kept = len(dur)
    summary = {
        "input_rows": n_input,
        "kept": kept,
        "rejected": rejects.num_rows,
        "reconciled": kept + rejects.num_rows == n_input,
        "rejected_by_reason": counts,
        "hours_kept": round(float(dur.sum()) / 3600, 4),
        "hours_by_split": {"train": round(float(dur[~is_val].sum()) / 3600, 4), "val": round(float(dur[is_val].sum()) / 3600, 4)},
        "utterances_by_split": {"train": int((~is_val).sum()), "val": int(is_val.sum())},
        "speakers": len(tally.speakers),
        "languages": tally.languages,
        "emotions": tally.emotions,
        "durations_probed": tally.probed,
        "durations_from_manifest": kept - tally.probed,
        "manifests": per_manifest,
    }
    if not summary["reconciled"]:  # a bug, not bad input: never write a summary that hides rows
        raise AssertionError(f"kept {kept} + rejected {rejects.num_rows} != input {n_input}")
    return summary


def _value_counts(col: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Counts per value (null counted as "None"), in order of first appearance."""
    vc = pc.value_counts(col)
    return {str(v["values"]): int(v["counts"]) for v in vc.to_pylist()}


def load_configs(raw: dict) -> tuple[DataConfig, TextConfig, CleanConfig]:
    """Parse the ``data``, ``text`` and ``clean`` sections of a config mapping."""
    return get_section(DataConfig, raw, "data"), get_section(TextConfig, raw, "text"), get_section(CleanConfig, raw, "clean")


def cli_clean_manifest(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="indextts clean-manifest", description=clean_manifest.__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="inline JSON or a YAML file with data/text/clean sections")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--clean", type=Path, help="the clean table (default OUT_DIR/clean.parquet; with the ASR filter on, its input)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("manifests", nargs="*", help="override data.manifests")
    args = p.parse_args(argv)
    data_cfg, text_cfg, clean_cfg = load_configs(load_config_arg(args.config))
    try:
        out = clean_manifest(data_cfg, text_cfg, clean_cfg, args.out_dir, manifests=args.manifests or None, progress=not args.no_progress,
                             clean_path=args.clean)
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
