"""The training data cache: code shards and their tokenised text as numpy files in the page cache.

The Parquet shards (:mod:`indextts.codes`) stay the exchange format for users and tools. Training
reads this derived cache instead, which Snakemake owns like any other output::

    codes/pack/                     pack_codes: every shard of codes/index.json, in index order
        pack.json                   what it was made from (index and clean sha256), n_q, rows, splits
        codes.npy                   int16: each utterance's [n_q, T] codes row-major, back to back
        codes_offsets.npy           int64 [rows + 1]: utterance r is codes[off[r] : off[r + 1]]
        n_frames.npy                int32 [rows]
        speaker.npy                 int32 [rows]: index into the speaker names
        split.npy                   int8 [rows]: index into pack.json's splits; -1 when not known
        language.npy                int16 [rows]: index into pack.json's languages; -1 when not known
        replay.npy                  bool [rows]: a base-language row (clean.parquet's ``replay``)
        has_emotion.npy             bool [rows]: an emotion label is set
        utt_id, audio_path, text,   uint8 UTF-8 strings back to back, each with its
        speaker_names (.npy)        <name>_offsets.npy (int64 [count + 1])
    tokens/                         tokenize_text: the pack's text under one vocabulary
        tokens.json                 the pack and the vocabulary (sha256) they were made from
        ids.npy, ids_offsets.npy    int32 text ids back to back; int64 [rows + 1]
        unk.npy                     int32 [rows]: <unk> ids per utterance

Rows are in shard order, each shard in its own order (sorted by utt_id). Codes do not depend on
the vocabulary and the tokens do not depend on the codec: a vocabulary change re-tokenises (a
few seconds per million utterances) and leaves the codes alone.

Why this layout: a dataset that reads whole shards into each process holds a private copy of
every row per rank, and its DataLoader workers copy the pages of the Python objects whose
reference counts they touch. Here a process holds no per-row Python object. It reads the
per-utterance arrays once, by mapping them, to choose its items (numpy), and reads one item's
codes, text ids and strings by offset (``pread``) through the page cache, which every rank and
worker on a node shares. The bulk is read, not mapped, on purpose: a mapped page a worker touches
stays in its resident set (with the kernel's fault-around, 64 KiB per touch), which RSS-based
memory accounting such as SLURM's charges to each process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from indextts.files import sha256_file

PACK_FORMAT = 1
TOKENS_FORMAT = 1
PACK_JSON = "pack.json"
TOKENS_JSON = "tokens.json"
_STRINGS = ("utt_id", "audio_path", "text")


class DataError(ValueError):
    """The training data cannot be used as configured; the message names the file or column."""


def release_freed_memory() -> None:
    """Hand the heap pages of freed temporaries back to the system (glibc only; else nothing).
    glibc raises its mmap threshold to the largest block freed, so the next big numpy
    temporaries land on the heap and stay in the process's private memory after they are freed:
    ~60 MB of a rank's ~150 MB after opening 3.5M utterances and planning an epoch."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# .npy files written in a stream


