"""XXH64 over a whole Arrow string array at once, in numpy.

The ``xxhash`` package hashes one bytes object per call, which costs a Python call (and an
encode) per key: 1.3 s for the 3M utt_ids of a large corpus. This is the same function
(XXH64, seed 0, on the UTF-8 bytes) computed for many keys together. Keys are grouped by their
length in bytes, so that every key of a group takes the same steps; a group's keys are laid out
as the rows of a zero-padded byte matrix, whose 8-byte columns are the words the algorithm
reads, and each step is one numpy operation over the group. Corpus ids have a handful of
lengths, so the whole array costs a few dozen array operations.
``tests/test_manifest.py`` checks it bit for bit against the ``xxhash`` package.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
_MASK32 = np.uint64(0xFFFFFFFF)
_SLICE = 1 << 14  # keys hashed together


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _round(acc: np.ndarray, lane: np.ndarray) -> np.ndarray:
    return _rotl(acc + lane * _P2, 31) * _P1


def _merge(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (h ^ _round(np.zeros_like(v), v)) * _P1 + _P4


def xxh64(keys: pa.Array) -> np.ndarray:
    """XXH64 (seed 0) of each string's UTF-8 bytes, as ``uint64``; nulls hash as empty strings."""
    arr = keys if pa.types.is_large_binary(keys.type) else keys.cast(pa.large_binary())
    n = len(arr)
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    lengths = np.diff(offsets)
    order = np.argsort(lengths, kind="stable")
    cuts = np.flatnonzero(np.diff(lengths[order])) + 1
    with np.errstate(over="ignore"):
        for rows in np.split(order, cuts):
            size = int(lengths[rows[0]])
            if len(rows) == n:  # every key has the same length: the buffer is the matrix
                group = arr
            else:
                group = arr.take(pa.array(rows))
            mat = _matrix(group, size)
            # In slices that stay in the CPU cache: each step is a pass over the slice.
            out[rows] = np.concatenate([_hash_equal_length(mat[a : a + _SLICE], size) for a in range(0, len(mat), _SLICE)])
    return out


def _matrix(group: pa.Array, size: int) -> np.ndarray:
    """The group's keys (all ``size`` bytes long) as rows of a uint8 matrix, zero-padded to a
    multiple of 8 columns."""
    m = len(group)
    width = -(-size // 8) * 8
    mat = np.zeros((m, width), dtype=np.uint8)
    if size:
        start = int(np.frombuffer(group.buffers()[1], dtype=np.int64)[group.offset])
        data = np.frombuffer(group.buffers()[2], dtype=np.uint8)[start : start + m * size]
        mat[:, :size] = data.reshape(m, size)
    return mat


def _hash_equal_length(mat: np.ndarray, size: int) -> np.ndarray:
    """XXH64 of each row of ``mat`` (``size`` bytes, then zero padding)."""
    m = len(mat)
    words = np.ascontiguousarray(mat.view("<u8").T)  # (width / 8, m): each word of every key, contiguous
    pos = 0  # in bytes
    if size >= 32:
        z = np.zeros(m, dtype=np.uint64)
        v = [z + _P1 + _P2, z + _P2, z.copy(), z - _P1]
        while pos + 32 <= size:
            for j in range(4):
                v[j] = _round(v[j], words[pos // 8 + j])
            pos += 32
        h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
        for j in range(4):
            h = _merge(h, v[j])
    else:
        h = np.full(m, _P5, dtype=np.uint64)
    h += np.uint64(size)
    while pos + 8 <= size:
        h = _rotl(h ^ _round(np.zeros(m, dtype=np.uint64), words[pos // 8]), 27) * _P1 + _P4
        pos += 8
    if pos + 4 <= size:
        h = _rotl(h ^ ((words[pos // 8] & _MASK32) * _P1), 23) * _P2 + _P3
        pos += 4
    while pos < size:
        h = _rotl(h ^ (mat[:, pos].astype(np.uint64) * _P5), 11) * _P1
        pos += 1
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


def stable_hash(utt_id: str) -> int:
    """A 64-bit hash of ``utt_id`` that is the same in every process and Python version (the
    first 8 bytes of blake2b of its UTF-8; never Python's salted ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(utt_id.encode("utf-8"), digest_size=8).digest(), "big")
