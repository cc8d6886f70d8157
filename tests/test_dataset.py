"""The training data cache (indextts.pack) and the dataset over it (indextts.dataset): the same
items and batches as the dataset it replaced (tests/legacy_data.py), checks that name a stale
cache, and the private memory of DataLoader workers, which must not grow with the corpus."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from indextts.codes import REJECTS_SCHEMA, CodesConfig, index_codes, shard_file_name, shard_of, shard_schema
from indextts.data import BucketBatchSampler, TokenBatchSampler
from indextts.dataset import CodesDataset
from indextts.features import FeatureConfig
from indextts.pack import DataError, data_cache, ensure_pack, ensure_tokens, pack_codes, tokenize_text
from tests.factories import make_bpe, make_synthetic_shards, make_train_corpus
from tests.legacy_data import LegacyBucketBatchSampler, LegacyCodesDataset, LegacyTokenBatchSampler

FEATS = FeatureConfig(n_mels=32)


def reshard(corpus: dict[str, Path], root: Path, n_shards: int) -> dict[str, Path]:
    """The factory corpus's codes re-cut into ``n_shards`` shards by the pipeline's hash, with
    their index."""
    table = pq.read_table(corpus["shard"])
    meta = json.loads(table.schema.metadata[b"indextts.codes"])
    ids = table.column("utt_id").to_pylist()
    which = np.array([shard_of(u, n_shards) for u in ids])
    root.mkdir(parents=True)
    (root / "rejects").mkdir()
    shards, rejects = [], []
    for k in range(n_shards):
        name = shard_file_name(k, n_shards)
        part = table.filter(pa.array(which == k)).replace_schema_metadata(None)
        pq.write_table(part.cast(shard_schema({**meta, "shard": k, "n_shards": n_shards})), root / name)
        pq.write_table(REJECTS_SCHEMA.empty_table(), root / "rejects" / name)
        shards.append(root / name)
        rejects.append(root / "rejects" / name)
    index = index_codes(CodesConfig(n_shards=n_shards), corpus["clean"], shards, rejects, root / "index.json")
    return {**corpus, "index": index, "shards": shards}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    # 4 speakers of 5 (one val each), 3 codebooks, a few long texts, and one speaker with a single
    # train utterance (its reference is itself).
    base = make_train_corpus(root / "base", n_speakers=4, per_speaker=5, n_q=3, durations=(0.3, 1.2),
                             words_per_second=6.0)
    clean = pq.read_table(base["clean"])
    rows = clean.to_pylist()
    for r in rows:  # spk3: one train utterance; some emotions unset
        if r["speaker"] == "spk3" and r["utt_id"] != "s3_u00":
            r["split"] = "val"
        if r["utt_id"].endswith(("u01", "u03")):
            r["emotion"] = None if r["utt_id"].endswith("u01") else ""
    pq.write_table(pa.Table.from_pylist(rows, schema=clean.schema), base["clean"])
    shard = pq.read_table(base["shard"])
    emotions = {r["utt_id"]: r["emotion"] for r in rows}
    shard = shard.set_column(shard.schema.get_field_index("emotion"), shard.schema.field("emotion"),
                             pa.array([emotions[u] for u in shard.column("utt_id").to_pylist()], pa.string()))
    pq.write_table(shard, base["shard"])
    return reshard(base, root / "codes", 2)


def _assert_same_item(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


CASES = {
    "train": dict(split="train", seed=1, max_ref_seconds=0.5, n_codebooks=2),
    "val": dict(split="val", seed=2, max_ref_seconds=0.3),
    "all-without-clean": dict(split=None, n_codebooks=3),
    "stage2": dict(split="train", speakers={"spk0": 0, "spk2": 1, "spk3": 2, "nobody": 3}, require_emotion=True,
                   emo_prompt="target", max_ref_seconds=0.4),
    "length-limits": dict(split="train", max_text_tokens=12, max_code_frames=50, seed=5),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_mapped_dataset_yields_the_legacy_items(corpus, case, one_torch_thread):
    kw = dict(CASES[case], features=FEATS, bpe_path=corpus["bpe"])
    if kw["split"] is not None:
        kw["clean_path"] = corpus["clean"]
    old = LegacyCodesDataset(corpus["shards"], **kw)
    new = CodesDataset(corpus["shards"], **kw)
    assert len(new) == len(old) and new.n_input == old.n_input and new.dropped == old.dropped
    assert list(new.dropped) == list(old.dropped)  # the same order in the logs
    assert new.unk_tokens == old.unk_tokens
    np.testing.assert_array_equal(new.lengths, old.lengths)
    np.testing.assert_array_equal(new.text_lengths, old.text_lengths)
    assert new.meta["utt_id"].tolist() == old.meta["utt_id"].tolist()
    assert new.speakers_present() == sorted(set(old.meta["speaker"]))
    for epoch in (0, 1, 3):
        assert [new.reference_index(i, epoch) for i in range(len(new))] == \
            [old.reference_index(i, epoch) for i in range(len(old))]
    for epoch in (0, 3):
        for i in range(len(new)):
            _assert_same_item(new[(epoch, i)], old[(epoch, i)])
    old.set_epoch(2)
    new.set_epoch(2)
    _assert_same_item(new[0], old[0])
    _assert_same_item(new.core_item(1), old.core_item(1))


def test_the_pipeline_cache_reads_like_the_shards_and_names_a_stale_one(corpus, tmp_path, one_torch_thread):
    pack = pack_codes(corpus["shards"], tmp_path / "pack", clean=corpus["clean"], codes_index=corpus["index"])
    tokens = tokenize_text(pack, corpus["bpe"], tmp_path / "tokens")
    assert data_cache(corpus["index"], corpus["clean"], corpus["bpe"], pack=pack, tokens=tokens) == (pack, tokens)
    kw = dict(features=FEATS, split="train", seed=3, n_codebooks=3, max_ref_seconds=0.5)
    old = LegacyCodesDataset(corpus["shards"], bpe_path=corpus["bpe"], clean_path=corpus["clean"], **kw)
    new = CodesDataset(pack=pack, tokens=tokens, bpe_path=corpus["bpe"], **kw)
    for i in range(len(new)):
        _assert_same_item(new[(1, i)], old[(1, i)])
    # A spawned worker gets a pickled copy: it reopens the files and reads the same items.
    copy = pickle.loads(pickle.dumps(new))
    _assert_same_item(copy[(1, 2)], old[(1, 2)])

    other = make_bpe(tmp_path / "other.model", ["some other text entirely", "more words here"] * 20, 30)
    with pytest.raises(DataError, match=r"tokens: tokenised with another vocabulary than .*other.model.*rerun tokenize_text"):
        CodesDataset(pack=pack, tokens=tokens, bpe_path=other, **kw)
    with pytest.raises(DataError, match=r"tokens: tokenised with another vocabulary .*rerun tokenize_text"):
        data_cache(corpus["index"], corpus["clean"], other, pack=pack, tokens=tokens)
    index2 = tmp_path / "index.json"
    index2.write_text(corpus["index"].read_text().replace('"format"', '"changed": 1, "format"', 1))
    with pytest.raises(DataError, match=r"pack: packed from another index.json than .*rerun pack_codes"):
        data_cache(index2, corpus["clean"], corpus["bpe"], pack=pack, tokens=tokens)
    with pytest.raises(DataError, match=r"no pack.json.*rerun pack_codes"):
        CodesDataset(pack=tmp_path, tokens=tokens, bpe_path=corpus["bpe"], **kw)
    with pytest.raises(DataError, match=r"holds 3 codebooks .*but 4 were asked for"):
        CodesDataset(pack=pack, tokens=tokens, bpe_path=corpus["bpe"], **{**kw, "n_codebooks": 4})


def test_a_vocabulary_change_retokenises_and_leaves_the_codes_alone(corpus, tmp_path):
    index = tmp_path / "codes" / "index.json"
    index.parent.mkdir()
    index.write_text(corpus["index"].read_text().replace('"path": "', f'"path": "{corpus["index"].parent}/'))
    pack = ensure_pack(index, corpus["clean"])
    assert pack == index.parent / "pack"
    codes_mtime = (pack / "codes.npy").stat().st_mtime_ns
    first = ensure_tokens(pack, corpus["bpe"])
    assert ensure_pack(index, corpus["clean"]) == pack and ensure_tokens(pack, corpus["bpe"]) == first
    assert (pack / "codes.npy").stat().st_mtime_ns == codes_mtime  # current: nothing rewritten
    other = make_bpe(tmp_path / "other.model", ["selam new dehna alem bet sew"] * 20, 30)
    second = ensure_tokens(pack, other)
    assert second != first and first.is_dir()  # one folder per vocabulary
    assert (pack / "codes.npy").stat().st_mtime_ns == codes_mtime
    ds = CodesDataset(pack=pack, tokens=second, bpe_path=other, features=FEATS, split="train")
    assert ds.tokens.meta["source"]["vocab_sha256"] != json.loads((first / "tokens.json").read_text())["source"]["vocab_sha256"]


@pytest.mark.parametrize("world_size", [1, 3])
def test_numpy_samplers_give_the_legacy_batches(world_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=5003)
    subset = np.sort(rng.choice(len(lengths), size=4000, replace=False))
    for kw in (dict(max_tokens=1200), dict(max_tokens=4000, max_batch_size=7, bucket_size=333),
               dict(max_tokens=900, shuffle=False, indices=subset), dict(max_tokens=2500, seed=4, bucket_size=1)):
        for rank in range(world_size):
            new = TokenBatchSampler(lengths, rank=rank, world_size=world_size, **kw)
            old = LegacyTokenBatchSampler(lengths, rank=rank, world_size=world_size, **kw)
            for epoch in (0, 1):
                assert new.batches(epoch) == old.batches(epoch)
                assert new.all_batches(epoch) == old.all_batches(epoch)
                assert new.padding_efficiency(epoch) == pytest.approx(old.padding_efficiency(epoch), abs=1e-12)
            new.set_epoch(1, 5)
            old.set_epoch(1, 5)
            assert list(new) == list(old) and len(new) == len(old)
    for kw in (dict(), dict(drop_last=True, bucket_batches=3), dict(shuffle=False)):
        for rank in range(world_size):
            new = BucketBatchSampler(lengths, 6, rank=rank, world_size=world_size, **kw)
            old = LegacyBucketBatchSampler(lengths, 6, rank=rank, world_size=world_size, **kw)
            new.set_epoch(2)
            old.set_epoch(2)
            assert new.batches() == old.batches() and list(new) == old.batches() and len(new) == len(old)


def test_replay_rows_take_their_share_of_tokens_and_leave_ratio_zero_batches_unchanged():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 400, size=3000)
    replay = np.zeros(len(lengths), dtype=bool)
    replay[rng.choice(len(lengths), size=600, replace=False)] = True
    main = np.flatnonzero(~replay)
    kw = dict(max_tokens=1500, max_batch_size=16, bucket_size=200, seed=7)
    # ratio 0: the replay rows are left out and the batches are those of the main rows alone
    zero = TokenBatchSampler(lengths, replay=replay, replay_ratio=0.0, **kw)
    assert zero.all_batches(3) == TokenBatchSampler(lengths, indices=main, **kw).all_batches(3)
    no_replay = TokenBatchSampler(lengths, replay=np.zeros(len(lengths), dtype=bool), replay_ratio=0.3, **kw)
    assert no_replay.all_batches(0) == TokenBatchSampler(lengths, **kw).all_batches(0)
    for ratio in (0.05, 0.1, 0.3):
        s = TokenBatchSampler(lengths, replay=replay, replay_ratio=ratio, **kw)
        for epoch in (0, 1):
            batches = s.all_batches(epoch)
            flat = np.concatenate(batches)
            share = lengths[flat][replay[flat]].sum() / lengths[flat].sum()
            assert abs(share - ratio) <= 0.02 and share == pytest.approx(s.replay_share(epoch))
            assert all(len(b) * lengths[b].max() <= kw["max_tokens"] for b in batches)  # the bound holds
            assert sorted(flat[~replay[flat]].tolist()) == main.tolist()  # every main row once
            assert any(replay[b].any() and (~replay[b]).any() for b in batches)  # mixed into batches
        # a function of (seed, epoch): a resumed run (set_epoch with a start) sees the same batches
        again = TokenBatchSampler(lengths, replay=replay, replay_ratio=ratio, **kw)
        again.set_epoch(1, 4)
        assert [[i for _, i in b] for b in again] == s.all_batches(1)[4:]
        assert s.all_batches(0) != s.all_batches(1)


def test_a_million_utterance_epoch_is_planned_in_arrays():
    """An epoch of 1M utterances is two int arrays (no Python object per item); every batch is
    within the token and count bounds, and the 8 ranks share the batches out exactly."""
    lengths = np.random.default_rng(0).integers(60, 1600, size=1_000_000).astype(np.int32)
    plans = [TokenBatchSampler(lengths, 16000, max_batch_size=64, rank=r, world_size=8).plan(0) for r in range(8)]
    plan = plans[1]
    assert plan.items.dtype == np.int32 and plan.bounds.dtype == np.int64
    sizes = np.diff(plan.bounds)
    assert (sizes <= 64).all() and (np.maximum.reduceat(lengths[plan.items], plan.bounds[:-1]) * sizes <= 16000).all()
    assert len({len(p) for p in plans}) == 1
    seen = np.concatenate([p.items for p in plans])
    assert len(np.unique(seen)) == len(seen) > 0.99 * len(lengths)  # only the trimmed tail is left out


# --- memory -----------------------------------------------------------------------------------


def _uss(pid: int) -> int:
    """Unique set size (Private_Clean + Private_Dirty) of a process, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k] = int(v.split()[0]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


class _Core(torch.utils.data.Dataset):
    """An item's codes and text ids, no audio (what the memory test reads)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        item = self.ds.core_item(i)
        return int(item["codes"].numel() + item["text_ids"].numel() + len(item["utt_id"]) + len(item["speaker"]))


def workers_uss(ds, *, workers: int = 4, reads: int = 5000, seed: int = 0) -> tuple[int, list[int]]:
    """Fork ``workers`` DataLoader workers over ``ds`` that each read ``reads`` random items;
    returns (the sum of their USS after reading, per worker)."""
    batch = 50
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    order = order.repeat(workers * reads // len(ds) + 1)[: workers * reads].tolist()
    loader = torch.utils.data.DataLoader(_Core(ds), batch_size=batch, sampler=order, num_workers=workers,
                                         persistent_workers=True, collate_fn=sum, multiprocessing_context="fork")
    it = iter(loader)
    total = sum(it)
    assert total > 0
    pids = [w.pid for w in it._workers]
    uss = [_uss(p) for p in pids]
    del it, loader
    return sum(uss), uss


MIB = 1 << 20
# Private pages a forked worker may add beyond the same workers over a tiny corpus: allocator
# arenas and the items in flight (2 x 50 items of < 64 KiB). Nothing in it scales with rows.
SLACK_PER_WORKER = 16 * MIB


def _object_strings(ds: LegacyCodesDataset) -> LegacyCodesDataset:
    """The legacy dataset as it runs under pandas 2.x (pyproject allows >= 2.2): ``to_pandas``
    gives one Python ``str`` per row and column instead of pandas 3's Arrow-backed strings."""
    ds.meta = ds.meta.astype({c: object for c in ds.meta.columns if ds.meta[c].dtype == "str"})
    return ds


@pytest.fixture(scope="module")
def corpus_200k(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("big")
    data = make_synthetic_shards(root, 200_000, n_shards=4)
    data["pack"] = pack_codes(data["shards"], root / "pack", clean=data["clean"])
    data["tokens"] = tokenize_text(data["pack"], data["bpe"], root / "tokens")
    return data


@pytest.mark.slow
def test_workers_private_memory_does_not_grow_with_the_corpus(corpus_200k, tmp_path, one_torch_thread):
    """4 forked DataLoader workers each read 5,000 random items (codes + text ids) of 200k rows.
    The bound on the sum of their USS: the same workers' USS over a 1,000-row corpus (the same
    reads) + 4 x 16 MiB. A worker's private pages are the pages it writes after the fork. An item
    of the mapped dataset writes only its own short-lived buffers (read by offset, never a mapped
    page) and touches no per-row object, so 200k-row workers hold what 1k-row workers hold: the
    post-fork baseline of the interpreter, torch and the loader, measured on the 1k rows and the
    same at any row count. The legacy dataset's workers, with pandas 2's object strings, copy each
    page of row strings whose reference counts they touch: up to 5,000 reads x 5 strings x 4 KiB
    per worker, bounded only by the size of the frame, so it grows with the corpus and must fail.
    (With pandas 3's Arrow-backed strings, the pinned version, the legacy workers copy nothing
    either: its cost is per rank, see the next test.)"""
    small = make_synthetic_shards(tmp_path / "small", 1000, n_shards=1)
    kw = dict(features=FEATS, split="train")

    def mapped(data):
        return CodesDataset(data["shards"], bpe_path=data["bpe"], clean_path=data["clean"], **kw)

    def legacy(data):
        return _object_strings(LegacyCodesDataset(data["shards"], bpe_path=data["bpe"], clean_path=data["clean"], **kw))

    base, _ = workers_uss(mapped(small))
    bound = base + 4 * SLACK_PER_WORKER
    ds = CodesDataset(pack=corpus_200k["pack"], tokens=corpus_200k["tokens"], **kw)
    assert len(ds) > 190_000
    total, per = workers_uss(ds)
    del ds
    old_total, old_per = workers_uss(legacy(corpus_200k))
    print(f"bound {bound / MIB:.1f} MiB (1k-row workers {base / MIB:.1f} MiB + 4 x 16); mapped "
          f"{[round(p / MIB, 1) for p in per]}, legacy {[round(p / MIB, 1) for p in old_per]} MiB")
    assert total <= bound, (total / MIB, bound / MIB)
    assert old_total > bound, (old_total / MIB, bound / MIB)


_RANK = """
import json, os, sys
sys.path.insert(0, {repo!r})
from tests.test_dataset import _uss, FEATS
from tests.legacy_data import LegacyCodesDataset
from indextts.dataset import CodesDataset
from indextts.data import TokenBatchSampler
data = json.loads(sys.argv[1])
before = _uss(os.getpid())
if data["kind"] == "mapped":
    ds = CodesDataset(pack=data["pack"], tokens=data["tokens"], bpe_path=data["bpe"], features=FEATS, split="train")
else:
    ds = LegacyCodesDataset(data["shards"], bpe_path=data["bpe"], clean_path=data["clean"], features=FEATS, split="train")
sampler = TokenBatchSampler(ds.lengths + ds.text_lengths + 40, 20000, seed=0)
sampler.plan(0)
print(json.dumps({{"rows": len(ds), "added": _uss(os.getpid()) - before}}))
"""


@pytest.mark.slow
def test_a_rank_adds_a_few_bytes_per_utterance(corpus_200k):
    """What one more rank (a process of its own, as torchrun starts them) adds in private memory
    when it opens the training data and plans an epoch. The bound: 40 bytes per utterance + 8 MiB.
    The dataset holds 5 int32 per kept item (pack row, frames, text ids, speaker, speaker-grouped
    order: 20 B) and the sampler an int32 length, an int32 place in the epoch's batches and a few
    batch bounds (< 12 B); the rest is the interpreter's and numpy's allocator (the 8 MiB). The
    legacy dataset holds the codes (2 bytes x frames, ~1 KB per utterance here) and a pandas frame
    of every row in each rank."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    code = _RANK.format(repo=str(Path(__file__).resolve().parents[1]))
    out = {}
    for kind in ("mapped", "legacy"):
        arg = json.dumps({"kind": kind, **{k: (str(v) if isinstance(v, Path) else [str(x) for x in v])
                                          for k, v in corpus_200k.items()}})
        proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = out["mapped"]["rows"]
    bound = 40 * rows + 8 * MIB
    print({k: round(v["added"] / MIB, 1) for k, v in out.items()}, f"MiB; bound {bound / MIB:.1f} MiB for {rows} rows")
    assert out["mapped"]["added"] <= bound, out
    assert out["legacy"]["added"] > 10 * bound, out