def _npy_header(dtype: np.dtype, n: int, size: int | None = None) -> bytes:
    """A version 1.0 ``.npy`` header for a 1-D array of ``n`` ``dtype`` values, padded to ``size``
    bytes (default: the next multiple of 64, as numpy writes it)."""
    d = "{'descr': %r, 'fortran_order': False, 'shape': (%d,), }" % (np.lib.format.dtype_to_descr(np.dtype(dtype)), n)
    if size is None:
        size = -(-(10 + len(d) + 1) // 64) * 64
    body = d.ljust(size - 10 - 1) + "\n"
    if len(body) + 10 != size:
        raise ValueError(f"a header for shape ({n},) does not fit in {size} bytes")
    return b"\x93NUMPY\x01\x00" + (size - 10).to_bytes(2, "little") + body.encode("latin1")


class _NpyWriter:
    """Append 1-D chunks of one dtype to an ``.npy`` file whose length is known only at the end:
    the header is reserved at the size the largest shape needs and rewritten by :meth:`close`."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.n = path, np.dtype(dtype), 0
        self._size = len(_npy_header(self.dtype, 10**18))
        self._f = open(path, "wb")
        self._f.write(b"\0" * self._size)

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._f.write(memoryview(values).cast("B"))
        self.n += values.size

    def close(self) -> None:
        self._f.seek(0)
        self._f.write(_npy_header(self.dtype, self.n, self._size))
        self._f.close()


def _save(folder: Path, name: str, values: np.ndarray) -> None:
    np.save(folder / f"{name}.npy", np.ascontiguousarray(values), allow_pickle=False)


def _npy_layout(path: Path) -> tuple[np.dtype, int, int]:
    """(dtype, length, byte offset of the data) of a 1-D ``.npy`` file."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if len(shape) != 1 or fortran:
            raise DataError(f"{path}: expected a 1-D array, found shape {shape}")
        return dtype, int(shape[0]), f.tell()


class _Column:
    """One ``.npy`` file read by offset (``os.pread``), never mapped: a read allocates only its
    own result, and the pages it reads stay in the shared page cache. Picklable (each process
    opens the file itself)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.dtype, self.size, self._base = _npy_layout(self.path)
        self._fd: int | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` as a new array."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        n = (stop - start) * self.dtype.itemsize
        buf = os.pread(self._fd, n, self._base + start * self.dtype.itemsize)
        if len(buf) != n:
            raise DataError(f"{self.path}: truncated (wanted values {start}..{stop} of {self.size}); rebuild the cache")
        return np.frombuffer(buf, dtype=self.dtype)


class _Ragged:
    """Rows of a values file addressed by an int64 offsets file (row r is values[off[r]:off[r+1]]),
    both read by offset."""

    def __init__(self, folder: Path, name: str) -> None:
        self.values = _Column(folder / f"{name}.npy")
        self.offsets = _Column(folder / f"{name}_offsets.npy")

    def __len__(self) -> int:
        return self.offsets.size - 1

    def row(self, r: int) -> np.ndarray:
        a, b = self.offsets.read(r, r + 2)
        return self.values.read(int(a), int(b))

    def head(self, r: int, n: int) -> np.ndarray:
        """The first ``n`` values of row ``r``."""
        a = int(self.offsets.read(r, r + 1)[0])
        return self.values.read(a, a + n)

    def string(self, r: int) -> str:
        return self.row(r).tobytes().decode("utf-8")

    def lengths(self) -> np.ndarray:
        """Every row's length (int64), from the mapped offsets."""
        return np.diff(np.load(self.offsets.path, mmap_mode="r"))

    def all_strings(self) -> list[str]:
        """Every row decoded (Python objects for every row: for small data and inspection)."""
        import pyarrow as pa

        off = np.load(self.offsets.path)
        data = np.load(self.values.path)
        arr = pa.LargeStringArray.from_buffers(len(off) - 1, pa.py_buffer(off - off[0]), pa.py_buffer(data))
        return arr.to_pylist()


# --------------------------------------------------------------------------------------------
# Writing the pack


def _string_parts(col) -> tuple[np.ndarray, np.ndarray]:
    """(UTF-8 bytes back to back, int64 lengths) of an Arrow string column; null is ''."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pc.fill_null(col, "").combine_chunks() if col.null_count else col.combine_chunks()
    arr = arr.cast(pa.large_binary())
    if len(arr) == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    off = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    values = np.frombuffer(data, dtype=np.uint8)[off[0] : off[-1]] if data is not None else np.zeros(0, np.uint8)
    return values, np.diff(off)


def _offsets(lengths: list[np.ndarray]) -> np.ndarray:
    lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    out = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _shard_codec(path: Path) -> dict:
    import pyarrow.parquet as pq

    from indextts.codes import META_KEY

    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    if raw is None:
        raise DataError(f"{path}: not a codes shard (no {META_KEY.decode()} schema metadata)")
    return json.loads(raw)


def _clean_split(clean: Path):
    """(utt_id Arrow array, split codes int8, split names, {"language": (codes int16, names),
    "replay": bool array}) of clean.parquet."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    have = pq.read_schema(clean).names
    try:
        t = pq.read_table(clean, columns=["utt_id", "split", *(c for c in ("language", "replay") if c in have)])
    except Exception as e:
        raise DataError(f"{clean}: cannot read utt_id/split columns ({e})") from e

    def coded(name: str, dtype):
        col = pc.fill_null(t.column(name), "").combine_chunks()
        names = sorted(set(pc.unique(col).to_pylist()))
        return pc.index_in(col, value_set=_pa_strings(names)).to_numpy(zero_copy_only=False).astype(dtype), names

    codes, names = coded("split", np.int8)
    extra = {
        "language": coded("language", np.int16) if "language" in have else (np.full(t.num_rows, -1, np.int16), []),
        "replay": (pc.fill_null(t.column("replay"), False).to_numpy().astype(bool) if "replay" in have
                   else np.zeros(t.num_rows, dtype=bool)),
    }
    return t.column("utt_id").combine_chunks(), codes, names, extra


def _clean_rows(utt_ids: list, clean: Path | None, clean_ids) -> np.ndarray | None:
    """Each utterance's row in clean.parquet (None without a clean manifest), in one hash join."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if clean_ids is None:
        return None
    ids = pa.chunked_array(utt_ids, type=pa.string())
    where = pc.index_in(ids, value_set=clean_ids)
    if where.null_count:
        missing = ids.filter(pc.is_null(where))[0]
        raise DataError(f"{clean}: utt_id {str(missing)!r} of the code shards is not in the clean manifest; "
                        "the codes are stale: rerun extract_codes")
    return where.to_numpy()


def _pa_strings(values: Sequence[str]):
    import pyarrow as pa

    return pa.array(list(values), type=pa.string())


def source_id(source: dict) -> str:
    """The identity of a pack or tokens folder: sha256 of its ``source`` record."""
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:32]


def _replace_folder(tmp: Path, output: Path) -> Path:
    """Rename a finished folder into place. Another process that finished the same folder first
    wins (the two are equal: same sources, same bytes); a stale folder is moved aside first."""
    marker = PACK_JSON if (tmp / PACK_JSON).is_file() else TOKENS_JSON
    if _current(output, marker, json.loads((tmp / marker).read_text())["source"]):
        shutil.rmtree(tmp, ignore_errors=True)
        return output
    if output.exists():
        aside = output.with_name(f".{output.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        try:
            output.rename(aside)
        except OSError:
            aside = None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    try:
        tmp.rename(output)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (output / PACK_JSON).is_file() and not (output / TOKENS_JSON).is_file():
            raise
    return output


def pack_codes(shards: Sequence[str | Path], output: str | Path, *, clean: str | Path | None = None,
               codes_index: str | Path | None = None, progress: bool = False) -> Path:
    """Write the codes cache (see the module doc) of ``shards`` into the folder ``output``.

    Args:
        shards: code shard files, in order (``indextts.codes.shard_paths(index)``).
        output: the folder to write; written beside under a temporary name and renamed into place.
        clean: ``clean.parquet``, for each utterance's split (the shards do not carry it); without
            it the splits are unknown and only ``split=None`` datasets can read the pack.
        codes_index: the ``index.json`` the shards came from, recorded (sha256) so a reader can
            tell a pack made from other codes.
        progress: print one line per shard on stderr.

    Returns:
        ``output`` as a Path.

    Raises:
        DataError: no shards, shards of different codecs, a row whose codes length is not
            ``n_q x n_frames``, or an utterance missing from ``clean``.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = [Path(s) for s in shards]
    output = Path(output)
    if not shards:
        raise DataError("no code shards given (is results/codes/index.json empty?)")
    t0 = time.perf_counter()
    codecs = [_shard_codec(p) for p in shards]
    n_q = int(codecs[0]["n_q"])
    for p, c in zip(shards, codecs):
        if int(c["n_q"]) != n_q:
            raise DataError(f"{p}: holds {c['n_q']} codebooks, {shards[0]} holds {n_q}; rerun extract_codes")
    # Pass 1: the speakers, so that every shard's rows get the same speaker ids.
    names: set[str] = set()
    for p in shards:
        names.update(s for s in pc.unique(pq.read_table(p, columns=["speaker"]).column("speaker").combine_chunks()
                                          .fill_null("")).to_pylist())
    speaker_names = sorted(names)
    name_set = _pa_strings(speaker_names)
    clean_ids = clean_codes = None
    splits: list[str] = []
    languages: list[str] = []
    if clean is not None:
        clean_ids, clean_codes, splits, clean_extra = _clean_split(Path(clean))
        languages = clean_extra["language"][1]

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        codes_w = _NpyWriter(tmp / "codes.npy", np.int16)
        strings_w = {k: _NpyWriter(tmp / f"{k}.npy", np.uint8) for k in _STRINGS}
        lens: dict[str, list[np.ndarray]] = {k: [] for k in (*_STRINGS, "codes")}
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("n_frames", "speaker", "has_emotion")}
        utt_ids = []
        for k, p in enumerate(shards):
            t = pq.read_table(p, columns=["utt_id", "speaker", "text", "emotion", "audio_path", "n_frames", "codes"])
            codes = t.column("codes").combine_chunks()
            if codes.null_count:
                raise DataError(f"{p}: {codes.null_count} rows have null codes; rerun extract_codes")
            n_frames = t.column("n_frames").to_numpy().astype(np.int32)
            sizes = np.diff(codes.offsets.to_numpy()).astype(np.int64)
            bad = np.flatnonzero(sizes != n_q * n_frames.astype(np.int64))
            if len(bad):
                i = int(bad[0])
                raise DataError(f"{p}: row {t.column('utt_id')[i]} holds {sizes[i]} codes, expected n_q x n_frames = "
                                f"{n_q} x {n_frames[i]}; rerun extract_codes")
            codes_w.write(codes.flatten().to_numpy(zero_copy_only=False))
            lens["codes"].append(sizes)
            for name in _STRINGS:
                values, ln = _string_parts(t.column(name))
                strings_w[name].write(values)
                lens[name].append(ln)
            spk = pc.index_in(t.column("speaker").combine_chunks().fill_null(""), value_set=name_set)
            cols["speaker"].append(spk.to_numpy(zero_copy_only=False).astype(np.int32))
            cols["n_frames"].append(n_frames)
            emo = t.column("emotion")
            has = pc.and_(pc.is_valid(emo), pc.not_equal(pc.fill_null(emo, ""), ""))
            cols["has_emotion"].append(has.to_numpy(zero_copy_only=False).astype(bool))
            utt_ids.append(t.column("utt_id").combine_chunks())
            if progress:
                print(f"  packed {p.name}: {t.num_rows} utterances ({k + 1}/{len(shards)})", file=sys.stderr)
            del t, codes
        where = _clean_rows(utt_ids, clean, clean_ids)
        n_rows = sum(len(u) for u in utt_ids)
        del utt_ids
        if where is None:
            cols["split"] = [np.full(n_rows, -1, dtype=np.int8)]
            cols["language"] = [np.full(n_rows, -1, dtype=np.int16)]
            cols["replay"] = [np.zeros(n_rows, dtype=bool)]
        else:
            cols["split"] = [clean_codes[where]]
            cols["language"] = [clean_extra["language"][0][where]]
            cols["replay"] = [clean_extra["replay"][where]]
        codes_w.close()
        for w in strings_w.values():
            w.close()
        for name in (*_STRINGS, "codes"):
            _save(tmp, f"{name}_offsets", _offsets(lens[name]))
        for name, parts in cols.items():
            _save(tmp, name, np.concatenate(parts))
        spk_bytes = [s.encode("utf-8") for s in speaker_names]
        _save(tmp, "speaker_names", np.frombuffer(b"".join(spk_bytes), dtype=np.uint8))
        _save(tmp, "speaker_names_offsets", _offsets([np.array([len(b) for b in spk_bytes], dtype=np.int64)]))
        rows = int(sum(len(x) for x in cols["n_frames"]))
        meta = {
            "format": PACK_FORMAT,
            "source": {
                "shards": [os.path.relpath(p.resolve(), output.resolve()) for p in shards],
                "index_sha256": sha256_file(codes_index) if codes_index is not None else None,
                "clean_sha256": sha256_file(clean) if clean is not None else None,
                # without an index, the shards' own identity
                **({} if codes_index is not None else
                   {"shard_stats": [[p.stat().st_size, p.stat().st_mtime_ns] for p in shards]}),
            },
            "codec": {k: v for k, v in codecs[0].items() if k not in ("shard", "n_shards")},
            "n_q": n_q,
            "rows": rows,
            "frames": int(sum(int(x.sum(dtype=np.int64)) for x in cols["n_frames"])),
            "speakers": len(speaker_names),
            "splits": splits,
            "languages": languages,
            "codes_bytes": codes_w.n * 2,
        }
        meta["id"] = source_id(meta["source"])
        (tmp / PACK_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pa.default_memory_pool().release_unused()  # the shards' buffers, back to the system
    print(f"packed {len(shards)} shards into {output}: {meta['rows']} utterances, {meta['speakers']} speakers, "
          f"{meta['codes_bytes'] / 1e9:.2f} GB of codes ({n_q} codebooks) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    return output


def tokenize_text(pack: str | Path, bpe: str | Path, output: str | Path, *, chunk: int = 100_000) -> Path:
    """Tokenise every utterance's text of a pack with a SentencePiece vocabulary into the folder
    ``output`` (see the module doc).

    Returns:
        ``output`` as a Path.

    Raises:
        DataError: ``pack`` is not a pack folder.
    """
    import pyarrow as pa
    import sentencepiece as spm

    t0 = time.perf_counter()
    codes = CodesPack(pack)
    bpe, output = Path(bpe), Path(output)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(bpe))
    unk_id = sp.unk_id()
    off = np.load(codes.folder / "text_offsets.npy", mmap_mode="r")
    data = np.load(codes.folder / "text.npy", mmap_mode="r")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        ids_w = _NpyWriter(tmp / "ids.npy", np.int32)
        lens, unks = [], []
        for a in range(0, codes.rows, chunk):
            b = min(a + chunk, codes.rows)
            o = np.asarray(off[a : b + 1]) - off[a]
            texts = pa.LargeStringArray.from_buffers(b - a, pa.py_buffer(o), pa.py_buffer(np.asarray(data[off[a] : off[b]])))
            ids = sp.encode(texts.to_pylist(), out_type=int)
            n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(n.sum()))
            ids_w.write(flat)
            lens.append(n)
            c = np.zeros(len(flat) + 1, dtype=np.int64)
            np.cumsum(flat == unk_id, out=c[1:])
            ends = np.cumsum(n)
            unks.append((c[ends] - c[ends - n]).astype(np.int32))
        ids_w.close()
        _save(tmp, "ids_offsets", _offsets(lens))
        _save(tmp, "unk", np.concatenate(unks) if unks else np.zeros(0, np.int32))
        source = {"pack": codes.id, "vocab_sha256": sha256_file(bpe)}
        meta = {"format": TOKENS_FORMAT, "source": source, "id": source_id(source), "vocab": str(bpe),
                "vocab_size": sp.get_piece_size(), "unk_id": unk_id, "rows": codes.rows, "tokens": ids_w.n}
        (tmp / TOKENS_JSON).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"tokenised {codes.rows} utterances of {codes.folder} with {bpe}: {meta['tokens']} ids in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return output


