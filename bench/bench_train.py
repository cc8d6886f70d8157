"""Trainer benchmarks on the CPU; prints a Markdown section for BENCHMARKS.md.

    .venv/bin/python bench/bench_train.py [--presets tiny small] [--steps 30] [--workers 2]
        [--demo-dir /path/to/a/workflow/run]

1. Throughput: the real ``train_stage`` (stages 1, 2, 3 chained) on a synthetic corpus built
   with the test factory (tones whose codes follow their envelope), per preset. Non-pad
   tokens/s and the data-wait share of step time are the trainer's own numbers from
   ``metrics.jsonl`` (mean over the logged windows after the first, which holds start-up).
2. Padding efficiency (real over padded GPT positions) of the token-bounded batches, on the
   demo corpus's code shards (``--demo-dir``: a folder where the demo DAG ran) and on a
   synthetic length distribution like Emilia's (1-30 s, log-normal around 6 s, 50 code
   frames/s, ~3 text tokens/s).
3. Where a CPU step's time goes: data (features in the loader), forward, backward and the
   optimiser, timed separately over ``--steps`` steps of the ``small`` preset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indextts.data import TokenBatchSampler  # noqa: E402
from indextts.train import StageInputs, train_stage  # noqa: E402
from tests.factories import make_train_corpus  # noqa: E402

# Per preset: clip lengths of the synthetic corpus and the token budget per micro-batch.
CORPUS = {
    "tiny": dict(durations=(1.0, 6.0), max_tokens=3000),
    "small": dict(durations=(3.0, 12.0), max_tokens=6000),
}


def throughput(preset: str, steps: int, workers: int, root: Path) -> list[dict]:
    spec = CORPUS[preset]
    corpus = make_train_corpus(root / "corpus", n_speakers=4, per_speaker=24, n_q=2, codebook=1024 if preset == "small" else 64,
                               durations=spec["durations"], words_per_second=2.5)
    train = {"device": "cpu", "max_tokens": spec["max_tokens"], "num_workers": workers, "log_every": 5,
             "val_every": 10_000, "state_every": 10_000, "progress": "lines", "max_ref_seconds": 6.0}
    for k in (1, 2, 3):
        train[f"stage{k}"] = {"max_steps": steps, "warmup_steps": 2, "lr": 1.0e-4}
    config = {"train": train, "model": {"preset": preset}, "text": {}, "codec": {"weights": "none"}}
    rows, parent = [], None
    for stage in (1, 2, 3):
        out = root / f"stage{stage}"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines, away from the Markdown
            train_stage(config, stage, StageInputs(codes_index=corpus["index"], clean=corpus["clean"], bpe=corpus["bpe"],
                                                   out_dir=out, parent=parent, speakers=corpus["speakers"]))
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        tr = [r for r in recs if r["split"] == "train"][1:]
        meta = json.loads((out / "model.json").read_text())
        rows.append({"preset": preset, "stage": stage, "tok_s": statistics.mean(r["tokens_per_s"] for r in tr),
                     "wait": statistics.mean(r["data_wait"] for r in tr), "wall": wall,
                     "trainable": meta["extra"]["params"]["trainable"], "total": meta["extra"]["params"]["total"],
                     "pad": meta["extra"]["data"]["padding_efficiency"]})
        parent = out
    return rows


def padding_demo(demo_dir: Path, max_tokens: int) -> tuple[float, int] | None:
    from indextts.codes import shard_paths
    from indextts.data import CodesDataset
    from indextts.model import model_config

    index = demo_dir / "results/codes/index.json"
    if not index.is_file():
        return None
    cfg = model_config("tiny")
    ds = CodesDataset(shard_paths(index), bpe_path=demo_dir / "results/vocab/bpe.model", features=cfg.features,
                      split="train", clean_path=demo_dir / "results/clean/clean.parquet",
                      n_codebooks=json.loads(index.read_text())["codec"]["n_q"])
    s = TokenBatchSampler(cfg.seq_len(ds.text_lengths, ds.lengths), max_tokens, seed=0)
    return s.padding_efficiency(0), len(s.batches(0))


def padding_emilia(n: int, max_tokens: int, bucket_size: int) -> tuple[float, int]:
    rng = np.random.default_rng(0)
    dur = np.clip(rng.lognormal(np.log(6.0), 0.6, n), 1.0, 30.0)
    tokens = 34 + (3.0 * dur).astype(int) + 2 + (50 * dur).astype(int) + 2
    s = TokenBatchSampler(tokens, max_tokens, seed=0, bucket_size=bucket_size)
    return s.padding_efficiency(0), len(s.batches(0))


def step_profile(steps: int) -> dict[str, float]:
    """Per-step seconds of data / forward / backward / optimiser for the small preset on CPU."""
    from indextts.codes import shard_paths
    from indextts.data import CodesDataset, collate
    from indextts.model import build_model, model_config
    from indextts.train import StageObjective, param_groups

    root = Path(tempfile.mkdtemp(prefix="bench_train_prof_"))
    corpus = make_train_corpus(root / "corpus", n_speakers=2, per_speaker=16, n_q=2, codebook=1024,
                               durations=(3.0, 12.0), words_per_second=2.5)
    cfg = model_config("small", number_text_tokens=40, number_mel_codes=1026, n_codebooks=2)
    torch.manual_seed(0)
    obj = StageObjective(build_model(cfg)).train()
    opt = torch.optim.AdamW(param_groups(obj, 0.01), lr=1e-4)
    ds = CodesDataset(shard_paths(corpus["index"]), bpe_path=corpus["bpe"], features=cfg.features, split="train",
                      clean_path=corpus["clean"], n_codebooks=2, emo_prompt="target")
    sampler = TokenBatchSampler(cfg.seq_len(ds.text_lengths, ds.lengths), 6000, seed=0)
    batches = sampler.batches(0)
    t = {"data": [], "forward": [], "backward": [], "optimizer": []}
    for i in range(steps + 2):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        batch = collate([ds[(0, j)] for j in b])
        t1 = time.perf_counter()
        out, _ = obj(batch.inputs())
        t2 = time.perf_counter()
        out.loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i >= 2:
            for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                t[k].append(v)
    return {k: statistics.median(v) for k, v in t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--demo-dir", type=Path, help="a folder where the demo DAG ran (results/codes ...)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    rows = []
    for preset in a.presets:
        with tempfile.TemporaryDirectory(prefix=f"bench_train_{preset}_") as d:
            rows += throughput(preset, a.steps, a.workers, Path(d))
    demo = padding_demo(a.demo_dir, 3000) if a.demo_dir else None
    emilia = {(mt, bs): padding_emilia(100_000, mt, bs) for mt in (8000, 16000) for bs in (500, 2000)}
    prof = step_profile(min(a.steps, 10))
    load1 = os.getloadavg()[0]

    cmd = " ".join(["python", "bench/bench_train.py", *sys.argv[1:]])
    print("<!-- bench_train.py: begin -->")
    print("## Training (`bench/bench_train.py`)\n")
    print(f"Command: `.venv/bin/{cmd}`  ")
    print(f"Machine: `nproc` = {os.cpu_count()}, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, torch {torch.__version__}, {a.threads} torch threads; 1-min load average "
          f"{load0:.1f} at the start, {load1:.1f} at the end (other jobs share the machine)\n")
    print(f"### Throughput of the real trainer on CPU ({a.steps} steps per stage, {a.workers} DataLoader workers)\n")
    print("Synthetic corpus (96 utterances, 4 speakers, 2 codebooks); stages chained 1 → 2 → 3. Tokens/s are "
          "non-pad text + code targets per second; data wait is the share of step time spent waiting for "
          "the loader (features are computed in the workers).\n")
    print("| preset | stage | trainable / total params | non-pad tokens/s | data wait | padding eff. | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['stage']} | {r['trainable']:,} / {r['total']:,} | {r['tok_s']:,.0f} | "
              f"{100 * r['wait']:.1f}% | {r['pad']:.3f} | {r['wall']:.1f} |")
    print("\n### Padding efficiency of token-bounded batches (goal >= 0.9)\n")
    print("| lengths | max_tokens | bucket_size | batches | real / padded |")
    print("|---|---:|---:|---:|---:|")
    if demo:
        print(f"| demo corpus (train split) | 3000 | 2000 | {demo[1]} | {demo[0]:.3f} |")
    for (mt, bs), (eff, nb) in emilia.items():
        print(f"| Emilia-like, 100k clips of 1-30 s | {mt} | {bs} | {nb} | {eff:.3f} |")
    total = sum(prof.values())
    print(f"\n### Where a CPU step goes (`small` preset, 2 codebooks, 6000-token batches, median of {min(a.steps, 10)} steps)\n")
    print("| part | s / step | share |")
    print("|---|---:|---:|")
    for k, v in prof.items():
        print(f"| {k} | {v:.3f} | {100 * v / total:.0f}% |")
    print("\nData is computed on the main thread here to measure it; in training it runs in the "
          "DataLoader workers and overlaps the step, which is what the data-wait column shows.")
    print("<!-- bench_train.py: end -->")


if __name__ == "__main__":
    main()
