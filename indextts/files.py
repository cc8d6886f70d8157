"""Atomic file writing and hashing: no reader ever sees half a file.

Every Parquet table the pipeline writes goes through :func:`write_parquet` (or
:func:`parquet_writer` for one written in row groups), so all of them share one set of writer
settings: zstd (a writer may leave named columns uncompressed), no timestamps, so the same table
gives the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place if the block succeeds.

    The temporary file lives in the same folder (same file system) so the final ``os.replace``
    is atomic. On error the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def parquet_writer(
    path: str | os.PathLike,
    schema: pa.Schema,
    *,
    dictionary: bool | Sequence[str] = True,
    statistics: bool | Sequence[str] = True,
    uncompressed: Sequence[str] = (),
) -> Iterator[pq.ParquetWriter]:
    """Yield a zstd Parquet writer for ``path``; each ``write_table`` call adds row groups, and
    the file is renamed into place when the block succeeds (see :func:`atomic_path`).

    Args:
        path: the final file.
        schema: the schema of every table written.
        dictionary: dictionary-encode all columns (True) or only these. Dictionary encoding pays
            for repeated values (speakers, codebook indices); on unique strings it is built,
            found too large and dropped, which costs time for nothing.
        statistics: min/max statistics for all columns (True) or only these.
        uncompressed: columns written without compression, where zstd would cost more time than
            the space it saves is worth (see ``manifest.CLEAN_UNCOMPRESSED``).
    """
    with atomic_path(path) as tmp:
        opts = {"use_dictionary": dictionary if isinstance(dictionary, bool) else list(dictionary),
                "write_statistics": statistics if isinstance(statistics, bool) else list(statistics)}
        compression = {name: "none" if name in uncompressed else "zstd" for name in schema.names} if uncompressed else "zstd"
        with pq.ParquetWriter(tmp, schema, compression=compression, **opts) as writer:
            yield writer


def write_parquet(
    table: pa.Table,
    path: str | os.PathLike,
    *,
    row_group_size: int | None = None,
    dictionary: bool | Sequence[str] = True,
    statistics: bool | Sequence[str] = True,
) -> Path:
    """Write ``table`` as zstd Parquet, atomically. ``row_group_size`` rows per row group
    (Arrow's default when None); ``dictionary`` and ``statistics`` as in :func:`parquet_writer`."""
    with parquet_writer(path, table.schema, dictionary=dictionary, statistics=statistics) as writer:
        writer.write_table(table, row_group_size=row_group_size)
    return Path(path)