# --------------------------------------------------------------------------------------------
# Reading


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path.parent}: not a {what} folder (no {path.name}); "
                        f"{'rerun pack_codes' if what == 'codes pack' else 'rerun tokenize_text'}") from None


class CodesPack:
    """An open codes pack (see the module doc). The per-utterance arrays are mapped on use;
    :meth:`codes` and :meth:`string` read one utterance by offset.

    Raises:
        DataError: not a pack folder, or one of another format.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = _read_json(self.folder / PACK_JSON, "codes pack")
        if self.meta.get("format") != PACK_FORMAT:
            raise DataError(f"{self.folder}: pack format {self.meta.get('format')}, this code reads {PACK_FORMAT}; rerun pack_codes")
        self.id: str = self.meta["id"]
        self.rows: int = int(self.meta["rows"])
        self.n_q: int = int(self.meta["n_q"])
        self.splits: list[str] = list(self.meta["splits"])
        self.languages: list[str] = list(self.meta.get("languages", []))
        self.shards = [Path(os.path.normpath(self.folder / p)) for p in self.meta["source"]["shards"]]
        self._codes = _Ragged(self.folder, "codes")
        self._strings = {k: _Ragged(self.folder, k) for k in _STRINGS}

    def array(self, name: str) -> np.ndarray:
        """A per-utterance array (``n_frames``, ``speaker``, ``split``, ``language``, ``replay``,
        ``has_emotion``), mapped. A pack written before ``language``/``replay`` existed reads as
        language unknown (-1) and no replay."""
        path = self.folder / f"{name}.npy"
        if name in ("language", "replay") and not path.is_file():
            return np.full(self.rows, -1, np.int16) if name == "language" else np.zeros(self.rows, dtype=bool)
        return np.load(path, mmap_mode="r")

    def speaker_names(self) -> list[str]:
        return _Ragged(self.folder, "speaker_names").all_strings()

    def codes(self, r: int, n_frames: int, n_codebooks: int) -> np.ndarray:
        """int16 ``[n_codebooks, n_frames]``: the first codebooks of row ``r`` (row-major, so they
        are the head of the row)."""
        return self._codes.head(r, n_codebooks * n_frames).reshape(n_codebooks, n_frames)

    def string(self, name: str, r: int) -> str:
        """``utt_id``, ``audio_path`` or ``text`` of row ``r``."""
        return self._strings[name].string(r)

    def strings(self, name: str) -> list[str]:
        return self._strings[name].all_strings()


class TokenPack:
    """An open tokens folder: :meth:`ids` reads one utterance's text ids by offset."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = _read_json(self.folder / TOKENS_JSON, "tokens")
        if self.meta.get("format") != TOKENS_FORMAT:
            raise DataError(f"{self.folder}: tokens format {self.meta.get('format')}, this code reads {TOKENS_FORMAT}; "
                            "rerun tokenize_text")
        self.id: str = self.meta["id"]
        self._ids = _Ragged(self.folder, "ids")

    def check(self, pack: CodesPack, bpe: str | Path | None) -> None:
        """Raise DataError unless these tokens were made from ``pack`` with the vocabulary ``bpe``."""
        if self.meta["source"]["pack"] != pack.id:
            raise DataError(f"{self.folder}: tokenised from another codes pack than {pack.folder}; rerun tokenize_text")
        if bpe is not None and self.meta["source"]["vocab_sha256"] != sha256_file(bpe):
            raise DataError(f"{self.folder}: tokenised with another vocabulary than {bpe} "
                            f"(made with {self.meta.get('vocab')}); rerun tokenize_text")

    def lengths(self) -> np.ndarray:
        return self._ids.lengths()

    def unk(self) -> np.ndarray:
        return np.load(self.folder / "unk.npy", mmap_mode="r")

    def ids(self, r: int) -> np.ndarray:
        return self._ids.row(r)


