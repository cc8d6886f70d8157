"""Training data at corpus scale: the codes pack (``indextts.pack`` + ``indextts.dataset``) against
the dataset it replaced (``tests/legacy_data.py``: every shard read whole into each process).

    .venv/bin/python bench/bench_data.py [--rows 100000 1000000 3500000] [--codebooks 1 12]
        [--workers 8] [--reads 10000] [--old-max-gb 2.5] [--no-write]

For each number of synthetic utterances (1-20 s at 50 frames/s, ~2,900 h per million, one
speaker per 100) and each codebook count, in a fresh process per implementation (a "rank"):

1. Init: the dataset of the train split (legacy: read the Parquet shards and tokenise; pack: open
   the cache, which ``pack_codes`` and ``tokenize_text`` wrote once, timed separately), then a
   ``TokenBatchSampler`` epoch plan (16,000 tokens per batch).
2. Memory of the rank: RSS and USS (``/proc/<pid>/smaps_rollup``, Private_Clean + Private_Dirty)
   after init, and the USS the data added over the interpreter with torch loaded.
3. Random item reads in the rank (codes + text ids + utt_id + speaker, no audio): items/s.
4. 1 rank x ``--workers`` forked DataLoader workers, each reading ``--reads`` random items: every
   worker's USS (what it adds) and the sum of PSS over the rank and its workers (what they take
   together: a page shared by n of them counts 1/n in each; USS would not add up, since the
   rank's pages become shared, not private, once it forks).

Data: Parquet shards as extraction writes them (zstd) where the legacy dataset is measured
(its codes in memory at most ``--old-max-gb`` per process: this machine's 23 GB are shared);
packed with ``pack_codes``. Sizes beyond that get a pack written directly (the same files, text
ids drawn at random), and with 12 codebooks its codes file is sparse (a hole of the right size:
init and memory are what they would be; reads of a hole cost what reads of cached pages cost,
with no disk in them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchmarks_md import cpu_name, write_section  # noqa: E402

BEGIN, END = "<!-- bench_data.py: begin -->", "<!-- bench_data.py: end -->"
ANCHOR = "<!-- bench_train.py: end -->"
MIB = 1 << 20
FRAMES = (50, 1000)  # 1-20 s at 50 frames/s: mean 10.5 s, ~2,900 h per million utterances
FRAME_RATE_H = 50 * 3600  # code frames per hour


def memory(pid: int | str = "self") -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        fields[k] = int(v.split()[0]) * 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


# --------------------------------------------------------------------------------------------
# Data


def write_pack(root: Path, rows: int, n_q: int, *, sparse: bool, seed: int = 0) -> tuple[Path, Path]:
    """A codes pack and its tokens folder of ``rows`` synthetic utterances, written directly in
    the pack's format (no Parquet, random text ids of ~3 per second)."""
    from indextts.pack import PACK_FORMAT, TOKENS_FORMAT, _npy_header, _NpyWriter, _save, source_id

    rng = np.random.default_rng(seed)
    pack, tokens = root / "pack", root / "tokens"
    pack.mkdir(parents=True)
    tokens.mkdir()
    n_frames = rng.integers(*FRAMES, size=rows).astype(np.int32)
    sizes = n_frames.astype(np.int64) * n_q
    off = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(sizes, out=off[1:])
    _save(pack, "codes_offsets", off)
    header = _npy_header(np.int16, int(off[-1]))
    with open(pack / "codes.npy", "wb") as f:
        f.write(header)
        if sparse:
            f.truncate(len(header) + 2 * int(off[-1]))
        else:
            for a in range(0, int(off[-1]), 1 << 26):
                f.write(rng.integers(0, 1024, size=min(1 << 26, int(off[-1]) - a), dtype=np.int16).tobytes())
    _save(pack, "n_frames", n_frames)
    _save(pack, "speaker", (np.arange(rows) // 100).astype(np.int32))
    _save(pack, "split", (rng.random(rows) < 0.02).astype(np.int8))
    _save(pack, "has_emotion", np.zeros(rows, dtype=bool))
    width = len(str(rows))
    ids = np.char.add("u", np.char.zfill(np.arange(rows).astype(str), width)).astype(f"S{width + 1}")
    paths = np.char.add(np.char.add(b"/corpus/audio/", ids), b".wav")
    for name, arr in (("utt_id", ids), ("audio_path", paths)):
        _save(pack, name, np.frombuffer(arr.tobytes(), dtype=np.uint8))
        _save(pack, f"{name}_offsets", np.arange(rows + 1, dtype=np.int64) * arr.dtype.itemsize)
    _save(pack, "text", np.zeros(0, np.uint8))
    _save(pack, "text_offsets", np.zeros(rows + 1, np.int64))
    n_spk = (rows + 99) // 100
    names = np.char.add("spk", np.char.zfill(np.arange(n_spk).astype(str), 6)).astype("S9")
    _save(pack, "speaker_names", np.frombuffer(names.tobytes(), dtype=np.uint8))
    _save(pack, "speaker_names_offsets", np.arange(n_spk + 1, dtype=np.int64) * 9)
    source = {"synthetic": {"rows": rows, "n_q": n_q, "seed": seed}, "shards": [], "clean_sha256": "synthetic"}
    meta = {"format": PACK_FORMAT, "source": source, "id": source_id(source), "codec": {}, "n_q": n_q, "rows": rows,
            "frames": int(n_frames.sum()), "speakers": n_spk, "splits": ["train", "val"], "codes_bytes": 2 * int(off[-1])}
    (pack / "pack.json").write_text(json.dumps(meta))
    n_text = (3 * n_frames // 50 + 2).astype(np.int64)
    w = _NpyWriter(tokens / "ids.npy", np.int32)
    for a in range(0, int(n_text.sum()), 1 << 26):
        w.write(rng.integers(3, 40, size=min(1 << 26, int(n_text.sum()) - a), dtype=np.int32))
    w.close()
    toff = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(n_text, out=toff[1:])
    _save(tokens, "ids_offsets", toff)
    _save(tokens, "unk", np.zeros(rows, np.int32))
    tsource = {"pack": meta["id"], "vocab_sha256": "synthetic"}
    (tokens / "tokens.json").write_text(json.dumps({"format": TOKENS_FORMAT, "source": tsource, "id": source_id(tsource)}))
    return pack, tokens


def build(root: Path, rows: int, n_q: int, with_shards: bool) -> dict:
    """The data of one size: shards + pack_codes + tokenize_text, or a pack written directly."""
    from indextts.pack import pack_codes, tokenize_text
    from tests.factories import make_synthetic_shards

    if not with_shards:
        t0 = time.perf_counter()
        pack, tokens = write_pack(root, rows, n_q, sparse=n_q > 1)
        return {"pack": str(pack), "tokens": str(tokens), "write_s": time.perf_counter() - t0, "sparse": n_q > 1}
    t0 = time.perf_counter()
    data = make_synthetic_shards(root / "shards", rows, n_shards=max(1, rows // 20_000), n_q=n_q, frames=FRAMES)
    gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    pack = pack_codes(data["shards"], root / "pack", clean=data["clean"])
    pack_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = tokenize_text(pack, data["bpe"], root / "tokens")
    tok_s = time.perf_counter() - t0
    return {"shards": [str(s) for s in data["shards"]], "clean": str(data["clean"]), "bpe": str(data["bpe"]),
            "pack": str(pack), "tokens": str(tokens), "generate_s": gen, "pack_s": pack_s, "tokenize_s": tok_s,
            "sparse": False}


# --------------------------------------------------------------------------------------------
# One rank (run in its own process: python bench/bench_data.py --measure JSON)


def measure(spec: dict) -> dict:
    import torch

    from indextts.data import TokenBatchSampler
    from indextts.dataset import CodesDataset
    from indextts.features import FeatureConfig
    from tests.legacy_data import LegacyCodesDataset

    torch.set_num_threads(1)
    feats = FeatureConfig(n_mels=80)
    # Both datasets' libraries loaded before the baseline: their code pages would otherwise count
    # as private memory of a process that alone maps them.
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import sentencepiece  # noqa: F401

    before = memory()
    t0 = time.perf_counter()
    if spec["kind"] == "pack":
        ds = CodesDataset(pack=spec["pack"], tokens=spec["tokens"], features=feats, split="train", n_codebooks=spec["n_q"])
    else:
        ds = LegacyCodesDataset(spec["shards"], bpe_path=spec["bpe"], clean_path=spec["clean"], features=feats,
                                split="train", n_codebooks=spec["n_q"])
    init_s = time.perf_counter() - t0
    after_init = memory()
    t0 = time.perf_counter()
    sampler = TokenBatchSampler(ds.lengths + ds.text_lengths + 40, 16000, max_batch_size=64, seed=0)
    n_batches = sampler.n_batches(0)
    plan_s = time.perf_counter() - t0
    after_plan = memory()

    rng = np.random.default_rng(1)
    picks = rng.integers(len(ds), size=spec["main_reads"]).tolist()
    t0 = time.perf_counter()
    for i in picks:
        ds.core_item(i)
    read_rate = len(picks) / (time.perf_counter() - t0)

    class Core(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            item = ds.core_item(i)
            return int(item["codes"].numel() + item["text_ids"].numel())

    order = rng.integers(len(ds), size=spec["workers"] * spec["reads"]).tolist()
    loader = torch.utils.data.DataLoader(Core(), batch_size=100, sampler=order, num_workers=spec["workers"],
                                         persistent_workers=True, collate_fn=sum, multiprocessing_context="fork")
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in it:
        pass
    workers_s = time.perf_counter() - t0
    workers = [memory(w.pid) for w in it._workers]
    rank = memory()
    del it, loader
    return {
        "rows": len(ds), "init_s": init_s, "plan_s": plan_s, "batches": n_batches,
        "rss": after_plan["rss"], "uss": after_plan["uss"], "uss_added": after_plan["uss"] - before["uss"],
        "uss_added_init": after_init["uss"] - before["uss"], "read_items_s": read_rate,
        "worker_uss": [w["uss"] for w in workers], "rank_uss_after": rank["uss"],
        # PSS adds up: each page shared by n processes counts 1/n in each
        "sum_pss": rank["pss"] + sum(w["pss"] for w in workers), "rank_pss": after_plan["pss"], "workers_s": workers_s,
    }


def run_measure(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"measure {spec['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 3_500_000])
    p.add_argument("--codebooks", type=int, nargs="+", default=[1, 12])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--reads", type=int, default=10_000, help="random items each worker reads")
    p.add_argument("--main-reads", type=int, default=20_000, help="random items the rank reads for the items/s")
    p.add_argument("--old-max-gb", type=float, default=2.5,
                   help="measure the legacy dataset where its codes take at most this many GB per process")
    p.add_argument("--tmp", type=Path, default=None, help="where the data is written (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(json.loads(a.measure))))
        return

    import torch

    load0 = os.getloadavg()[0]
    results = []
    for rows in a.rows:
        for n_q in a.codebooks:
            old_gb = rows * np.mean(FRAMES) * n_q * 2 / 1e9
            with_old = old_gb <= a.old_max_gb
            with tempfile.TemporaryDirectory(prefix=f"bench_data_{rows}_{n_q}_", dir=a.tmp) as d:
                t0 = time.perf_counter()
                data = build(Path(d), rows, n_q, with_shards=with_old)
                print(f"{rows} x {n_q}: data in {time.perf_counter() - t0:.0f} s {data}", file=sys.stderr, flush=True)
                common = {"n_q": n_q, "workers": a.workers, "reads": a.reads, "main_reads": a.main_reads}
                row = {"rows": rows, "n_q": n_q, "data": {k: v for k, v in data.items() if k.endswith("_s") or k == "sparse"},
                       "old_gb": old_gb}
                row["pack"] = run_measure({"kind": "pack", **data, **common})
                print(f"  pack {row['pack']}", file=sys.stderr, flush=True)
                if with_old:
                    row["legacy"] = run_measure({"kind": "legacy", **data, **common})
                    print(f"  legacy {row['legacy']}", file=sys.stderr, flush=True)
                results.append(row)
    load1 = os.getloadavg()[0]
    text = render(a, results, load0, load1, torch.__version__)
    print(text)
    if not a.no_write:
        write_section(text, BEGIN, END, anchor=ANCHOR)


def _mib(x: float) -> str:
    return f"{x / MIB:,.0f}"


def render(a, results: list[dict], load0: float, load1: float, torch_version: str) -> str:
    cmd = " ".join(["python", "bench/bench_data.py", *sys.argv[1:]])
    out = [BEGIN, "## Training data at corpus scale (`bench/bench_data.py`)", "",
           f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/{cmd}`  ",
           f"Machine: `nproc` = {os.cpu_count()}, {cpu_name()}, 23 GB RAM, Python {platform.python_version()}, "
           f"torch {torch_version}, numpy {np.__version__}; 1-min load average {load0:.1f} at the start, "
           f"{load1:.1f} at the end (other jobs share the machine)", "",
           "Synthetic utterances of 1-20 s (50 frames/s, ~2,900 h per million), one speaker per 100, 98% train. "
           "*pack*: `indextts.dataset.CodesDataset` over the cache; *legacy*: the dataset it replaced "
           "(`tests/legacy_data.py`: every Parquet shard read whole into the process, a pandas frame of every row). "
           "Each row is one fresh process (a rank): init = the train split's dataset (legacy: read + tokenise; pack: "
           "open the cache), plan = one `TokenBatchSampler` epoch (16,000 tokens, at most 64 items). USS added: "
           "private memory over the interpreter with torch loaded, after init and plan. Reads: random items "
           "(codes + text ids + utt_id + speaker, no audio) in the rank. Workers: "
           f"{a.workers} forked DataLoader workers each reading {a.reads:,} random items; per worker its USS, and "
           "the sum of PSS over the rank and its workers before and after (their memory together: a page shared by n "
           "processes counts 1/n in each).", "",
           "| utterances | codebooks | dataset | init (s) | plan (s) | RSS (MiB) | USS added (MiB) | reads (items/s) "
           "| USS per worker (MiB) | rank PSS → rank + workers PSS (MiB) |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for kind in ("legacy", "pack"):
            m = r.get(kind)
            if m is None:
                continue
            note = " (sparse codes)" if kind == "pack" and r["data"].get("sparse") else ""
            out.append(f"| {r['rows']:,} | {r['n_q']} | {kind}{note} | {m['init_s']:.2f} | {m['plan_s']:.2f} | "
                       f"{_mib(m['rss'])} | {_mib(m['uss_added'])} | {m['read_items_s']:,.0f} | "
                       f"{_mib(np.mean(m['worker_uss']))} (max {_mib(max(m['worker_uss']))}) | "
                       f"{_mib(m['rank_pss'])} → {_mib(m['sum_pss'])} |")
    out += ["", "Making the cache, once per corpus (pack) and once per vocabulary (tokens), from Parquet shards "
            "written as extraction writes them (zstd):", "",
            "| utterances | codebooks | `pack_codes` (s) | `tokenize_text` (s) |", "|---:|---:|---:|---:|"]
    for r in results:
        if "pack_s" in r["data"]:
            out.append(f"| {r['rows']:,} | {r['n_q']} | {r['data']['pack_s']:.1f} | {r['data']['tokenize_s']:.1f} |")
    skipped = [r for r in results if "legacy" not in r]
    if skipped:
        out += ["", "Legacy not measured at " + ", ".join(f"{r['rows']:,} x {r['n_q']}" for r in skipped)
                + ": its codes alone would take " + ", ".join(f"{r['old_gb']:.1f}" for r in skipped) + " GB in every "
                + f"process (more than `--old-max-gb {a.old_max_gb:g}` on this shared 23 GB machine)."]
    big = max(results, key=lambda r: (r["rows"], r["n_q"]))
    both = [r for r in results if "legacy" in r]
    out += ["", "Reading these numbers:", ""]
    if both:
        r = max(both, key=lambda r: (r["rows"], r["n_q"]))
        out.append(f"- At {r['rows']:,} x {r['n_q']} the legacy dataset takes {r['legacy']['init_s']:.0f} s and adds "
                   f"{_mib(r['legacy']['uss_added'])} MiB to every rank; the pack {r['pack']['init_s']:.2f} s and "
                   f"{_mib(r['pack']['uss_added'])} MiB. Legacy grows with the codes (2 bytes x frames x codebooks) and "
                   "the rows; the pack with the rows only, by the five int32 per utterance the dataset keeps and "
                   "one epoch's plan.")
    out.append(f"- At {big['rows']:,} x {big['n_q']} (about {big['rows'] * np.mean(FRAMES) / FRAME_RATE_H:,.0f} h): "
               f"init {big['pack']['init_s']:.2f} s + epoch plan {big['pack']['plan_s']:.2f} s (goal < 10 s); "
               f"a rank adds {_mib(big['pack']['uss_added'])} MiB and a worker at most "
               f"{_mib(max(big['pack']['worker_uss']))} MiB of private memory (goal < 200 MB each).")
    out.append("- Forked workers copy nothing with either dataset here: pandas 3 (the pinned version) keeps the "
               "legacy frame's strings in Arrow buffers, not one Python object per row. With pandas 2's object "
               "strings (pyproject allows pandas >= 2.2) the legacy workers copy the pages of the rows they touch: "
               "~59 MiB per worker after 5,000 reads of 200k rows, against ~7 MiB "
               "(`tests/test_dataset.py::test_workers_private_memory_does_not_grow_with_the_corpus`).")
    out.append("- Reads: an item is ~6 `pread`s from the page cache (codes, text ids, utt_id and their offsets); "
               "the legacy item a pandas row lookup. Neither is near a training step's cost: per `small`-preset "
               "batch of `bench_train.py`, the prompt features (log-mel from audio) dominate the data time.")
    out.append(END)
    return "\n".join(out)


if __name__ == "__main__":
    main()