def _current(folder: Path, marker: str, source: dict) -> bool:
    try:
        return json.loads((folder / marker).read_text())["id"] == source_id(source)
    except (OSError, ValueError, KeyError):
        return False


def ensure_pack(codes_index: str | Path, clean: str | Path | None, folder: str | Path | None = None) -> Path:
    """The codes pack of ``codes_index`` (default folder: ``pack/`` beside the index), written
    first when it is missing or was made from another index or manifest. For callers that are
    not given the pipeline's ``pack_codes`` output (tests, notebooks)."""
    from indextts.codes import shard_paths

    codes_index = Path(codes_index)
    folder = Path(folder) if folder is not None else codes_index.parent / "pack"
    shards = shard_paths(codes_index)
    source = {"shards": [os.path.relpath(p.resolve(), folder.resolve()) for p in shards],
              "index_sha256": sha256_file(codes_index), "clean_sha256": sha256_file(clean) if clean is not None else None}
    if not _current(folder, PACK_JSON, source):
        pack_codes(shards, folder, clean=clean, codes_index=codes_index)
    return folder


def ensure_tokens(pack: str | Path, bpe: str | Path, folder: str | Path | None = None) -> Path:
    """The tokens of ``pack`` under the vocabulary ``bpe`` (default folder:
    ``<pack>/tokens-<vocab sha256 prefix>``, one per vocabulary), written first when missing."""
    pack = CodesPack(pack)
    sha = sha256_file(bpe)
    folder = Path(folder) if folder is not None else pack.folder / f"tokens-{sha[:16]}"
    if not _current(folder, TOKENS_JSON, {"pack": pack.id, "vocab_sha256": sha}):
        tokenize_text(pack.folder, bpe, folder)
    return folder


def data_cache(codes_index: str | Path, clean: str | Path | None, bpe: str | Path, *, pack: str | Path | None = None,
               tokens: str | Path | None = None) -> tuple[Path, Path]:
    """The codes pack and tokens folders a stage reads: the given ones (the pipeline's
    ``pack_codes`` and ``tokenize_text`` outputs), checked to be made from ``codes_index`` and
    ``bpe``; else made beside the index when missing or stale (:func:`ensure_pack`,
    :func:`ensure_tokens`).

    Raises:
        DataError: a given pack of another index, or tokens of another pack or vocabulary.
    """
    if pack is None:
        pack = ensure_pack(codes_index, clean)
    else:
        recorded = CodesPack(pack).meta["source"].get("index_sha256")
        if recorded is not None and recorded != sha256_file(codes_index):
            raise DataError(f"{pack}: packed from another {Path(codes_index).name} than {codes_index}; rerun pack_codes")
    if tokens is None:
        tokens = ensure_tokens(pack, bpe)
    else:
        TokenPack(tokens).check(CodesPack(pack), bpe)
    return Path(pack), Path(tokens)


# --------------------------------------------------------------------------------------------
# CLI


def cli_pack_codes(argv: list[str]) -> int:
    """``indextts pack-codes``: the training data cache of the code shards."""
    p = argparse.ArgumentParser(prog="indextts pack-codes", description=cli_pack_codes.__doc__)
    p.add_argument("--shards", nargs="+", help="every shard file, in shard order")
    p.add_argument("--codes-index", help="results/codes/index.json: its shards, when --shards is not given")
    p.add_argument("--clean", required=True, help="results/clean/clean.parquet (each utterance's split)")
    p.add_argument("--output", required=True, help="the folder to write, e.g. results/codes/pack")
    a = p.parse_args(argv)
    if bool(a.shards) == bool(a.codes_index):
        p.error("give --shards or --codes-index")
    try:
        if a.shards:
            pack_codes(a.shards, a.output, clean=a.clean, progress=True)
        else:
            from indextts.codes import shard_paths

            pack_codes(shard_paths(a.codes_index), a.output, clean=a.clean, codes_index=a.codes_index, progress=True)
    except DataError as e:
        print(f"indextts pack-codes: {e}", file=sys.stderr)
        return 1
    return 0


def cli_tokenize_text(argv: list[str]) -> int:
    """``indextts tokenize-text``: the pack's text as ids of one vocabulary."""
    p = argparse.ArgumentParser(prog="indextts tokenize-text", description=cli_tokenize_text.__doc__)
    p.add_argument("--pack", required=True, help="the codes pack folder (pack-codes' output)")
    p.add_argument("--bpe", required=True, help="results/vocab/bpe.model")
    p.add_argument("--output", required=True, help="the folder to write, e.g. results/tokens")
    a = p.parse_args(argv)
    try:
        tokenize_text(a.pack, a.bpe, a.output)
    except DataError as e:
        print(f"indextts tokenize-text: {e}", file=sys.stderr)
        return 1
    return 0

